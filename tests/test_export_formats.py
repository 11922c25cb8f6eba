"""Tests of the folded inference twin and of the ONNX / LiteRT / OpenVINO exports, each run in its own runtime."""

import collections
import importlib.util
import os
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from nfnet_keras import export, export_formats, predict, runtimes
from nfnet_keras.contract import CLASS_NAMES, InputError, write_class_names
from nfnet_keras.data import load_cifar10, preprocess
from nfnet_keras.inference import load_predictor
from nfnet_keras.layers.wsconv import WSConv2D
from nfnet_keras.models.folding import fold_for_inference
from nfnet_keras.models.registry import BATCHNORM_TWIN, build_model
from nfnet_keras.models.signal_block import adapt_model

# Folding changes the order of float32 roundings only; measured differences are <= 2e-5 on logits of
# magnitude ~25 (the report_resnet BatchNorm twin with random statistics) and <= 2e-6 elsewhere.
LOGIT_RTOL = 1e-6
LOGIT_ATOL = 1e-5
PRESETS = ("report_resnet", "tiny", "tiny_grouped", "tiny_speed")


def random_weights(model, seed=0, negative_bn=False):
    """Sets every weight of `model` to random non-initial values: skip gains, gains, biases, BN statistics.

    `negative_bn` gives half of the BatchNorm scales a negative sign.
    """
    rng = np.random.default_rng(seed)
    adapt_model(model, rng.normal(size=(16,) + tuple(model.input_shape[1:])).cumsum(axis=2).astype("float32"))
    for v in model.weights:
        path = v.path
        if path.endswith("skip_gain"):
            value = rng.uniform(0.5, 1.5, v.shape)
        elif path.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, v.shape)
        elif path.endswith("moving_mean"):
            value = rng.normal(0.0, 0.5, v.shape)
        elif path.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, v.shape) * (rng.choice([-1.0, 1.0], v.shape) if negative_bn else 1.0)
        elif path.endswith("beta"):
            value = rng.normal(0.0, 0.3, v.shape)
        elif path.endswith("gain"):
            value = rng.uniform(0.5, 1.5, v.shape)
        elif path.endswith("bias"):
            value = rng.normal(0.0, 0.1, v.shape)
        elif path.endswith("kernel") and "logit_scale" in [layer.name for layer in model.layers] \
                and path.startswith("classifier"):
            value = rng.normal(0.0, 9.0, v.shape)  # logits the speed network's 1/9 scale does not flatten
        else:
            continue
        v.assign(value.astype("float32"))
    return model


