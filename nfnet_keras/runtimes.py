"""Running an exported model in its own runtime: ONNX Runtime, the LiteRT interpreter, OpenVINO.

Every loader returns `predict(uint8 images N x H x W x 3) -> float32
probabilities N x classes`, the contract of `nfnet_keras.contract`: the
exported graphs normalise the pixels themselves. The image size is the
exported graph's input's (32 x 32 for CIFAR-10), the class names those of the
`class_names.txt` an export writes beside its model file. The runtimes are the
optional extra `nfnet-keras[export]`; a missing one is a one-line
`RuntimeMissing` naming the package to install. Imports no TensorFlow.
"""

import importlib.util
import os
import sys

import numpy as np

from nfnet_keras.contract import (
    CLASS_NAMES_ASSET,
    InputError,
    check_images,
    default_class_names,
    read_class_names_file,
)

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
        `predict(uint8 images N x H x W x 3) -> float32 probabilities N x
        classes`, with the attributes `image_shape` (`(H, W, 3)`, the model
        input's) and `class_names` (the `class_names.txt` beside the model
        file; without one, `default_class_names` of its number of classes).
        It raises `InputError` for images of another size.

    Raises:
        InputError: not such a model, a file the runtime cannot read, or a
            `class_names.txt` naming another number of classes.
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
        run, input_shape, output_shape = _LOADERS[fmt](file, threads)
    except Exception as e:  # a corrupt or foreign file: each runtime raises its own error type
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--model {path} could not be loaded by {RUNTIMES[fmt][2]} ({reason[:300]}).") from e
    image_shape = _image_shape(input_shape)
    if image_shape is None or len(output_shape) != 2:
        raise InputError(f"--model {path} takes {_shape(input_shape)} and returns {_shape(output_shape)}; expected "
                         "uint8 images (batch, height, width, 3) in and probabilities (batch, classes) out, as "
                         "nfnet-export writes.")
    num_classes = output_shape[-1]
    names_path = os.path.join(os.path.dirname(file), CLASS_NAMES_ASSET)
    class_names = read_class_names_file(names_path)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise InputError(f"--model {path} returns {num_classes} class probabilities but {names_path} names "
                         f"{len(class_names)} classes: it is not the class_names.txt of this export.")
    if class_names is None and num_classes is None:
        raise InputError(f"--model {path} does not say its number of classes and has no {CLASS_NAMES_ASSET} beside "
                         "it; export it again with nfnet-export.")

    def predict(images):
        images = check_images(images, shape=image_shape)
        out = [run(np.ascontiguousarray(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return (np.concatenate(out).astype(np.float32) if out
                else np.zeros((0, len(predict.class_names)), np.float32))

    predict.image_shape = image_shape
    predict.class_names = class_names or default_class_names(num_classes)
    return predict


def _dim(d):
    """A dimension as an int, or None where the runtime gives a name, -1 or nothing (dynamic)."""
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def _image_shape(input_shape):
    """`(height, width, 3)` of an input shape `(batch, height, width, 3)`, or None if it is not one."""
    if len(input_shape) != 4 or input_shape[-1] not in (3, None):
        return None
    return (input_shape[1], input_shape[2], 3)


def _shape(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _onnx(path, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    return (lambda images: session.run(None, {inp.name: images})[0],
            tuple(_dim(d) for d in inp.shape), tuple(_dim(d) for d in out.shape))


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

    return (run, tuple(_dim(d) for d in inp["shape_signature"]), tuple(_dim(d) for d in out["shape_signature"]))


def _openvino(path, threads):
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin's default is bf16 where the CPU has it
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(path, "CPU", config)
    request = compiled.create_infer_request()

    def run(images):
        request.infer({0: images})
        return request.get_output_tensor(0).data.copy()

    def shape(port):
        return tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())

    return run, shape(compiled.input(0)), shape(compiled.output(0))


_LOADERS = {"onnx": _onnx, "litert": _litert, "openvino": _openvino}


def _verify_child(argv):
    """`python -c ... MODEL IMAGES.npy OUT.npy`: the probabilities of a fresh runtime, for the export's check."""
    model, images, out = argv
    np.save(out, load_runtime(model)(np.load(images)))
    return 0


if __name__ == "__main__":
    sys.exit(_verify_child(sys.argv[1:]))
