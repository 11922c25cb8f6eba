"""A model as a TF Serving SavedModel: `saved_models/<name>/<version>/`.

The exported signature `serving_default` takes raw pixels and does the
normalisation itself:

    inputs:  image          uint8   [batch, 32, 32, 3]  (a model trained on other images: their size)
    outputs: probabilities  float32 [batch, 10]         (one per class: the model's number of classes)
             class_id       int64   [batch]

The graph is the model's inference twin (`fold_for_inference`): plain convs
with weight standardization, gains and scalars folded into their kernels. The
class names ship as the asset `assets/class_names.txt` (one per line, in
class-id order). The graph holds only standard TensorFlow ops and nothing
XLA-compiled: TF Serving disables XLA by default and refuses such a model.

A version is written to a hidden temporary directory beside the versions and
renamed into place only when complete and verified, so a serving process never
sees a half-written version; an existing version is never overwritten.

Other formats (ONNX, LiteRT, OpenVINO IR): `nfnet_keras.export_formats`. The
command is `nfnet-export` (`nfnet_keras.export`).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from nfnet_keras import fileio
from nfnet_keras.contract import (
    CLASS_ID,
    CLASS_NAMES_ASSET,
    IMAGE_SHAPE,
    INPUT,
    PROBABILITIES,
    SIGNATURE,
    check_model_name,
    default_class_names,
)
from nfnet_keras.data import preprocess
from nfnet_keras.models.folding import fold_for_inference

_TMP_PREFIX = ".export-tmp-"  # not a number: TF Serving ignores it
_VERSION_RE = re.compile(r"[0-9]+")


class ExportError(RuntimeError):
    """The written SavedModel would not serve; nothing was published."""


def existing_versions(model_dir):
    """Returns the sorted version numbers under `model_dir` (numeric subdirectories)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if _VERSION_RE.fullmatch(d))


def next_version(model_dir):
    """The version `export_saved_model` picks by default: one past the highest, or 1."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


_LOW_PRECISION = ("mixed_bfloat16", "mixed_float16", "bfloat16", "float16")


def _float32_config(obj):
    """A copy of a serialized Keras config with every low-precision dtype policy set to float32."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "dtype" and isinstance(value, str) and value in _LOW_PRECISION:
                value = "float32"
            elif (key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy"
                  and value.get("config", {}).get("name") in _LOW_PRECISION):
                value = {**value, "config": {**value["config"], "name": "float32"}}
            out[key] = _float32_config(value)
        return out
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    return obj


def float32_twin(model):
    """`model` itself if it computes in float32, else a float32 copy with the same weights.

    A model trained under `mixed_bfloat16` / `mixed_float16` keeps float32
    variables; its serving form computes in float32 too (TF Serving's CPUs may
    lack bfloat16, and the export's check compares within 1e-4).
    """
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model
    config = _float32_config(keras.saving.serialize_keras_object(model))
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # sublayers built inside build() take the global policy
    try:
        twin = keras.saving.deserialize_keras_object(config)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    twin.set_weights(model.get_weights())
    return twin


