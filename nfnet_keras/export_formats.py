"""Export a model as ONNX, LiteRT (TFLite) or OpenVINO IR, as well as TF Serving's SavedModel.

Every format is written, like the SavedModel, as a new version folder
`<base_dir>/<name>/<version>/` (the layout of Triton's and OpenVINO Model
Server's model repositories too), atomically, and verified before it is
published. Each holds the model's inference twin (`fold_for_inference`) with
the serving contract of `nfnet_keras.contract` built into its graph:

    input:  image          uint8   [batch, 32, 32, 3]   (raw pixels; normalised inside)
    output: probabilities  float32 [batch, 10]

and `class_names.txt` (one per line, in class-id order) beside it:

    onnx      model.onnx                 Keras' ONNX export (tf2onnx), run by onnxruntime
    litert    model.tflite               Keras' LiteRT export (TFLite converter), run by ai-edge-litert
    openvino  model.xml + model.bin      OpenVINO's converter from the ONNX file, float32 weights

OpenVINO goes through ONNX rather than Keras' own OpenVINO export, which
converts the TensorFlow graph: that path fuses the tanh-approximated GELU into
OpenVINO's `Gelu` op, whose CPU kernel gave probabilities 7e-3 away from
Keras' (measured on `tiny_speed`; ReLU networks agreed to 1e-8), where the
ONNX path agrees to 2e-7.

Verification loads the written model in its own runtime in a fresh process
(`nfnet_keras.runtimes`) and compares its probabilities (within 1e-4) and class
ids with the Keras model's on CIFAR-10 test images (`$NFNET_DATA_DIR`; seeded
random pixels where there are none). A failed check publishes nothing.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np

from nfnet_keras import saved_model as export
from nfnet_keras.contract import CLASS_NAMES, CLASS_NAMES_ASSET, IMAGE_SHAPE, INPUT
from nfnet_keras.data import CIFAR10_MEAN, CIFAR10_STD
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


def check_format(fmt):
    """Returns `fmt` if it is one of `FORMATS`, else raises a one-line ValueError listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}. Use one of: {', '.join(FORMATS)}.")
    return fmt


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
        A Functional `keras.Model` with the uint8 input `image` (batch, 32, 32, 3)
        that normalises as `nfnet_keras.data.preprocess` does and returns the
        float32 softmax probabilities.
    """
    core = export.float32_twin(model)
    if fold:
        core = fold_for_inference(core)
    inputs = keras.Input(IMAGE_SHAPE, dtype="uint8", name=INPUT)
    x = keras.ops.cast(inputs, "float32") / 255.0
    x = (x - np.asarray(CIFAR10_MEAN, "float32")) / np.asarray(CIFAR10_STD, "float32")
    probabilities = keras.ops.softmax(keras.ops.cast(core(x), "float32"), axis=-1)
    serving = keras.Model(inputs, probabilities, name=f"{model.name}_serving")
    serving(np.zeros((1,) + IMAGE_SHAPE, "uint8"))  # Keras exports only a model that has been called
    return serving


def verification_images(count=VERIFY_IMAGES):
    """`(images, description)`: the first CIFAR-10 test images, or seeded random pixels without the data set."""
    from nfnet_keras.data import DataError, load_cifar10

    if os.environ.get("NFNET_DATA_DIR"):
        try:
            _, (x_test, _) = load_cifar10(test_only=True)
            return np.ascontiguousarray(x_test[:count]), f"{min(count, len(x_test))} CIFAR-10 test images"
        except DataError:
            pass
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count,) + IMAGE_SHAPE, dtype=np.uint8), f"{count} random images (no CIFAR-10)"


def export_model(model, name, fmt="saved_model", version=None, base_dir="saved_models", verify=True, fold=True):
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

    Returns:
        The path of the new version folder.

    Raises:
        ValueError: a bad format, name, version or model.
        FileExistsError: the version exists already.
        export.ExportError: a package the format needs is missing, a backend
            other than TensorFlow, or the written model failed verification;
            nothing was published.
    """
    check_format(fmt)
    if fmt == "saved_model":
        return export.export_saved_model(model, name, version, base_dir, verify=verify, fold=fold)
    export.check_model_name(name)
    export._check_model(model, CLASS_NAMES)
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
    serving = serving_model(model, fold)
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in serving.weights)

    def write(tmp_dir):
        path = os.path.join(tmp_dir, RUNTIMES[fmt][0])
        _WRITERS[fmt](serving, path)
        with open(os.path.join(tmp_dir, CLASS_NAMES_ASSET), "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in CLASS_NAMES))
        if verify:
            check_in_runtime(model, fmt, path)

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


def check_in_runtime(model, fmt, path, images=None, atol=PROB_ATOL):
    """Runs the exported `path` in its runtime in a fresh process and compares it with `model`.

    Args:
        model: keras.Model. The model that was exported (logits out).
        fmt: str. The format of `path`.
        path: str. The written model file.
        images: uint8 array or None. Defaults to `verification_images()`.
        atol: float. Largest allowed probability difference. Defaults to `1e-4`.

    Returns:
        The largest absolute probability difference.

    Raises:
        export.ExportError: the runtime failed, or its probabilities or class
            ids differ from the Keras model's.
    """
    described = "the given images"
    if images is None:
        images, described = verification_images()
    reference = export.float32_twin(model)
    x = (images.astype("float32") / 255.0 - np.asarray(CIFAR10_MEAN, "float32")) / np.asarray(CIFAR10_STD, "float32")
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(reference(x, training=False), axis=-1))
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
    if got.shape != expected.shape:
        raise export.ExportError(f"The exported {fmt} model returned shape {got.shape} in {runtime}, expected "
                                 f"{expected.shape}; not published.")
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
