"""Evaluate a trained model on a test split: `python -m nfnet_keras.evaluate --model PATH`.

The test split of CIFAR-10, or of `--dataset folder:PATH` / `tfds:NAME` (the
split `fit` tests on), its images resized to the model's size. Prints the test
accuracy, the confusion matrix and per-class accuracy.
"""

import argparse
import sys

import numpy as np

from nfnet_keras import exits, fileio
from nfnet_keras.config import TTA_POLICIES, dataset_problem
from nfnet_keras.console import prog
from nfnet_keras.contract import CLASS_NAMES, NUM_CLASSES


def confusion_matrix(labels, predictions, num_classes=NUM_CLASSES):
    """`m[i, j]`: the number of images of class i predicted as j."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels, predictions), 1)
    return m


def format_report(matrix, names=CLASS_NAMES):
    """The confusion matrix and per-class accuracy as text."""
    short = [n[:5] for n in names]
    lines = ["confusion matrix (rows: true class, columns: predicted)", " " * 11 + "".join(f"{s:>6}" for s in short)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:>10} " + "".join(f"{v:>6}" for v in row))
    lines.append("per-class accuracy")
    for name, row, i in zip(names, matrix, range(len(names))):
        lines.append(f"{name:>10}  {row[i] / max(row.sum(), 1):.4f}")
    return "\n".join(lines)


def _listed(names, most=10):
    """`names` joined by commas, the first `most` of a longer list followed by `...`."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _test_split(args, predict):
    """The test images of `--dataset` at the model's image size, and their class names.

    Raises:
        InputError: the model classifies other classes than the data's.
    """
    from nfnet_keras.contract import InputError
    from nfnet_keras.sources import load_dataset

    height, width = predict.image_shape[:2]
    size = None if height is None or width is None else (height, width)
    data = load_dataset(args.dataset, args.data_dir, args.tfds_dir, image_size=size, test_only=True)
    if tuple(predict.class_names) != tuple(data.class_names):
        raise InputError(
            f"--model {args.model} classifies {len(predict.class_names)} classes ({_listed(predict.class_names)}) "
            f"but --dataset {args.dataset} has {len(data.class_names)} ({_listed(data.class_names)}); evaluate a "
            "model on data with its classes.")
    return data.test, data.class_names


def main(argv=None):
    p = argparse.ArgumentParser(prog=prog("nfnet_keras.evaluate"),
                                description=__doc__.splitlines()[0].split(": `")[0] + ".")
    p.add_argument("--model", required=True,
                   help="a .keras file, a SavedModel directory, or an exported .onnx, .tflite or OpenVINO .xml")
    p.add_argument("--dataset", default="cifar10", metavar="SOURCE",
                   help="cifar10, folder:PATH or tfds:NAME, as fit's --dataset (default: %(default)s)")
    p.add_argument("--data-dir", help="folder with cifar-10-batches-py/ (default: $NFNET_DATA_DIR, then TFDS)")
    p.add_argument("--tfds-dir", help="TFDS data_dir: where --dataset tfds:NAME is read, and CIFAR-10 when no "
                   "--data-dir or $NFNET_DATA_DIR is given (default: ~/tensorflow_datasets)")
    p.add_argument("--limit", type=int, help="evaluate on the first N test images")
    p.add_argument("--tta", choices=TTA_POLICIES, default="none",
                   help="test-time augmentation: flip averages each image's and its mirror's probabilities; "
                        "flip_translate adds both moved by one pixel up-left and down-right (6 views); "
                        "flip_translate_weighted weights those views 0.25, 0.25, 0.125 x 4 and averages logits")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1 (the number of test images), got {args.limit}.")
    if dataset_problem(args.dataset):
        p.error(f"--dataset {dataset_problem(args.dataset)}.")
    if args.json:
        problem = fileio.unwritable(args.json)
        if problem:
            p.error(f"--json {args.json}: {problem}.")
    from nfnet_keras import load_framework

    load_framework()
    from nfnet_keras.data import DataError
    from nfnet_keras.inference import TTA_POLICY_VIEWS, InputError, load_predictor, with_tta

    try:
        predict = load_predictor(args.model)
        (x, y), class_names = _test_split(args, predict)
    except (InputError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    predict = with_tta(predict, args.tta)
    predictions = predict(x).argmax(axis=1)
    matrix = confusion_matrix(y, predictions, len(class_names))
    accuracy = float(np.trace(matrix) / matrix.sum())
    tta = "" if args.tta == "none" else f", test-time augmentation: {args.tta}"
    print(f"test accuracy: {accuracy:.4f} ({np.trace(matrix)}/{matrix.sum()}{tta})")
    print(format_report(matrix, class_names))
    if args.json:
        fileio.write_json(args.json, dict(
            test_accuracy=accuracy, tta=args.tta, tta_views=list(TTA_POLICY_VIEWS[args.tta]),
            images=int(matrix.sum()), confusion_matrix=matrix.tolist(),
            per_class_accuracy=(np.diag(matrix) / np.maximum(matrix.sum(1), 1)).tolist()))
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