def export_saved_model(
    model,
    name,
    version=None,
    base_dir="saved_models",
    class_names=None,
    verify=True,
    fold=True,
):
    """Exports `model` for TF Serving as `<base_dir>/<name>/<version>/`.

    Args:
        model: keras.Model. Takes normalised float images `(batch, height,
            width, 3)` (see `nfnet_keras.preprocess`) and returns logits, as
            `nfnet_keras.build_model` does; the export takes its image size.
        name: str. The model name TF Serving serves it under (letters, digits,
            `.`, `_`, `-`).
        version: int or None. A positive version number; `None` takes the next
            one. Defaults to `None`.
        base_dir: str. The folder TF Serving watches (one subfolder per model).
            Defaults to `"saved_models"`.
        class_names: sequence of str or None. The class names, in class-id
            order, shipped as the asset `class_names.txt`. Defaults to `None`:
            `default_class_names` of the model's number of classes (CIFAR-10's
            for 10, else the class ids).
        verify: bool. Before publishing, check the graph for XLA-compiled and
            non-standard ops, reload it and compare its probabilities with the
            Keras model's on a few images. Defaults to `True`.
        fold: bool. Export the inference twin of `fold_for_inference` (plain
            convs, weight standardization and scalars folded into the kernels);
            the check compares it with `model` itself. Defaults to `True`.

    A mixed-precision model is exported as its float32 twin (`float32_twin`):
    the same weights, computing in float32.

    Returns:
        The path of the new version directory.

    Raises:
        ValueError: a bad name, version or model.
        FileExistsError: the version exists already (it is never overwritten).
        ExportError: the written SavedModel failed verification.

    Example:

    >>> model = nfnet_keras.build_model("tiny")
    >>> export_saved_model(model, "nfnet", base_dir=str(tmp_path))  # doctest: +SKIP
    '.../nfnet/1'
    """
    check_model_name(name)
    class_names = _check_model(model, class_names)
    if keras.backend.backend() != "tensorflow":
        return _export_with_tensorflow(model, name, version, base_dir, class_names, verify, fold)
    model = float32_twin(model)
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)

    def write(tmp_dir):
        _write_saved_model(fold_for_inference(model) if fold else model, tmp_dir, class_names)
        if verify:
            problems = servability_problems(tmp_dir)
            if problems:
                raise ExportError(
                    "The exported graph would not load in TF Serving (XLA off by default): "
                    + "; ".join(problems[:5])
                    + ". Use layers that avoid XLA-compiled ops (e.g. WSConv2D for grouped convs)."
                )
            _check_outputs(model, tmp_dir)

    return publish_version(os.path.join(base_dir, name), name, version, write, int(weight_bytes * 1.2) + (8 << 20))


def publish_version(model_dir, name, version, write, size_bytes):
    """Writes a new version folder `<model_dir>/<version>/` atomically: all of it, or nothing.

    `write(tmp_dir)` writes (and checks) the version in a hidden temporary
    folder beside the versions, which is renamed into place only when it
    returns; on any error the temporary folder is removed.

    Args:
        model_dir: str. The model's folder (`<base_dir>/<name>`).
        name: str. The model name, for the messages.
        version: int or None. A positive version number; `None` takes the next one.
        write: function of the temporary folder's path.
        size_bytes: int. The free space the version needs.

    Returns:
        The path of the new version folder.

    Raises:
        ValueError: a bad version.
        FileExistsError: the version exists already (it is never overwritten).
    """
    if version is None:
        version = next_version(model_dir)
    elif isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"The version must be a positive integer, got {version!r}.")
    version = int(version)
    if version in existing_versions(model_dir):
        raise FileExistsError(
            f"Version {version} of model {name!r} exists already in {model_dir}; versions are "
            f"never overwritten. Pass a new --version or omit it to take the next "
            f"({next_version(model_dir)})."
        )
    final_dir = os.path.join(model_dir, str(version))

    os.makedirs(model_dir, exist_ok=True)
    for stale in stale_exports(model_dir):
        shutil.rmtree(stale, ignore_errors=True)
        print(f"Removed {stale}, left by an interrupted export.")
    fileio.check_free_space(model_dir, size_bytes, final_dir)
    # In the same folder, so that the final rename is atomic (same file system).
    tmp_dir = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=model_dir)
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp's 0700 would hide it from a server run as another user
        write(tmp_dir)
        if os.path.exists(final_dir):  # another exporter was faster
            raise FileExistsError(
                f"Version {version} of model {name!r} appeared in {model_dir} during the export; "
                "versions are never overwritten. Export again to take the next version."
            )
        os.rename(tmp_dir, final_dir)
    except OSError as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, FileExistsError):
            raise
        raise fileio.describe_write_error(e, final_dir) from e
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir


# === Other Keras backends ===

