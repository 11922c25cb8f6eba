"""Export a model as ONNX, LiteRT (TFLite) or OpenVINO IR, as well as TF Serving's SavedModel.

Every format is written, like the SavedModel, as a new version folder
`<base_dir>/<name>/<version>/` (the layout of Triton's and OpenVINO Model
Server's model repositories too), atomically, and verified before it is
published. Each holds the model's inference twin (`fold_for_inference`) with
the serving contract of `nfnet_keras.contract` built into its graph:

    input:  image          uint8   [batch, height, width, 3]   (raw pixels; normalised inside)
    output: probabilities  float32 [batch, classes]

and `class_names.txt` (one per line, in class-id order) beside it. The
contract follows the model: its input's image size (32 x 32 for CIFAR-10)
and its classes, named as the `.keras` file names them (`nfnet-export` reads
them with `read_class_names`):

    onnx      model.onnx                 Keras' ONNX export (tf2onnx), run by onnxruntime
    litert    model.tflite               Keras' LiteRT export (TFLite converter), run by ai-edge-litert
    openvino  model.xml + model.bin      OpenVINO's converter from the ONNX file, float32 weights

`quantize="int8"` (`nfnet-export --quantize int8`, ONNX and LiteRT) writes
the same contract with int8 weights inside:

    onnx      onnxruntime.quantization.quantize_static, QDQ format: the convs'
              and the classifier's weights int8 per output channel, their
              inputs int8 with ranges calibrated (MinMax) on 512 CIFAR-10
              training images (`calibration_images`); GELU stays float.
              A model of other images or classes is refused (one line)
              unless `calibration` images of its own are passed
    litert    the TFLite converter's dynamic-range quantization: int8
              weights, activations quantized per call by the runtime

OpenVINO goes through ONNX rather than Keras' own OpenVINO export, which
converts the TensorFlow graph: that path fuses the tanh-approximated GELU into
OpenVINO's `Gelu` op, whose CPU kernel gave probabilities 7e-3 away from
Keras' (measured on `tiny_speed`; ReLU networks agreed to 1e-8), where the
ONNX path agrees to 2e-7.

Verification loads the written model in its own runtime in a fresh process
(`nfnet_keras.runtimes`) and compares its probabilities (within 1e-4) and class
ids with the Keras model's on CIFAR-10 test images (`$NFNET_DATA_DIR`; seeded
random pixels where there are none, and for a model of another image size or
other classes, at its image size). An int8 model's probabilities move by
more than that, so it is checked by the share of images whose class id equals
Keras' (at least `INT8_MIN_AGREEMENT`, among the images whose top two Keras
probabilities differ by more than `INT8_MARGIN`). A failed check publishes nothing.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np

from nfnet_keras import saved_model as export
from nfnet_keras.contract import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASS_NAMES,
    CLASS_NAMES_ASSET,
    IMAGE_SHAPE,
    INPUT,
    check_images,
    describe,
    is_cifar10,
    normalize,
)
from nfnet_keras.models.folding import fold_for_inference
from nfnet_keras.runtimes import INSTALL_HINT, RUNTIMES

FORMATS = ("saved_model", "onnx", "litert", "openvino")
# The modules writing each format needs (besides TensorFlow), and its runtime's, as pip packages.
REQUIREMENTS = {
    "onnx": (("tf2onnx", "tf2onnx"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
    "litert": (("ai_edge_litert", "ai-edge-litert"),),
    "openvino": (("tf2onnx", "tf2onnx"), ("onnx", "onnx"), ("openvino", "openvino")),
}
PROB_ATOL = 1e-4
VERIFY_IMAGES = 128
# --quantize: the formats that take it (nfnet_keras.export.QUANTIZE_FORMATS is the same list).
QUANTIZATIONS = ("int8",)
QUANTIZE_FORMATS = ("onnx", "litert")
CALIBRATION_IMAGES = 512
CALIBRATED = ("onnx",)  # the int8 exports whose activation ranges are calibrated on CIFAR-10 training images
# An int8 export must give Keras' class id on at least this share of the verification images whose top two
# Keras probabilities differ by more than INT8_MARGIN (closer ones are a coin toss under int8 noise).
# Measured: >= 99.6% on trained cifar_speed and tiny_speed networks (docs/serving.md); quantizing GELU's
# elementwise ops too gave 63% (all images).
INT8_MIN_AGREEMENT = 0.95
INT8_MARGIN = 0.05
INT8_VERIFY_IMAGES = 512


def check_format(fmt):
    """Returns `fmt` if it is one of `FORMATS`, else raises a one-line ValueError listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}. Use one of: {', '.join(FORMATS)}.")
    return fmt