def build(preset, twin=False, negative_bn=False, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model(preset, **(BATCHNORM_TWIN if twin else {}))
    return random_weights(model, seed=seed, negative_bn=negative_bn)


@pytest.fixture(scope="module")
def cifar_images():
    """The first 64 CIFAR-10 test images (uint8); skips without `$NFNET_DATA_DIR`."""
    if not os.environ.get("NFNET_DATA_DIR"):
        pytest.skip("NFNET_DATA_DIR is not set: point it at a folder holding cifar-10-batches-py/")
    _, (x_test, _) = load_cifar10(test_only=True)
    return x_test[:64]


# === Folding ===


@pytest.mark.parametrize("twin", [False, True], ids=["nf", "batchnorm_twin"])
@pytest.mark.parametrize("preset", PRESETS)
def test_folded_logits_equal_the_trained_models(cifar_images, preset, twin):
    model = build(preset, twin)
    folded = fold_for_inference(model)
    x = preprocess(cifar_images)
    expected = model(x, training=False).numpy()
    got = folded(x).numpy()
    assert np.std(expected) > 0.05  # the weights are not the initial ones: the logits differ between images
    np.testing.assert_allclose(got, expected, rtol=LOGIT_RTOL, atol=LOGIT_ATOL * max(1.0, np.abs(expected).max()))


def test_folded_logits_of_uncentred_filters_equal_the_models(cifar_images):
    keras.utils.set_random_seed(0)
    model = random_weights(build_model("tiny_speed", center_filters=False), seed=0)
    assert model.get_layer("stage1_group").conv1.center is False
    x = preprocess(cifar_images)
    expected = model(x, training=False).numpy()
    assert np.std(expected) > 0.05
    np.testing.assert_allclose(fold_for_inference(model)(x).numpy(), expected, rtol=LOGIT_RTOL,
                               atol=LOGIT_ATOL * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("preset", ["tiny_speed", "tiny_grouped"])
def test_negative_batchnorm_scales_stay_exact(cifar_images, preset):
    # A BN after a max-pool with a negative scale cannot fold (max-pool does not commute with it): it must stay.
    model = build(preset, twin=True, negative_bn=True)
    folded = fold_for_inference(model)
    x = preprocess(cifar_images[:16])
    np.testing.assert_allclose(folded(x).numpy(), model(x, training=False).numpy(), rtol=LOGIT_RTOL,
                               atol=LOGIT_ATOL)


def layer_classes(model):
    return sorted({type(layer).__name__ for layer in model.layers})


def test_folded_graph_is_stock_keras_without_scalars():
    for preset in PRESETS:
        folded = fold_for_inference(build(preset))
        assert all(type(layer).__module__.startswith("keras.") for layer in folded.layers), layer_classes(folded)
        assert not any(isinstance(layer, (WSConv2D, keras.layers.Rescaling, keras.layers.Dropout))
                       for layer in folded.layers)
    assert layer_classes(fold_for_inference(build("tiny"))) == [
        "Add", "Conv2D", "Dense", "GlobalAveragePooling2D", "InputLayer"]
    assert layer_classes(fold_for_inference(build("tiny_speed"))) == [
        "Conv2D", "Dense", "GlobalMaxPooling2D", "InputLayer", "MaxPooling2D"]


def count_norms(model):
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())


def test_batchnorms_fold_where_exact():
    # tiny twin: stem conv -> block1 (transition: its BN folds into the stem conv) -> block2 (transition,
    # input a residual sum: its pre-activation BN stays) -> head BN after a residual sum (stays).
    # Each block's three inner BNs follow a conv and fold. 9 BNs, 2 left.
    model = build("tiny", twin=True)
    assert count_norms(model) == 9
    assert count_norms(fold_for_inference(model)) == 2
    # The speed twin: conv -> max-pool -> BN (positive scales: folds) and conv -> BN: all fold.
    model = build("tiny_speed", twin=True)
    assert count_norms(model) == 6
    assert count_norms(fold_for_inference(model)) == 0
    assert count_norms(fold_for_inference(build("tiny_speed", twin=True, negative_bn=True))) == 3


def test_folded_model_loads_without_the_package(tmp_path):
    folded = fold_for_inference(build("tiny_grouped"))
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(reloaded(x).numpy(), folded(x).numpy())
    with zipfile.ZipFile(path) as archive:  # no layer of the package: it loads where nfnet_keras is absent
        assert b"nfnet_keras" not in archive.read("config.json")


def test_unknown_models_are_refused_in_one_line():
    inputs = keras.Input((32, 32, 3))
    a = keras.layers.Conv2D(4, 3, name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, name="b")(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="sum")([a, b]))
    with pytest.raises(ValueError, match=r"^fold_for_inference folds chains of layers \(as build_model makes\); "
                                         r"layer 'b' does not take the output of 'a' alone\.$"):
        fold_for_inference(model)
    model = keras.Model(inputs, keras.layers.LayerNormalization(name="ln")(inputs))
    with pytest.raises(ValueError, match=r"^fold_for_inference does not know layer 'ln' \(LayerNormalization\)"):
        fold_for_inference(model)


