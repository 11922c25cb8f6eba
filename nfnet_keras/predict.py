"""Classify images with a trained model: `python -m nfnet_keras.predict --model PATH --images FILE --out FILE`.

`--images`: a `.npy` uint8 array N x 32 x 32 x 3 (the report's private test set
format), a PNG/JPEG file, or a folder of them. `--out`: `.npy` (class
probabilities N x 10) or `.csv` (file, class, probability).
"""

import argparse
import csv
import os
import sys

import numpy as np

from nfnet_keras.data import CLASS_NAMES
from nfnet_keras.inference import InputError, load_predictor, read_images


def write_predictions(path, names, probabilities):
    """Writes probabilities to `.npy`, or `file,class,probability` rows to `.csv`, atomically."""
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"
    if path.endswith(".npy"):
        np.save(tmp, probabilities.astype(np.float32))
    else:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability"])
            for name, p in zip(names, probabilities):
                writer.writerow([name, CLASS_NAMES[int(p.argmax())], f"{float(p.max()):.6f}"])
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nfnet_keras.predict", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .keras file or a SavedModel directory")
    p.add_argument("--images", required=True, help=".npy uint8 N x 32 x 32 x 3, a PNG/JPEG, or a folder")
    p.add_argument("--out", required=True, help="output .npy (probabilities) or .csv (file, class, probability)")
    args = p.parse_args(argv)
    if not args.out.endswith((".npy", ".csv")):
        p.error(f"--out {args.out}: use a .npy or .csv file name.")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: folder {out_dir} does not exist.")
    try:
        names, images = read_images(args.images)
        predict = load_predictor(args.model)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    probabilities = predict(images)
    write_predictions(args.out, names, probabilities)
    print(f"Wrote {len(names)} predictions to {args.out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
