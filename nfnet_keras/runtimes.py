"""Running an exported model in its own runtime: ONNX Runtime, the LiteRT interpreter, OpenVINO.

Every loader returns `predict(uint8 images N x 32 x 32 x 3) -> float32
probabilities N x 10`, the contract of `nfnet_keras.contract`: the exported
graphs normalise the pixels themselves. The runtimes are the optional extra
`nfnet-keras[export]`; a missing one is a one-line `RuntimeMissing` naming the
package to install. Imports no TensorFlow.
"""

import importlib.util
import os
import sys

import numpy as np

from nfnet_keras.contract import NUM_CLASSES, InputError, check_images

# format -> (the file an export writes in its version folder, the module that runs it, its pip package)
RUNTIMES = {
    "onnx": ("model.onnx", "onnxruntime", "onnxruntime"),
    "litert": ("model.tflite", "ai_edge_litert", "ai-edge-litert"),
    "openvino": ("model.xml", "openvino", "openvino"),
}
EXTENSIONS = {os.path.splitext(file)[1]: fmt for fmt, (file, _, _) in RUNTIMES.items()}
INSTALL_HINT = "pip install 'nfnet-keras[export]'"


class RuntimeMissing(InputError):
    """The runtime of an exported model is not installed; the message names the package."""


def format_of(path):
    """The format of a model file (`.onnx`, `.tflite`, OpenVINO `.xml`), or of a version folder holding one.

    Returns:
        `(format, file)`, or `(None, None)` if `path` is neither.
    """
    if os.path.isdir(path):
        found = [(fmt, os.path.join(path, file)) for fmt, (file, _, _) in RUNTIMES.items()
                 if os.path.isfile(os.path.join(path, file))]
        return found[0] if len(found) == 1 else (None, None)
    fmt = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    return (fmt, path) if fmt else (None, None)


def check_runtime(fmt, where):
    """Raises `RuntimeMissing` unless the runtime of `fmt` can be imported."""
    _, module, package = RUNTIMES[fmt]
    if importlib.util.find_spec(module) is None:
        raise RuntimeMissing(f"{where} is a {fmt} model and needs its runtime {package}, which is not installed: "
                             f"{INSTALL_HINT} (or pip install {package}).")


def load_runtime(path, threads=None, batch_size=256):
    """Loads an exported `.onnx`, `.tflite` or OpenVINO `.xml` model (or a version folder holding one).

    Args:
        path: str. The model file, or the `<name>/<version>/` folder an export wrote.
        threads: int or None. CPU threads the runtime may use; `None`: its default.
        batch_size: int. Images per runtime call. Defaults to `256`.

    Returns:
        `predict(uint8 images N x 32 x 32 x 3) -> float32 probabilities N x 10`.

    Raises:
        InputError: not such a model, or a file the runtime cannot read.
        RuntimeMissing: the runtime is not installed.
    """
    fmt, file = format_of(path)
    if fmt is None:
        raise InputError(f"--model {path} is not an .onnx, .tflite or OpenVINO .xml model (nor a folder holding "
                         "one model.onnx, model.tflite or model.xml).")
    if not os.path.isfile(file):
        raise InputError(f"--model {path}: no such file.")
    check_runtime(fmt, f"--model {path}")
    try:
        run = _LOADERS[fmt](file, threads)
    except Exception as e:  # a corrupt or foreign file: each runtime raises its own error type
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {path} could not be loaded by {RUNTIMES[fmt][2]} ({reason[:300]}).") from e

    def predict(images):
        images = check_images(images)
        out = [run(np.ascontiguousarray(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, NUM_CLASSES), np.float32)

    return predict


def _onnx(path, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _litert(path, threads):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=int(threads) if threads else None)
    (inp,), out = interpreter.get_input_details(), interpreter.get_output_details()[0]
    shape = [None]

    def run(images):
        if shape[0] != images.shape:  # the batch dimension is dynamic: resize the input once per batch size
            interpreter.resize_tensor_input(inp["index"], images.shape)
            interpreter.allocate_tensors()
            shape[0] = images.shape
        interpreter.set_tensor(inp["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    return run


def _openvino(path, threads):
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin's default is bf16 where the CPU has it
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    request = core.compile_model(path, "CPU", config).create_infer_request()

    def run(images):
        request.infer({0: images})
        return request.get_output_tensor(0).data.copy()

    return run


_LOADERS = {"onnx": _onnx, "litert": _litert, "openvino": _openvino}


def _verify_child(argv):
    """`python -c ... MODEL IMAGES.npy OUT.npy`: the probabilities of a fresh runtime, for the export's check."""
    model, images, out = argv
    np.save(out, load_runtime(model)(np.load(images)))
    return 0


if __name__ == "__main__":
    sys.exit(_verify_child(sys.argv[1:]))
