"""Tests of `nfnet_keras.export`: the SavedModel contract TF Serving relies on."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import nfnet_keras
from nfnet_keras import export
from nfnet_keras.contract import CLASS_NAMES
from nfnet_keras.data import load_cifar10, preprocess

# The SavedModel and the Keras model run the same float32 ops on the same CPU;
# measured differences are <= 7e-7. Probabilities must agree to this (absolute).
PROB_ATOL = 1e-5
N_TEST_IMAGES = 256


def scrambled(preset, seed=0):
    """A `preset` model with random but well-spread outputs (untrained it predicts ~0.1 everywhere)."""
    keras.utils.set_random_seed(seed)
    model = nfnet_keras.build_model(preset)
    rng = np.random.default_rng(seed)
    # A whitening stem adapted to images (not its identity start), and logits that the speed
    # network's 1/9 scale does not flatten.
    nfnet_keras.adapt_model(model, rng.normal(size=(16, 32, 32, 3)).cumsum(axis=2).astype("float32"))
    classifier_std = 9.0 if "logit_scale" in [layer.name for layer in model.layers] else 1.0
    for v in model.weights:
        if v.path.endswith("skip_gain"):
            v.assign(np.ones(v.shape, "float32"))
        elif v.path.endswith("gain"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif v.path.endswith("bias"):
            v.assign(rng.normal(0.0, 0.1, v.shape).astype("float32"))
        elif v.path == "classifier/kernel":
            v.assign(rng.normal(0.0, classifier_std, v.shape).astype("float32"))
    return model


def keras_probabilities(model, images):
    return tf.nn.softmax(model(preprocess(images), training=False)).numpy()


@pytest.fixture(scope="module")
def cifar_test_images():
    """The first CIFAR-10 test images (uint8) and labels; skips without `$NFNET_DATA_DIR`."""
    if not os.environ.get("NFNET_DATA_DIR"):
        pytest.skip("NFNET_DATA_DIR is not set: point it at a folder holding cifar-10-batches-py/")
    (_, _), (x_test, y_test) = load_cifar10()
    return x_test[:N_TEST_IMAGES], y_test[:N_TEST_IMAGES]


@pytest.fixture(scope="module")
def models():
    return {preset: scrambled(preset) for preset in ("tiny", "tiny_grouped", "tiny_speed")}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """Every preset of `models` exported once: preset -> version directory."""
    base = tmp_path_factory.mktemp("saved_models")
    return {
        preset: export.export_saved_model(model, preset, base_dir=str(base))
        for preset, model in models.items()
    }


# === Layout and versions ===


def test_layout_is_name_version(models, tmp_path):
    model = models["tiny"]
    first = export.export_saved_model(model, "nfnet", base_dir=str(tmp_path), verify=False)
    second = export.export_saved_model(model, "nfnet", base_dir=str(tmp_path), verify=False)
    assert first == os.path.join(str(tmp_path), "nfnet", "1")
    assert second == os.path.join(str(tmp_path), "nfnet", "2")
    assert sorted(os.listdir(tmp_path / "nfnet")) == ["1", "2"]  # no temporary left behind
    assert sorted(os.listdir(first)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert oct(os.stat(first).st_mode & 0o777) == oct(0o755)


def test_next_version_reads_numeric_dirs_only(tmp_path):
    for d in ("3", "007", "latest", ".export-tmp-x"):
        (tmp_path / d).mkdir()
    assert export.existing_versions(str(tmp_path)) == [3, 7]
    assert export.next_version(str(tmp_path)) == 8
    assert export.next_version(str(tmp_path / "absent")) == 1


def test_existing_version_is_never_overwritten(models, tmp_path):
    model = models["tiny"]
    path = export.export_saved_model(model, "nfnet", version=4, base_dir=str(tmp_path), verify=False)
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        before = f.read()
    with pytest.raises(FileExistsError, match=r"Version 4 of model 'nfnet' exists already.*next \(5\)"):
        export.export_saved_model(model, "nfnet", version=4, base_dir=str(tmp_path), verify=False)
    (tmp_path / "nfnet" / "0009").mkdir()  # TF Serving reads it as version 9
    with pytest.raises(FileExistsError, match="Version 9"):
        export.export_saved_model(model, "nfnet", version=9, base_dir=str(tmp_path), verify=False)
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(tmp_path / "nfnet")) == ["0009", "4"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_interrupted_export_leaves_nothing(models, tmp_path, monkeypatch, interrupt):
    model = models["tiny"]
    (tmp_path / "nfnet" / "1").mkdir(parents=True)
    real_save = tf.saved_model.save
    written = []

    def save_then_fail(obj, path, **kwargs):
        real_save(obj, path, **kwargs)  # the files are on disk, in the temporary directory
        written.append(sorted(os.listdir(path)))
        raise interrupt("interrupted mid-export")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(interrupt, match="interrupted mid-export"):
        export.export_saved_model(model, "nfnet", base_dir=str(tmp_path), verify=False)
    assert "saved_model.pb" in written[0]
    assert sorted(os.listdir(tmp_path / "nfnet")) == ["1"]  # no version 2, no temporary


def test_unservable_graph_is_refused_and_not_published(tmp_path):
    # Keras' own grouped Conv2D runs XLA-compiled on CPU: TF Serving would refuse it.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=2)(x)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    with pytest.raises(export.ExportError, match="_XlaMustCompile=true"):
        export.export_saved_model(model, "xla", base_dir=str(tmp_path), fold=False)
    assert os.listdir(tmp_path / "xla") == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="../evil"), "Model name '../evil' is not valid"),
        (dict(name=""), "Model name '' is not valid"),
        (dict(name="ok", version=0), "positive integer, got 0"),
        (dict(name="ok", version="3"), "positive integer, got '3'"),
    ],
)
def test_bad_arguments(models, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export.export_saved_model(models["tiny"], base_dir=str(tmp_path), **kwargs)
    assert not os.path.exists(tmp_path / "ok")


def test_model_must_output_one_logit_per_class(tmp_path):
    model = nfnet_keras.build_model("tiny", num_classes=5)
    with pytest.raises(ValueError, match=r"\(batch, 10\) logits.*got output shape \(None, 5\)"):
        export.export_saved_model(model, "five", base_dir=str(tmp_path), class_names=CLASS_NAMES)
    assert not os.path.exists(tmp_path / "five")
    # Without class names, a model of other than 10 classes names them by id, as predict does.
    path = export.export_saved_model(model, "five", base_dir=str(tmp_path), verify=False)
    with open(os.path.join(path, "assets", "class_names.txt"), encoding="utf-8") as f:
        assert f.read() == "0\n1\n2\n3\n4\n"


# === The graph ===


@pytest.mark.parametrize("preset", ["tiny", "tiny_grouped", "tiny_speed"])
def test_graph_has_no_xla_and_only_standard_ops(exports, preset):
    assert export.servability_problems(exports[preset]) == []


def test_grouped_preset_really_has_grouped_convs(models):
    convs = [layer for layer in models["tiny_grouped"]._flatten_layers() if isinstance(layer, nfnet_keras.WSConv2D)]
    assert max(c.groups for c in convs) > 1


def test_class_names_ship_as_asset(exports):
    path = exports["tiny"]
    with open(os.path.join(path, "assets", "class_names.txt"), encoding="utf-8") as f:
        assert tuple(f.read().splitlines()) == CLASS_NAMES
    loaded = tf.saved_model.load(path)
    assert loaded.class_names.asset_path.numpy().decode().endswith("assets/class_names.txt")


@pytest.mark.slow  # a subprocess importing TensorFlow
def test_saved_model_cli_lists_the_signature(exports):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        cli = shutil.which("saved_model_cli") or pytest.skip("saved_model_cli not installed")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [cli, "show", "--dir", exports["tiny"], "--all"],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    ).stdout
    sig = out[out.index("signature_def['serving_default']"):]
    sig = sig[: sig.index("Method name is")]
    expected = [
        "inputs['image'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 32, 32, 3)",
        "outputs['class_id'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)",
        "outputs['probabilities'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)",
    ]
    for block in expected:
        assert block in sig, sig
    assert sig.count("inputs['") == 1 and sig.count("outputs['") == 2


# === Loaded without Keras ===

_FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.machinery, json, sys

    class Blocker:
        # A spec without origin: TensorFlow's probes see no Keras; importing fails.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras", "tf_keras", "nfnet_keras"):
                return importlib.machinery.ModuleSpec(name, self)
        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked in this process")
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Blocker())
    try:
        import keras
        raise SystemExit("keras was importable")
    except ImportError:
        pass
    import numpy as np
    import tensorflow as tf

    images = np.load(sys.argv[1])
    result = {}
    for path in sys.argv[2:]:
        fn = tf.saved_model.load(path).signatures["serving_default"]
        out = fn(image=tf.constant(images))
        result[path] = {k: v.numpy().tolist() for k, v in out.items()}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tf_keras", "nfnet_keras"))
    print(json.dumps({"outputs": result, "loaded": loaded}))
    """
)


