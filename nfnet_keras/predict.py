"""Classify images with a trained model: `python -m nfnet_keras.predict --model PATH --images FILE --out FILE`.

`--images`: a `.npy` uint8 array N x H x W x 3 of the model's image size
(N x 32 x 32 x 3 for CIFAR-10: the report's private test set format), a
PNG/JPEG file, or a folder of them (resized to the model's size). `--out`:
`.npy` (class probabilities N x classes) or `.csv` (file, class, probability),
with the class names the model carries.
"""

import argparse
import csv
import os
import sys

import numpy as np

from nfnet_keras import exits, fileio
from nfnet_keras.console import prog
from nfnet_keras.contract import CLASS_NAMES, InputError


def write_predictions(path, names, probabilities, class_names=CLASS_NAMES):
    """Writes probabilities to `.npy`, or `file,class,probability` rows to `.csv`, atomically."""
    if path.endswith(".npy"):
        with fileio.atomic_write(path, "wb") as f:
            np.save(f, probabilities.astype(np.float32))
        return
    with fileio.atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class", "probability"])
        for name, p in zip(names, probabilities):
            writer.writerow([name, class_names[int(p.argmax())], f"{float(p.max()):.6f}"])


def _require_images(path, images):
    if len(images) == 0:
        raise InputError(f"--images {path}: holds no images (an empty array); give at least one.")


def main(argv=None):
    p = argparse.ArgumentParser(prog=prog("nfnet_keras.predict"),
                                description=__doc__.splitlines()[0].split(": `")[0] + ".")
    p.add_argument("--model", required=True,
                   help="a .keras file, a SavedModel directory, or an exported .onnx, .tflite or OpenVINO .xml")
    p.add_argument("--images", required=True, help=".npy uint8 N x H x W x 3 (the model's image size: 32 x 32 for "
                   "CIFAR-10), a PNG/JPEG, or a folder (resized to the model's size)")
    p.add_argument("--out", required=True, help="output .npy (probabilities) or .csv (file, class, probability)")
    args = p.parse_args(argv)
    if not args.out.endswith((".npy", ".csv")):
        p.error(f"--out {args.out}: use a .npy or .csv file name.")
    problem = fileio.unwritable(args.out)
    if problem:
        p.error(f"--out {args.out}: {problem}.")
    from nfnet_keras import load_framework

    load_framework()
    from nfnet_keras.inference import load_predictor, read_images

    try:
        if args.images.endswith(".npy") or not os.path.exists(args.images):  # checked before the model loads
            _require_images(args.images, read_images(args.images, image_shape=(None, None, 3))[1])
        predict = load_predictor(args.model)
        names, images = read_images(args.images, image_shape=predict.image_shape)
        _require_images(args.images, images)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    probabilities = predict(images)
    try:
        write_predictions(args.out, names, probabilities, predict.class_names)
    except fileio.WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.ENVIRONMENT
    print(f"Wrote {len(names)} predictions to {args.out}.")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