# Under JAX, Keras exports through jax2tf, and jax2tf (JAX 0.10) writes the
# whole model as one `XlaCallModule` op, which a TF Serving model server (XLA
# off by default) cannot run and `servability_problems` refuses. A model of
# another backend is therefore saved as a .keras file and exported by this
# same code in a child process under the TensorFlow backend: the same graph,
# the same checks.
_CHILD = "import sys\nfrom nfnet_keras.saved_model import _export_request\nsys.exit(_export_request(sys.argv[1]))\n"
_CHILD_ERRORS = {cls.__name__: cls for cls in (ValueError, FileExistsError, ExportError, fileio.WriteError, OSError)}


def _export_with_tensorflow(model, name, version, base_dir, class_names, verify, fold=True):
    """`export_saved_model` of a non-TensorFlow backend's model, run under `KERAS_BACKEND=tensorflow`."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="nfnet-export-") as tmp:
        request = dict(model=os.path.join(tmp, "model.keras"), result=os.path.join(tmp, "result.json"), name=name,
                       version=None if version is None else _plain_version(version), base_dir=base_dir,
                       class_names=list(class_names), verify=bool(verify), fold=bool(fold))
        model.save(request["model"])
        request_path = os.path.join(tmp, "request.json")
        with open(request_path, "w") as f:
            json.dump(request, f)
        proc = subprocess.run([sys.executable, "-c", _CHILD, request_path], env=env, capture_output=True, text=True)
        if proc.stdout:
            print(proc.stdout, end="", flush=True)
        result = fileio.read_json(request["result"], default=None) or {}
    if "path" in result:
        return result["path"]
    if "error" in result:
        raise _CHILD_ERRORS.get(result["error"], ExportError)(result["message"])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    raise ExportError(f"the export under the TensorFlow backend failed (exit status {proc.returncode}: "
                      f"{lines[-1] if lines else 'no message'}); export the saved .keras file with "
                      f"KERAS_BACKEND=tensorflow python -m nfnet_keras.export --model MODEL.keras --name {name}.")


def _plain_version(version):
    if isinstance(version, (int, np.integer)) and not isinstance(version, bool):
        return int(version)
    raise ValueError(f"The version must be a positive integer, got {version!r}.")


def _export_request(request_path):
    """The child process of `_export_with_tensorflow`: exports and writes the path or the error."""
    with open(request_path) as f:
        request = json.load(f)
    try:
        model = keras.saving.load_model(request["model"], compile=False)
        path = export_saved_model(model, request["name"], request["version"], request["base_dir"],
                                  tuple(request["class_names"]), request["verify"], request.get("fold", True))
        result = dict(path=path)
    except tuple(_CHILD_ERRORS.values()) as e:
        kind = next(cls.__name__ for cls in type(e).__mro__ if cls.__name__ in _CHILD_ERRORS)
        result = dict(error=kind, message=str(e))
    fileio.write_json(request["result"], result)
    return 0


def stale_exports(model_dir):
    """Temporary export folders under `model_dir` whose exporting process is no longer alive."""
    found = []
    if not os.path.isdir(model_dir):
        return found
    for name in os.listdir(model_dir):
        # No owner recorded: nobody can be writing it.
        if fileio.left_by_dead_process(name, _TMP_PREFIX, unowned_is_stale=True):
            found.append(os.path.join(model_dir, name))
    return found


def image_shape_of(model):
    """The `(height, width, 3)` images the export of `model` takes: its input's, a `None` size taken as CIFAR-10's."""
    return tuple(s if s is not None else d for s, d in zip(tuple(model.input_shape)[1:], IMAGE_SHAPE))


def _check_model(model, class_names=None):
    """The class names of `model` (`class_names`, or `default_class_names` of its classes), or a ValueError."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"Expected a keras.Model, got {type(model).__name__}.")
    try:
        in_shape = tuple(model.input_shape)
        out_shape = tuple(model.output_shape)
    except (AttributeError, ValueError) as e:
        raise ValueError(f"The model has no single input/output shape ({e}); build it first.") from e
    if len(in_shape) != 4 or in_shape[-1] != 3:
        raise ValueError(f"The model must take RGB images of shape (batch, height, width, 3), got input shape "
                         f"{in_shape}.")
    if class_names is None and len(out_shape) == 2 and out_shape[-1]:
        class_names = default_class_names(out_shape[-1])
    if class_names is None or len(out_shape) != 2 or out_shape[-1] != len(class_names):
        expected = "classes" if class_names is None else len(class_names)
        raise ValueError(
            f"The model must return (batch, {expected}) logits, one per class name, "
            f"got output shape {out_shape}."
        )
    return tuple(class_names)


