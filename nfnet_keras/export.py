"""Export a model as a TF Serving SavedModel (or ONNX, LiteRT, OpenVINO IR): `<base-dir>/<name>/<version>/`.

The command (`nfnet-export`) parses and checks its flags, then loads the
framework; the SavedModel export is `nfnet_keras.saved_model` and the other
formats `nfnet_keras.export_formats`, whose names this module also gives
(`nfnet_keras.export.export_saved_model`, ...).

Usage:
    python -m nfnet_keras.export --model runs/x/model.keras --name nfnet [--version N] [--format onnx]
        [--quantize int8]
"""

import argparse
import os
import sys

from nfnet_keras import exits, lazy
from nfnet_keras.console import prog
from nfnet_keras.contract import check_model_name

__getattr__, __dir__, _ = lazy.attach(__name__, {"nfnet_keras.saved_model": [
    "ExportError", "existing_versions", "export_saved_model", "float32_twin", "next_version", "publish_version",
    "servability_problems", "stale_exports", "_check_model", "_export_request",
]})
FORMATS = ("saved_model", "onnx", "litert", "openvino")
# The formats `--quantize int8` applies to (nfnet_keras.export_formats.QUANTIZE_FORMATS, without importing Keras).
QUANTIZE_FORMATS = ("onnx", "litert")


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=prog("nfnet_keras.export"),
        description="Export a .keras model as <base-dir>/<name>/<version>/: a TF Serving SavedModel, or ONNX, "
                    "LiteRT or OpenVINO IR (--format).",
    )
    parser.add_argument("--model", required=True, help="the trained model, a .keras file")
    parser.add_argument("--name", required=True, help="the model name TF Serving serves it under")
    parser.add_argument("--version", type=int, help="a new version number (default: the next one)")
    parser.add_argument(
        "--base-dir", default="saved_models", help="the folder TF Serving watches (default: %(default)s)"
    )
    parser.add_argument("--format", default="saved_model", choices=FORMATS,
                        help="saved_model (TF Serving), onnx (model.onnx), litert (model.tflite) or openvino "
                             "(model.xml + model.bin) (default: %(default)s)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="int8: post-training int8 quantization for --format onnx (static, calibrated on CIFAR-10 "
                             "training images from $NFNET_DATA_DIR: CIFAR-10 models only) or litert (dynamic range, "
                             "any model) (default: float32)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="export the model as trained, without folding weight standardization and scalars "
                             "into plain conv kernels")
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = _parse_args(argv)
    if args.quantize and args.format not in QUANTIZE_FORMATS:
        parser.error(f"--quantize {args.quantize} is for --format {' or '.join(QUANTIZE_FORMATS)}; --format "
                     f"{args.format} exports float32 only: drop --quantize or pick one of those formats.")
    if os.path.isfile(os.path.join(args.model, "saved_model.pb")):
        parser.error(f"--model {args.model} is a SavedModel already; export takes the .keras file written by "
                     "fit (e.g. runs/<run>/model.keras).")
    if not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file; pass the .keras file written by fit.")
    if args.version is not None and args.version < 1:
        parser.error(f"--version must be a positive integer, got {args.version}.")
    try:
        check_model_name(args.name)
    except ValueError as e:
        parser.error(str(e))
    # The flags are checked: now load the framework.
    from nfnet_keras import load_framework

    load_framework()
    import keras

    from nfnet_keras.saved_model import ExportError, export_saved_model

    try:
        model = keras.saving.load_model(args.model, compile=False)
    except Exception as e:  # not a .keras zip, unknown layer, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.error(f"--model {args.model} could not be loaded as a Keras model ({reason}).")
    from nfnet_keras.contract import read_class_names

    # The names fit wrote into the .keras file; without them, CIFAR-10's for 10 classes, else the class ids.
    class_names = read_class_names(args.model)
    try:
        if args.format == "saved_model":
            path = export_saved_model(model, args.name, args.version, args.base_dir, class_names, fold=args.fold)
        else:
            from nfnet_keras.export_formats import export_model

            path = export_model(model, args.name, args.format, args.version, args.base_dir, fold=args.fold,
                                quantize=args.quantize, class_names=class_names)
    except (ValueError, FileExistsError, ExportError, OSError) as e:
        parser.error(str(e))
    print(f"Exported {args.model} to {path}")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
