"""The package on other Keras backends (JAX here; PyTorch where installed), in subprocesses.

The model core: a short script under `KERAS_BACKEND=<backend>` compared with the TensorFlow
result of the same script. The training command: `python -m nfnet_keras.fit` under JAX,
interrupted and resumed, with its logs, test evaluation, model and export. Skips a backend
whose package is not installed (`pip install -e '.[jax]'` / `'.[torch]'`).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import checkout_env, interrupt_after_first_epoch, run_fit_under

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [
    pytest.param("jax", marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")),
    pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                   reason="torch not installed")),
]

# "save PATH": builds tiny_grouped, moves every weight off its initial value and saves it; "load PATH ...":
# loads each file. For each model (the one saved, or each one loaded) it prints, in one JSON list, the logits,
# the state after one AGC-clipped SGD step with a fixed large gradient, and the signal-propagation statistics:
# what every other backend must reproduce.
SCRIPT = r"""
import json, sys
import numpy as np
import keras
import nfnet_keras as nk

model = nk.build_model("tiny_grouped")  # (keras.utils.set_random_seed would import TensorFlow itself)
model(np.zeros((1, 32, 32, 3), "float32"))
core_loads_tensorflow = "tensorflow" in sys.modules  # Keras' own .keras saving may import it later
rng = np.random.default_rng(1)
for v in model.weights:
    v.assign(np.asarray(v) + 0.1 * rng.normal(size=v.shape).astype("float32"))
if sys.argv[1] == "save":
    model.save(sys.argv[2])
    models = [model]
else:
    models = [keras.saving.load_model(path) for path in sys.argv[2:]]
x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
reports = []
for model in models:
    logits = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    optimizer = nk.with_agc(keras.optimizers.SGD(0.5), clipping=0.01)
    optimizer.build(model.trainable_variables)
    grads = [keras.ops.convert_to_tensor(10.0 * np.ones(v.shape, "float32")) for v in model.trainable_variables]
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    after = {v.path: float(np.abs(keras.ops.convert_to_numpy(v)).sum()) for v in model.trainable_variables}
    stats = nk.signal_propagation(model, x)
    reports.append(dict(backend=keras.backend.backend(), tensorflow_loaded=core_loads_tensorflow,
                        logits=logits.tolist(), after=after, macs=nk.count_macs(model),
                        avg_var=[s["avg_var"] for s in stats]))
print(json.dumps(reports))
"""


def _available(backend):
    return backend == "tensorflow" or importlib.util.find_spec(backend) is not None


def _run(backend, mode, *paths):
    env = checkout_env(KERAS_BACKEND=backend)
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, *map(str, paths)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{backend: (.keras path, its report)} for TensorFlow and each other installed backend."""
    root = tmp_path_factory.mktemp("backends")
    files = {}
    for backend in ("tensorflow", "jax", "torch"):
        if _available(backend):
            path = root / f"from_{backend}.keras"
            [report] = _run(backend, "save", path)
            files[backend] = path, report
    return files


@pytest.fixture(scope="module")
def loaded(saved):
    """{loader: {saver: report}}: each installed backend loads every other backend's file, in one process."""
    reports = {}
    for loader in saved:
        savers = [backend for backend in saved if backend != loader]
        reports[loader] = dict(zip(savers, _run(loader, "load", *(saved[b][0] for b in savers))))
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_keras_file_saved_under_tensorflow_gives_the_same_logits_agc_step_and_stats(backend, saved, loaded):
    reference, other = saved["tensorflow"][1], loaded[backend]["tensorflow"]
    assert other["backend"] == backend
    assert other["tensorflow_loaded"] is False  # importing, building and calling the core load no TensorFlow
    np.testing.assert_allclose(other["logits"], reference["logits"], atol=1e-5)
    assert other["macs"] == reference["macs"]
    np.testing.assert_allclose(other["avg_var"], reference["avg_var"], rtol=1e-4)
    # One AGC-clipped SGD step from the same weights and gradients moves every variable alike.
    assert set(other["after"]) == set(reference["after"])
    for key, value in reference["after"].items():
        assert other["after"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("saver, loader", [("jax", "tensorflow"), ("jax", "torch"), ("torch", "tensorflow"),
                                           ("torch", "jax")])
def test_a_keras_file_saved_under_each_backend_loads_under_the_others(saver, loader, saved, loaded):
    if not (_available(saver) and _available(loader)):
        pytest.skip(f"{saver} or {loader} not installed")
    reference, other = saved[saver][1], loaded[loader][saver]
    assert (reference["backend"], other["backend"]) == (saver, loader)
    np.testing.assert_allclose(other["logits"], reference["logits"], atol=1e-5)
    np.testing.assert_allclose(other["avg_var"], reference["avg_var"], rtol=1e-4)


# === python -m nfnet_keras.fit under JAX and PyTorch ===

OTHER_FIT = ["--preset", "tiny", "--epochs", "3", "--batch-size", "64", "--train-limit", "256", "--val-size", "64",
           "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_under_another_backend_checkpoints_resumes_logs_evaluates_and_exports(backend, tmp_path,
                                                                                  synthetic_cifar_dir):
    run_dir, export_dir = tmp_path / "run", tmp_path / "saved_models"
    args = [*OTHER_FIT, "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir), "--export-name", "tiny",
            "--export-dir", str(export_dir)]
    status, output, done = interrupt_after_first_epoch(run_fit_under(backend, args, wait=False), run_dir)
    if done < 3:  # Ctrl-C landed during training (not during the test evaluation or export)
        assert status == 130, output[-3000:]
        assert "rerun the same command to resume" in output
        assert not (run_dir / "metrics.json").exists()

        result = run_fit_under(backend, args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"(epoch {done} complete)" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["preset"] == "tiny" and metrics["epochs_completed"] == 3
    assert metrics["history"]["epoch"] == [0, 1, 2]  # each epoch once
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["diverged"] is False
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0002", "epoch-0003"]
    for sub in ("fit", "fit/train", "fit/validation", "fit/test"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "logs" / sub)), sub

    # model.keras, trained under the other backend, loads under TensorFlow; the export (run under TensorFlow, see
    # nfnet_keras.export) serves the same probabilities with the package's signature.
    import keras
    import tensorflow as tf

    from nfnet_keras.contract import CLASS_ID, INPUT, PROBABILITIES, SIGNATURE
    from nfnet_keras.data import preprocess
    from nfnet_keras.export import servability_problems

    assert metrics["export_path"] == str(export_dir / "tiny" / "1")
    assert servability_problems(metrics["export_path"]) == []
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    served = tf.saved_model.load(metrics["export_path"]).signatures[SIGNATURE](**{INPUT: tf.constant(images)})
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    expected = tf.nn.softmax(model(preprocess(images), training=False)).numpy()
    np.testing.assert_allclose(served[PROBABILITIES].numpy(), expected, atol=1e-5)
    assert served[CLASS_ID].numpy().tolist() == expected.argmax(1).tolist()