def op_counts(saved_model_dir):
    """How many nodes of each op type the SavedModel's graph and its functions hold."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    counts = collections.Counter()
    for meta_graph in saved_model.meta_graphs:
        counts.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            counts.update(node.op for node in function.node_def)
    return counts


def test_exported_saved_model_has_no_weight_standardization(tmp_path):
    model = build("tiny")
    folded = op_counts(export.export_saved_model(model, "folded", base_dir=str(tmp_path)))
    plain = op_counts(export.export_saved_model(model, "plain", base_dir=str(tmp_path), fold=False))
    # The stem conv and five per block (both tiny blocks are transitions), in each copy of the graph the
    # SavedModel holds (the signature's function and the traced call).
    copies, rest = divmod(folded["Conv2D"], 11)
    assert rest == 0 and copies >= 1 and plain["Conv2D"] == folded["Conv2D"]
    # Standardization takes each kernel's mean and variance (three Means), 1/sqrt (Rsqrt) and the eps floor
    # (Maximum); the network's own Mean is its global average pool.
    assert plain["Rsqrt"] == plain["Maximum"] == 11 * copies
    assert plain["Mean"] == (1 + 3 * 11) * copies
    assert folded["Rsqrt"] == folded["Maximum"] == 0
    assert folded["Mean"] == copies


# === Other formats, each in its own runtime ===

FORMAT_FILES = {"onnx": ["class_names.txt", "model.onnx"], "litert": ["class_names.txt", "model.tflite"],
                "openvino": ["class_names.txt", "model.bin", "model.xml"]}
# Probabilities of a runtime and of Keras: measured <= 5e-6 (tiny_speed, float32 everywhere).
RUNTIME_ATOL = 1e-4


def keras_probabilities(model, images):
    return tf.nn.softmax(model(preprocess(images), training=False)).numpy()


def need(fmt):
    missing = export_formats.missing_packages(fmt)
    if missing:
        pytest.skip(f"--format {fmt} needs {', '.join(missing)}: pip install 'nfnet-keras[export]'")


@pytest.fixture(scope="module")
def speed_model():
    return build("tiny_speed")


@pytest.fixture(scope="module")
def exported(speed_model, tmp_path_factory):
    """`get(fmt)`: the version folder of `speed_model` exported as `fmt` (once per format)."""
    base, cache = tmp_path_factory.mktemp("models"), {}

    def get(fmt):
        need(fmt)
        if fmt not in cache:
            cache[fmt] = export_formats.export_model(speed_model, "speed", fmt, base_dir=str(base))
        return cache[fmt]

    return get


@pytest.mark.parametrize("fmt", ["onnx", "litert", "openvino"])
def test_export_runs_in_its_runtime_like_keras(exported, speed_model, cifar_images, fmt):
    path = exported(fmt)
    assert sorted(os.listdir(path)) == FORMAT_FILES[fmt]  # nothing else: no temporary left
    assert not [d for d in os.listdir(os.path.dirname(path)) if d.startswith(".")]
    with open(os.path.join(path, "class_names.txt"), encoding="utf-8") as f:
        assert tuple(f.read().splitlines()) == CLASS_NAMES
    expected = keras_probabilities(speed_model, cifar_images)
    got = runtimes.load_runtime(path, batch_size=24)(cifar_images)  # batches of two sizes: 24 and 16
    assert got.dtype == np.float32 and got.shape == (64, 10)
    np.testing.assert_allclose(got, expected, atol=RUNTIME_ATOL)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    assert len(set(expected.argmax(-1))) > 2  # random weights, yet the images get different classes


@pytest.mark.parametrize("fmt", ["onnx", "litert", "openvino"])
def test_predict_reads_every_format(exported, speed_model, cifar_images, fmt, tmp_path, capsys):
    images, out = str(tmp_path / "images.npy"), str(tmp_path / "p.npy")
    np.save(images, cifar_images[:10])
    model_file = os.path.join(exported(fmt), FORMAT_FILES[fmt][-1])
    assert predict.main(["--model", model_file, "--images", images, "--out", out]) == 0
    np.testing.assert_allclose(np.load(out), keras_probabilities(speed_model, cifar_images[:10]), atol=RUNTIME_ATOL)
    # The version folder names its one model file.
    probabilities = load_predictor(exported(fmt))(cifar_images[:10])
    np.testing.assert_array_equal(probabilities, np.load(out))


def test_export_cli_without_folding(speed_model, cifar_images, tmp_path, capsys):
    need("onnx")
    model_path = str(tmp_path / "model.keras")
    speed_model.save(model_path)
    base = str(tmp_path / "repo")
    assert export.main(["--model", model_path, "--name", "speed", "--base-dir", base, "--format", "onnx",
                        "--no-fold"]) == 0
    out = capsys.readouterr().out
    assert "Verified onnx in onnxruntime on 128 CIFAR-10 test images" in out
    assert f"to {os.path.join(base, 'speed', '1')}" in out
    got = runtimes.load_runtime(os.path.join(base, "speed", "1", "model.onnx"))(cifar_images)
    np.testing.assert_allclose(got, keras_probabilities(speed_model, cifar_images), atol=RUNTIME_ATOL)


def test_failed_verification_publishes_nothing(speed_model, tmp_path, monkeypatch):
    need("onnx")
    (tmp_path / "speed" / "1").mkdir(parents=True)
    other = export_formats.serving_model(build("tiny_speed", seed=1))  # different weights: other probabilities
    write = export_formats._WRITERS["onnx"]
    monkeypatch.setitem(export_formats._WRITERS, "onnx", lambda serving, path: write(other, path))
    with pytest.raises(export.ExportError, match=r"^The exported onnx model's probabilities in onnxruntime differ "
                       r"from the Keras model's by \S+ \(> 0\.0001\) on 128 (CIFAR-10 test images|random images \(no "
                       r"CIFAR-10\)), \d+ class ids "
                       r"differ; not published\.$"):
        export_formats.export_model(speed_model, "speed", "onnx", base_dir=str(tmp_path))
    assert os.listdir(tmp_path / "speed") == ["1"]  # no version 2, no temporary

    def garbage(serving, path):
        with open(path, "wb") as f:
            f.write(b"not an onnx model")

    monkeypatch.setitem(export_formats._WRITERS, "onnx", garbage)
    with pytest.raises(export.ExportError, match=r"^The exported onnx model failed in onnxruntime \(exit status 1: "
                       r"nfnet_keras\.contract\.InputError: --model .*model\.onnx could not be loaded by "
                       r"onnxruntime \(.*\)\.\); not published\.$"):
        export_formats.export_model(speed_model, "speed", "onnx", base_dir=str(tmp_path))
    assert os.listdir(tmp_path / "speed") == ["1"]


def test_missing_runtime_is_one_line(speed_model, tmp_path, monkeypatch, capsys):
    real, absent = importlib.util.find_spec, {"tf2onnx", "onnx", "onnxruntime"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    with pytest.raises(export.ExportError, match=r"^--format onnx needs tf2onnx, onnx, onnxruntime, not installed: "
                       r"pip install 'nfnet-keras\[export\]' \(or pip install tf2onnx onnx onnxruntime\)\.$"):
        export_formats.export_model(speed_model, "speed", "onnx", base_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "speed")
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"")
    with pytest.raises(runtimes.RuntimeMissing, match=rf"^--model {model_file} is a onnx model and needs its runtime "
                       r"onnxruntime, which is not installed: pip install 'nfnet-keras\[export\]' "
                       r"\(or pip install onnxruntime\)\.$"):
        load_predictor(str(model_file))
    images = str(tmp_path / "images.npy")
    np.save(images, np.zeros((1, 32, 32, 3), np.uint8))
    assert predict.main(["--model", str(model_file), "--images", images, "--out", str(tmp_path / "p.csv")]) == 2
    assert "needs its runtime onnxruntime" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.csv")


def test_bad_format_and_backend_are_one_line(speed_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^Unknown export format 'torch'\. Use one of: saved_model, onnx, litert, "
                       r"openvino\.$"):
        export_formats.export_model(speed_model, "speed", "torch", base_dir=str(tmp_path))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(export.ExportError, match=r"^--format litert is written from a TensorFlow graph here; the jax "
                       r"backend is active: export with KERAS_BACKEND=tensorflow \(the \.keras file loads there "
                       r"unchanged\)\.$"):
        export_formats.export_model(speed_model, "speed", "litert", base_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "speed")


def test_unknown_model_file_is_one_line(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"is neither a \.keras file, a SavedModel directory .* nor an exported "
                                         r"\.onnx, \.tflite or OpenVINO \.xml model\.$"):
        load_predictor(str(tmp_path / "model.pt"))


# === Int8 (--quantize int8) ===


def test_quantize_refused_for_other_formats_in_one_line(tmp_path, capsys):
    # Runs without any runtime: the flag is checked before the framework loads.
    assert export.QUANTIZE_FORMATS == export_formats.QUANTIZE_FORMATS
    model_file = tmp_path / "model.keras"
    model_file.write_bytes(b"")
    for fmt in ("openvino", "saved_model"):
        with pytest.raises(SystemExit) as exit_info:
            export.main(["--model", str(model_file), "--name", "m", "--base-dir", str(tmp_path / "repo"),
                         "--format", fmt, "--quantize", "int8"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f"error: --quantize int8 is for --format onnx or litert; --format {fmt} exports float32 only: drop "
            "--quantize or pick one of those formats.")
    assert not os.path.exists(tmp_path / "repo")
    with pytest.raises(ValueError, match=r"^--quantize int8 is for --format onnx or litert; --format openvino "
                                         r"exports float32 only: drop --quantize or pick one of those formats\.$"):
        export_formats.export_model(None, "m", "openvino", base_dir=str(tmp_path / "repo"), quantize="int8")
    with pytest.raises(ValueError, match=r"^Unknown quantization 'int4'\. Use one of: int8\.$"):
        export_formats.export_model(None, "m", "onnx", base_dir=str(tmp_path / "repo"), quantize="int4")
    assert not os.path.exists(tmp_path / "repo")


def int8_tensor_count(fmt, path):
    """How many int8 weight tensors the exported model holds."""
    if fmt == "onnx":
        import onnx

        return sum(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(path).graph.initializer)
    from ai_edge_litert.interpreter import Interpreter

    return sum(d["dtype"] == np.int8 for d in Interpreter(model_path=path).get_tensor_details())


@pytest.fixture(scope="module")
def trained_speed_model():
    """tiny_speed after 2 epochs on 2,048 CIFAR-10 training images: int8 is meant for trained weights.

    (Random gains and biases spread the activations beyond what int8 ranges hold: the ONNX int8 export of
    `build("tiny_speed")` gave its class id on 93% of the images with a clear top class, trained networks 99.6%+.)
    """
    if not os.environ.get("NFNET_DATA_DIR"):
        pytest.skip("NFNET_DATA_DIR is not set: point it at a folder holding cifar-10-batches-py/")
    (x_train, y_train), _ = load_cifar10()
    keras.utils.set_random_seed(0)
    model = build_model("tiny_speed")
    x = preprocess(x_train[:2048]).numpy()
    adapt_model(model, x)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, np.asarray(y_train[:2048]).reshape(-1), batch_size=64, epochs=2, verbose=0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_int8_export_runs_in_its_runtime_close_to_keras(trained_speed_model, tmp_path_factory, cifar_images, fmt):
    need(fmt)
    speed_model = trained_speed_model
    path = export_formats.export_model(speed_model, "speed", fmt, base_dir=str(tmp_path_factory.mktemp(fmt)),
                                       quantize="int8")
    float_path = export_formats.export_model(speed_model, "speed", fmt, base_dir=os.path.dirname(path), verify=False)
    assert sorted(os.listdir(path)) == FORMAT_FILES[fmt]
    model_file = os.path.join(path, FORMAT_FILES[fmt][-1])
    # tiny_speed: seven convs and the classifier. ONNX quantizes every kernel; LiteRT's dynamic range leaves
    # kernels under 1,024 elements float (the stem, stage 1's second conv, the classifier): five are int8.
    assert int8_tensor_count(fmt, model_file) >= {"onnx": 8, "litert": 5}[fmt]
    assert int8_tensor_count(fmt, os.path.join(float_path, FORMAT_FILES[fmt][-1])) == 0
    expected = keras_probabilities(speed_model, cifar_images)
    got = runtimes.load_runtime(path, batch_size=24)(cifar_images)
    assert got.dtype == np.float32 and got.shape == (64, 10)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > export_formats.INT8_MARGIN
    assert clear.sum() >= 16 and len(set(expected.argmax(-1))) > 2  # the check compares real decisions
    assert np.mean(got.argmax(-1)[clear] == expected.argmax(-1)[clear]) >= export_formats.INT8_MIN_AGREEMENT
    assert 0 < np.abs(got - expected).max() < 0.2  # int8: not the float model's probabilities, yet close


def test_int8_failed_verification_and_missing_data_publish_nothing(speed_model, tmp_path, monkeypatch):
    need("onnx")
    (tmp_path / "speed" / "1").mkdir(parents=True)
    other = export_formats.serving_model(build("tiny_speed", seed=1))  # other weights: other class ids
    monkeypatch.setitem(export_formats._INT8_WRITERS, "onnx",
                        lambda serving, path, calibration: export_formats._write_onnx(other, path))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(export.ExportError, match=r"^The exported int8 onnx model gives the Keras model's class id in "
                       r"onnxruntime on \d+\.\d% of \d+ (CIFAR-10 test images|random images \(no CIFAR-10\)) where "
                       r"Keras' top two "
                       r"probabilities differ by more than 0\.05 \(\d+ images\) \(< 95%\); not published\.$"):
        export_formats.export_model(speed_model, "speed", "onnx", base_dir=str(tmp_path), quantize="int8",
                                    calibration=images)
    assert os.listdir(tmp_path / "speed") == ["1"]  # no version 2, no temporary
    monkeypatch.setenv("NFNET_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(export.ExportError, match=r"^--quantize int8 calibrates on CIFAR-10 training images, which "
                       r"could not be read \(NFNET_DATA_DIR=.*empty: no such folder; .*\); set NFNET_DATA_DIR to "
                       r"the folder holding cifar-10-batches-py/\.$"):
        export_formats.export_model(speed_model, "speed2", "onnx", base_dir=str(tmp_path), quantize="int8")
    assert not os.path.exists(tmp_path / "speed2")


# === A model of other images and classes: 48 x 48, three classes ===

OWN_NAMES = ("cat", "dog", "fox")
OWN_SHAPE = (48, 48, 3)


def input_dims(fmt, model_file):
    """The exported graph's input dimensions, read with the format's own library (-1 or None: dynamic)."""
    if fmt == "onnx":
        import onnx

        dims = onnx.load(model_file).graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        return [int(d) if d >= 0 else None for d in Interpreter(model_path=model_file).get_input_details()[0][
            "shape_signature"]]
    import openvino

    return [d.get_length() if d.is_static else None
            for d in openvino.Core().read_model(model_file).input(0).get_partial_shape()]


@pytest.fixture(scope="module")
def own_images():
    return np.random.default_rng(1).integers(0, 256, (12,) + OWN_SHAPE, dtype=np.uint8)


@pytest.fixture(scope="module")
def own_model(own_images, tmp_path_factory):
    """`(model, path)`: tiny_speed for 48 x 48 images of three classes, saved with their names as fit saves it.

    Random weights give one class to every image (the max-pooled features are positive, and one class's
    kernel column sums highest): the classifier's kernel is centred on `own_images`' mean features, so that
    they get different classes and comparing class ids means something.
    """
    keras.utils.set_random_seed(0)
    model = random_weights(build_model("tiny_speed", num_classes=len(OWN_NAMES), input_shape=OWN_SHAPE))
    features = keras.Model(model.inputs, model.get_layer("pool").output)(preprocess(own_images)).numpy()
    mean, classifier = features.mean(0), model.get_layer("classifier")
    kernel = classifier.kernel.numpy()
    classifier.kernel.assign(kernel - np.outer(mean, mean @ kernel) / (mean @ mean))
    path = str(tmp_path_factory.mktemp("own") / "model.keras")
    model.save(path)
    write_class_names(path, OWN_NAMES)
    return model, path


@pytest.fixture(scope="module")
def own_exported(own_model, tmp_path_factory):
    """`get(fmt)`: `(version folder, nfnet-export's output)` of the own model's .keras file, once per format."""
    base, cache = str(tmp_path_factory.mktemp("own_models")), {}

    def get(fmt, capsys):
        need(fmt)
        if fmt not in cache:
            capsys.readouterr()
            assert export.main(["--model", own_model[1], "--name", "own", "--base-dir", base, "--format", fmt]) == 0
            out = capsys.readouterr().out
            cache[fmt] = (out.strip().splitlines()[-1].rsplit(" to ", 1)[1], out)
        return cache[fmt]

    return get