@pytest.mark.slow  # a subprocess importing TensorFlow, real images
def test_fresh_process_without_keras_matches_keras(models, exports, cifar_test_images, tmp_path):
    images, labels = cifar_test_images
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "serve.py").write_text(_FRESH_PROCESS)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    run = subprocess.run(
        [sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "images.npy"), *exports.values()],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    for preset, path in exports.items():
        out = result["outputs"][path]
        probabilities = np.asarray(out["probabilities"], np.float32)
        expected = keras_probabilities(models[preset], images)
        assert probabilities.shape == (len(images), 10)
        assert expected.max(axis=1).mean() > 0.3, "the test model's outputs are too flat"
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=PROB_ATOL, err_msg=preset)
        np.testing.assert_array_equal(out["class_id"], probabilities.argmax(axis=1))


def _load_like_tf_serving(path):
    """Loads a SavedModel the way TF Serving's C++ loader does, in a TF1 session.

    Imports the MetaGraph, runs the saver's restore op on `variables/variables`
    and the init op with the asset paths fed. (`tf.compat.v1.saved_model.load`
    skips the restore for TF2 SavedModels, so it is no stand-in.)
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    (meta_graph,) = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.train.import_meta_graph(meta_graph)
    session = tf.compat.v1.Session(graph=graph)
    assets = {
        a.tensor_info.name: os.path.join(path, "assets", a.filename) for a in meta_graph.asset_file_def
    }
    saver = meta_graph.saver_def
    session.run(
        saver.restore_op_name,
        {saver.filename_tensor_name: os.path.join(path, "variables", "variables"), **assets},
    )
    init = meta_graph.signature_def.get("__saved_model_init_op")
    if init is not None:
        session.run(init.outputs["__saved_model_init_op"].name, assets)
    return session, meta_graph.signature_def["serving_default"]


@pytest.mark.parametrize("preset", ["tiny", "tiny_grouped", "tiny_speed"])
def test_cpp_style_session_load_matches_keras(models, exports, preset):
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    session, signature = _load_like_tf_serving(exports[preset])
    with session:
        fetches = {k: v.name for k, v in signature.outputs.items()}
        out = session.run(fetches, {signature.inputs["image"].name: images})
    np.testing.assert_allclose(
        out["probabilities"], keras_probabilities(models[preset], images), rtol=0, atol=PROB_ATOL
    )
    assert out["class_id"].dtype == np.int64


# === Bad requests fail clearly ===


@pytest.fixture(scope="module")
def signature(exports):
    return tf.saved_model.load(exports["tiny"]).signatures["serving_default"]


def test_wrong_dtype_is_a_clear_error(signature):
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor but is a float"):
        signature(image=tf.zeros((1, 32, 32, 3), tf.float32))


@pytest.mark.parametrize("shape", [(1, 28, 28, 3), (1, 32, 32, 1), (32, 32, 3)])
def test_wrong_shape_is_a_clear_error(signature, shape):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"is not compatible with expected shape \[\?,32,32,3\]"):
        signature(image=tf.zeros(shape, tf.uint8))
    out = signature(image=tf.zeros((2, 32, 32, 3), tf.uint8))  # still serving
    assert out["probabilities"].shape == (2, 10)


def test_wrong_input_name_is_a_clear_error(signature):
    with pytest.raises(TypeError, match="missing a required argument: 'image'"):
        signature(pixels=tf.zeros((1, 32, 32, 3), tf.uint8))


# === Command line ===


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_cli_exports_and_refuses_bad_input(models, tmp_path, capsys):
    model_path = str(tmp_path / "model.keras")
    models["tiny"].save(model_path)
    base = str(tmp_path / "served")
    assert export.main(["--model", model_path, "--name", "nfnet", "--base-dir", base]) == 0
    assert "Exported" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(base, "nfnet"))) == ["1"]

    err = _cli(["--model", model_path, "--name", "nfnet", "--base-dir", base, "--version", "1"], capsys)
    assert "Version 1 of model 'nfnet' exists already" in err and "--version" in err
    err = _cli(["--model", str(tmp_path / "absent.keras"), "--name", "nfnet"], capsys)
    assert "no such file" in err
    (tmp_path / "junk.keras").write_text("not a model")
    err = _cli(["--model", str(tmp_path / "junk.keras"), "--name", "nfnet"], capsys)
    assert "could not be loaded as a Keras model" in err
    err = _cli(["--model", model_path, "--name", "a/b", "--base-dir", base], capsys)
    assert "Model name 'a/b' is not valid" in err
    err = _cli(["--model", model_path, "--name", "nfnet", "--version", "-2"], capsys)
    assert "--version must be a positive integer" in err
    assert sorted(os.listdir(os.path.join(base, "nfnet"))) == ["1"]


def test_cli_help_names_the_command_typed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/home/u/nfnet-keras/.venv/bin/nfnet-export", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: nfnet-export [-h]")
    assert " ".join(text.split()).count("(default: saved_models)") == 1