def _write_saved_model(model, path, class_names):
    image_shape = image_shape_of(model)

    @tf.function(
        input_signature=[tf.TensorSpec((None,) + image_shape, tf.uint8, name=INPUT)],
        jit_compile=False,  # TF Serving runs without XLA
        autograph=False,
    )
    def serve(image):
        # The placeholder's static shape is not checked by TF Serving's C++ session:
        # check it in the graph for a clear INVALID_ARGUMENT error.
        image = tf.ensure_shape(image, (None,) + image_shape)
        logits = model(preprocess(image), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {PROBABILITIES: probabilities, CLASS_ID: class_id}

    signature = serve.get_concrete_function()
    root = tf.Module()
    root.serve = serve
    # Track the tf.Variables the graph captures, not the Keras wrappers of
    # `model.variables`: with those, tf.saved_model.load works but the C++
    # loader (TF Serving) restores variables the graph does not read.
    root.model_variables = list(signature.variables)
    with tempfile.TemporaryDirectory() as names_dir:
        names_path = os.path.join(names_dir, CLASS_NAMES_ASSET)
        with open(names_path, "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in class_names))
        root.class_names = tf.saved_model.Asset(names_path)  # copied into assets/
        tf.saved_model.save(root, path, signatures={SIGNATURE: signature})


def servability_problems(path):
    """Lists what would stop TF Serving (XLA off, stock ops) from loading a SavedModel.

    Scans the graph and its function library for XLA ops (`XlaCallModule`,
    `_XlaCompile`, ...), functions marked `_XlaMustCompile` and ops that are
    not standard TensorFlow ops.

    Returns:
        A list of one-line descriptions; empty if none.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    problems = []

    def xla_attrs(where, attrs):
        for key, value in attrs.items():
            if key.startswith("_Xla") and value.b:
                problems.append(f"{where} has {key}=true")

    for meta_graph in saved_model.meta_graphs:
        library = meta_graph.graph_def.library
        functions = {f.signature.name for f in library.function}
        nodes = [("graph", node) for node in meta_graph.graph_def.node]
        for function in library.function:
            xla_attrs(f"function {function.signature.name}", function.attr)
            nodes += [(f"function {function.signature.name}", node) for node in function.node_def]
        for where, node in nodes:
            if "xla" in node.op.lower():
                problems.append(f"{where} runs the XLA op {node.op}")
            elif node.op not in functions and not hasattr(tf.raw_ops, node.op):
                problems.append(f"{where} runs the non-standard op {node.op}")
            xla_attrs(f"node {node.name} ({node.op}) in {where}", node.attr)
    return sorted(set(problems))


def _check_outputs(model, path, atol=1e-4):
    images = np.random.default_rng(0).integers(0, 256, (4,) + image_shape_of(model), dtype=np.uint8)
    expected = tf.nn.softmax(tf.cast(model(preprocess(images), training=False), tf.float32))
    outputs = tf.saved_model.load(path).signatures[SIGNATURE](**{INPUT: tf.constant(images)})
    error = float(np.max(np.abs(outputs[PROBABILITIES].numpy() - expected.numpy())))
    if not error <= atol:
        raise ExportError(
            f"The exported model's probabilities differ from the Keras model's by {error:.2e} "
            f"(> {atol}); not published."
        )


# === Command line ===