@pytest.mark.parametrize("fmt", ["onnx", "litert", "openvino"])
def test_an_export_takes_its_models_image_size_and_class_names(own_exported, own_model, own_images, fmt, tmp_path,
                                                               capsys):
    path, out = own_exported(fmt, capsys)
    model, _ = own_model
    assert f"Verified {fmt} in {runtimes.RUNTIMES[fmt][2]} on 128 random images (48 x 48, not a CIFAR-10 model)" in out
    model_file = os.path.join(path, FORMAT_FILES[fmt][-1])
    assert input_dims(fmt, model_file)[1:] == [48, 48, 3]
    with open(os.path.join(path, "class_names.txt"), encoding="utf-8") as f:
        assert f.read() == "cat\ndog\nfox\n"
    # nfnet-predict on the export: the model's class names and the Keras model's class ids.
    expected = keras_probabilities(model, own_images)
    assert len(set(expected.argmax(-1))) > 1  # the images do not all get one class
    images, csv_out, npy_out = str(tmp_path / "images.npy"), str(tmp_path / "p.csv"), str(tmp_path / "p.npy")
    np.save(images, own_images)
    assert predict.main(["--model", model_file, "--images", images, "--out", csv_out]) == 0
    with open(csv_out, encoding="utf-8") as f:
        rows = f.read().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == [OWN_NAMES[c] for c in expected.argmax(-1)]
    assert predict.main(["--model", path, "--images", images, "--out", npy_out]) == 0  # the version folder
    np.testing.assert_allclose(np.load(npy_out), expected, atol=RUNTIME_ATOL)