def check_quantize(fmt, quantize):
    """Returns `quantize` (None or one of `QUANTIZATIONS`) if `fmt` takes it, else raises a one-line ValueError."""
    if quantize is None:
        return None
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantize!r}. Use one of: {', '.join(QUANTIZATIONS)}.")
    if fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"--quantize {quantize} is for --format {' or '.join(QUANTIZE_FORMATS)}; --format {fmt} "
                         "exports float32 only: drop --quantize or pick one of those formats.")
    return quantize


def missing_packages(fmt):
    """The pip packages that writing and verifying `fmt` needs and that are not installed."""
    return [package for module, package in REQUIREMENTS.get(fmt, ()) if importlib.util.find_spec(module) is None]


def serving_model(model, fold=True):
    """The model every format exports: uint8 pixels in, probabilities out, the inference twin inside.

    Args:
        model: keras.Model. Normalised images in, logits out (`build_model`'s).
        fold: bool. Use `fold_for_inference(model)` (else the model as it is,
            in float32). Defaults to `True`.

    Returns:
        A Functional `keras.Model` with the uint8 input `image` (batch, height,
        width, 3) of `model`'s image size (`export.image_shape_of`) that
        normalises as `nfnet_keras.data.preprocess` does and returns the
        float32 softmax probabilities.
    """
    image_shape = export.image_shape_of(model)
    core = export.float32_twin(model)
    if fold:
        core = fold_for_inference(core)
    inputs = keras.Input(image_shape, dtype="uint8", name=INPUT)
    x = keras.ops.cast(inputs, "float32") / 255.0
    x = (x - np.asarray(CIFAR10_MEAN, "float32")) / np.asarray(CIFAR10_STD, "float32")
    probabilities = keras.ops.softmax(keras.ops.cast(core(x), "float32"), axis=-1)
    serving = keras.Model(inputs, probabilities, name=f"{model.name}_serving")
    serving(np.zeros((1,) + image_shape, "uint8"))  # Keras exports only a model that has been called
    return serving


def verification_images(count=VERIFY_IMAGES, image_shape=IMAGE_SHAPE, class_names=CLASS_NAMES):
    """`(images, description)`: the images an export is checked on, for a model of `image_shape` and `class_names`.

    The first CIFAR-10 test images for a CIFAR-10 model (32 x 32, CIFAR-10's
    classes) where `$NFNET_DATA_DIR` holds them; else seeded random pixels
    of `image_shape`: the check compares the export with its Keras model, so
    any images of the model's size serve, and random ones need no data set.
    """
    from nfnet_keras.data import DataError, load_cifar10

    image_shape = tuple(image_shape)
    cifar10 = is_cifar10(image_shape, class_names)
    if cifar10 and os.environ.get("NFNET_DATA_DIR"):
        try:
            _, (x_test, _) = load_cifar10(test_only=True)
            return np.ascontiguousarray(x_test[:count]), f"{min(count, len(x_test))} CIFAR-10 test images"
        except DataError:
            pass
    images = np.random.default_rng(0).integers(0, 256, (count,) + image_shape, dtype=np.uint8)
    why = "no CIFAR-10" if cifar10 else f"{image_shape[0]} x {image_shape[1]}, not a CIFAR-10 model"
    return images, f"{count} random images ({why})"