def test_an_export_refuses_images_of_another_size_in_one_line(own_exported, tmp_path, capsys):
    path, _ = own_exported("onnx", capsys)
    cifar_sized = np.zeros((2, 32, 32, 3), np.uint8)
    np.save(tmp_path / "small.npy", cifar_sized)
    out = tmp_path / "p.csv"
    assert predict.main(["--model", path, "--images", str(tmp_path / "small.npy"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'small.npy'}: expected shape N x 48 x 48 x 3, got (2, 32, 32, 3).\n")
    assert not out.exists()
    predictor = load_predictor(path)
    assert (predictor.image_shape, predictor.class_names) == (OWN_SHAPE, OWN_NAMES)
    with pytest.raises(InputError, match=r"^images: expected shape N x 48 x 48 x 3, got \(2, 32, 32, 3\)\.$"):
        predictor(cifar_sized)


def test_an_export_with_a_class_names_file_of_another_model_is_refused(own_exported, tmp_path, capsys):
    path, _ = own_exported("onnx", capsys)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.onnx").write_bytes(open(os.path.join(path, "model.onnx"), "rb").read())
    (copy / "class_names.txt").write_text("".join(f"{n}\n" for n in CLASS_NAMES))
    with pytest.raises(InputError, match=rf"^--model {copy} returns 3 class probabilities but "
                                         rf"{copy / 'class_names.txt'} names 10 classes: it is not the "
                                         r"class_names\.txt of this export\.$"):
        load_predictor(str(copy))
    (copy / "class_names.txt").unlink()  # no names: the class ids
    assert load_predictor(str(copy)).class_names == ("0", "1", "2")


def test_int8_onnx_of_a_model_of_other_images_is_refused_in_one_line(own_model, tmp_path, capsys):
    need("onnx")
    base = tmp_path / "repo"
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--model", own_model[1], "--name", "own", "--base-dir", str(base), "--format", "onnx",
                     "--quantize", "int8"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --quantize int8 --format onnx calibrates on CIFAR-10 training images, and this model takes 48 x 48 "
        "images, 3 classes (cat, dog, fox): export it as float32 (drop --quantize), or as --format litert "
        "--quantize int8 (dynamic range: no calibration images).")
    assert not base.exists()