def calibration_images(count=CALIBRATION_IMAGES, seed=0):
    """`count` CIFAR-10 training images drawn at random (seeded), for calibrating an int8 export.

    Raises:
        export.ExportError: CIFAR-10 cannot be read (the message says how to point at it).
    """
    from nfnet_keras.data import DataError, load_cifar10

    try:
        (x_train, _), _ = load_cifar10()
    except DataError as e:
        raise export.ExportError(f"--quantize int8 calibrates on CIFAR-10 training images, which could not be read "
                                 f"({e}); set NFNET_DATA_DIR to the folder holding cifar-10-batches-py/.") from e
    index = np.sort(np.random.default_rng(seed).choice(len(x_train), min(count, len(x_train)), replace=False))
    return np.ascontiguousarray(x_train[index])


def export_model(model, name, fmt="saved_model", version=None, base_dir="saved_models", verify=True, fold=True,
                 quantize=None, calibration=None, class_names=None):
    """Exports `model` as `<base_dir>/<name>/<version>/` in the format `fmt`.

    Args:
        model: keras.Model. Normalised images in, logits out (`build_model`'s).
        name: str. The model name (letters, digits, `.`, `_`, `-`).
        fmt: str. One of `FORMATS`. `"saved_model"` is `export_saved_model`'s
            TF Serving SavedModel. Defaults to `"saved_model"`.
        version: int or None. A new positive version; `None` takes the next.
        base_dir: str. The model repository. Defaults to `"saved_models"`.
        verify: bool. Run the written model in its runtime in a fresh process
            and compare it with `model` before publishing. Defaults to `True`.
        fold: bool. Export the inference twin (`fold_for_inference`). Defaults to `True`.
        quantize: None or `"int8"`. Post-training int8 quantization (ONNX
            and LiteRT only). Defaults to `None` (float32).
        calibration: uint8 array or None. The calibration images of an int8
            ONNX export, of the model's image size. Defaults to
            `calibration_images()` for a CIFAR-10 model; a model of other
            images or classes needs its own.
        class_names: sequence of str or None. The model's class names, in
            class-id order, written as `class_names.txt`. Defaults to `None`:
            `default_class_names` of its number of classes.

    Returns:
        The path of the new version folder.

    Raises:
        ValueError: a bad format, quantization, name, version or model.
        FileExistsError: the version exists already.
        export.ExportError: a package the format needs is missing, a backend
            other than TensorFlow, no CIFAR-10 to calibrate on (or a model of
            other images or classes without `calibration`), or the written
            model failed verification; nothing was published.
    """
    check_format(fmt)
    check_quantize(fmt, quantize)
    if fmt == "saved_model":
        return export.export_saved_model(model, name, version, base_dir, class_names, verify=verify, fold=fold)
    export.check_model_name(name)
    class_names = export._check_model(model, class_names)
    image_shape = export.image_shape_of(model)
    if keras.backend.backend() != "tensorflow":
        raise export.ExportError(
            f"--format {fmt} is written from a TensorFlow graph here; the {keras.backend.backend()} backend is "
            f"active: export with KERAS_BACKEND=tensorflow (the .keras file loads there unchanged)."
        )
    missing = missing_packages(fmt)
    if missing:
        raise export.ExportError(
            f"--format {fmt} needs {', '.join(missing)}, not installed: {INSTALL_HINT} "
            f"(or pip install {' '.join(missing)})."
        )
    if quantize and fmt in CALIBRATED:
        if calibration is not None:
            calibration = check_images(calibration, "calibration", shape=image_shape)
        elif not is_cifar10(image_shape, class_names):
            raise export.ExportError(
                f"--quantize int8 --format {fmt} calibrates on CIFAR-10 training images, and this model takes "
                f"{describe(image_shape, class_names)}: export it as float32 (drop --quantize), or as --format "
                "litert --quantize int8 (dynamic range: no calibration images).")
        else:
            calibration = calibration_images()
    serving = serving_model(model, fold)
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in serving.weights)

    def write(tmp_dir):
        path = os.path.join(tmp_dir, RUNTIMES[fmt][0])
        if quantize:
            _INT8_WRITERS[fmt](serving, path, calibration)
        else:
            _WRITERS[fmt](serving, path)
        with open(os.path.join(tmp_dir, CLASS_NAMES_ASSET), "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in class_names))
        if verify and quantize:
            check_int8_in_runtime(model, fmt, path, class_names=class_names)
        elif verify:
            check_in_runtime(model, fmt, path, class_names=class_names)

    return export.publish_version(os.path.join(base_dir, name), name, version, write,
                                  int(weight_bytes * 2.5) + (8 << 20))


def _write_onnx(serving, path):
    serving.export(path, format="onnx", verbose=False)


def _write_litert(serving, path):
    serving.export(path, format="litert", verbose=False)


def _write_openvino(serving, path):
    import openvino

    with tempfile.TemporaryDirectory(prefix="nfnet-export-onnx-") as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        _write_onnx(serving, onnx_path)
        ov_model = openvino.convert_model(onnx_path)
    ov_model.inputs[0].get_tensor().set_names({INPUT})
    openvino.save_model(ov_model, path, compress_to_fp16=False)  # its default halves the weights to float16


_WRITERS = {"onnx": _write_onnx, "litert": _write_litert, "openvino": _write_openvino}


INT8_OPS = ["Conv", "MatMul", "Gemm"]


def _write_onnx_int8(serving, path, calibration, batch_size=64):
    """Static int8 quantization of the float ONNX export, QDQ format, calibrated on `calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT: calibration[i:i + batch_size]}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="nfnet-export-onnx-") as tmp:
        float_path, prepared = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "prepared.onnx")
        _write_onnx(serving, float_path)
        quant_pre_process(float_path, prepared)  # shape inference and graph optimisation, as ORT advises
        # Only the convolutions and the classifier's matmul (the work): quantizing GELU's elementwise parts
        # (x^3, tanh, ...) each to int8 gave Keras' class id on only 63% of images (tiny_speed), these 96%.
        quantize_static(prepared, path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=INT8_OPS,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def _write_litert_int8(serving, path, calibration):
    """The TFLite converter's dynamic-range quantization: int8 weights, activations quantized per call.

    Full-integer quantization (int8 activations, `calibration` as the
    representative data set) gave Keras' class id on only 91% of images
    (tiny_speed; its int8 softmax ties the top two classes on 3%), this 99%:
    it needs no calibration, so `calibration` is unused.
    """
    import tensorflow as tf

    serving.export(path, format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT])


_INT8_WRITERS = {"onnx": _write_onnx_int8, "litert": _write_litert_int8}


# The verifying process imports `nfnet_keras.runtimes` (NumPy and the runtime) and not the package's
# `__init__`, which imports TensorFlow: the check sees the runtime alone, and starts in a second.
_CHILD = """
import sys, types
package = types.ModuleType("nfnet_keras")
package.__path__ = [sys.argv[1]]
sys.modules["nfnet_keras"] = package
from nfnet_keras.runtimes import _verify_child
sys.exit(_verify_child(sys.argv[2:]))
"""


def _verification_images(model, count, class_names):
    return verification_images(count, export.image_shape_of(model), export._check_model(model, class_names))


def _keras_probabilities(model, images):
    reference = export.float32_twin(model)
    logits = reference.predict(normalize(images), batch_size=256, verbose=0)
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))


def _runtime_probabilities(fmt, path, images, expected_shape):
    """The probabilities of `path` on `images`, run in its runtime in a fresh process."""
    runtime = RUNTIMES[fmt][2]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    with tempfile.TemporaryDirectory(prefix="nfnet-verify-") as tmp:
        images_path, out_path = os.path.join(tmp, "images.npy"), os.path.join(tmp, "probabilities.npy")
        np.save(images_path, images)
        proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(os.path.abspath(__file__)), path,
                               images_path, out_path], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out_path):
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise export.ExportError(f"The exported {fmt} model failed in {runtime} (exit status {proc.returncode}: "
                                     f"{lines[-1] if lines else 'no message'}); not published.")
        got = np.load(out_path)
    if got.shape != expected_shape:
        raise export.ExportError(f"The exported {fmt} model returned shape {got.shape} in {runtime}, expected "
                                 f"{expected_shape}; not published.")
    return got


def check_in_runtime(model, fmt, path, images=None, atol=PROB_ATOL, class_names=None):
    """Runs the exported `path` in its runtime in a fresh process and compares it with `model`.

    Args:
        model: keras.Model. The model that was exported (logits out).
        fmt: str. The format of `path`.
        path: str. The written model file.
        images: uint8 array or None. Defaults to `verification_images()` of
            the model's image size and `class_names`.
        atol: float. Largest allowed probability difference. Defaults to `1e-4`.
        class_names: sequence of str or None. The model's class names (which
            verification images to take). Defaults to `default_class_names`.

    Returns:
        The largest absolute probability difference.

    Raises:
        export.ExportError: the runtime failed, or its probabilities or class
            ids differ from the Keras model's.
    """
    described = "the given images"
    if images is None:
        images, described = _verification_images(model, VERIFY_IMAGES, class_names)
    expected = _keras_probabilities(model, images)
    runtime = RUNTIMES[fmt][2]
    got = _runtime_probabilities(fmt, path, images, expected.shape)
    error = float(np.max(np.abs(got - expected)))
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol  # ids are compared where the top two are not tied within atol
    disagree = int(np.sum(np.argmax(got, -1)[clear] != np.argmax(expected, -1)[clear]))
    if not error <= atol or disagree:
        raise export.ExportError(
            f"The exported {fmt} model's probabilities in {runtime} differ from the Keras model's by {error:.2e} "
            f"(> {atol}) on {described}, {disagree} class ids differ; not published."
        )
    print(f"Verified {fmt} in {runtime} on {described}: probabilities within {error:.1e} of Keras', "
          "class ids equal.")
    return error


def check_int8_in_runtime(model, fmt, path, images=None, min_agreement=INT8_MIN_AGREEMENT, class_names=None):
    """Runs the int8 `path` in its runtime in a fresh process; its class ids must mostly equal `model`'s.

    Args:
        model: keras.Model. The float model that was quantized (logits out).
        fmt: str. The format of `path`.
        path: str. The written model file.
        images: uint8 array or None. Defaults to `verification_images` of
            `INT8_VERIFY_IMAGES`, the model's image size and `class_names`.
        min_agreement: float. The smallest share of images with Keras' class id.
            Defaults to `INT8_MIN_AGREEMENT`.
        class_names: sequence of str or None. As `check_in_runtime`'s.

    Returns:
        The share of images whose class id equals Keras', among those whose
        top two Keras probabilities differ by more than `INT8_MARGIN` (all
        images where none do).

    Raises:
        export.ExportError: the runtime failed, or fewer class ids agree.
    """
    described = "the given images"
    if images is None:
        images, described = _verification_images(model, INT8_VERIFY_IMAGES, class_names)
    expected = _keras_probabilities(model, images)
    runtime = RUNTIMES[fmt][2]
    got = _runtime_probabilities(fmt, path, images, expected.shape)
    equal = np.argmax(got, -1) == np.argmax(expected, -1)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > INT8_MARGIN
    agreement = float(np.mean(equal[clear])) if clear.any() else float(np.mean(equal))
    error = float(np.max(np.abs(got - expected)))
    if not agreement >= min_agreement:
        raise export.ExportError(
            f"The exported int8 {fmt} model gives the Keras model's class id in {runtime} on {agreement:.1%} of "
            f"{described} where Keras' top two probabilities differ by more than {INT8_MARGIN} "
            f"({int(clear.sum())} images) (< {min_agreement:.0%}); not published."
        )
    print(f"Verified int8 {fmt} in {runtime} on {described}: class ids equal to Keras' on {agreement:.1%} of the "
          f"{int(clear.sum())} with a clear top class, {np.mean(equal):.1%} of all (probabilities within "
          f"{error:.1e}).")
    return agreement
