"""The model core on other Keras backends (JAX here; PyTorch where installed), in subprocesses.

Each test runs a short script under `KERAS_BACKEND=<backend>` and compares with the TensorFlow
result of the same script. Skips a backend whose package is not installed
(`pip install -e '.[jax]'` / `'.[torch]'`).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [
    pytest.param("jax", marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")),
    pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                   reason="torch not installed")),
]

# Builds tiny_grouped, moves every weight off its initial value, runs one AGC-clipped SGD step with a
# fixed large gradient, and prints what the other backends must reproduce.
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
else:
    model = keras.saving.load_model(sys.argv[2])
x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
logits = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
optimizer = nk.with_agc(keras.optimizers.SGD(0.5), clipping=0.01)
optimizer.build(model.trainable_variables)
grads = [keras.ops.convert_to_tensor(10.0 * np.ones(v.shape, "float32")) for v in model.trainable_variables]
optimizer.apply_gradients(zip(grads, model.trainable_variables))
after = {v.path: float(np.abs(keras.ops.convert_to_numpy(v)).sum()) for v in model.trainable_variables}
stats = nk.signal_propagation(model, x)
print(json.dumps(dict(backend=keras.backend.backend(), tensorflow_loaded=core_loads_tensorflow,
                      logits=logits.tolist(), after=after, macs=nk.count_macs(model),
                      avg_var=[s["avg_var"] for s in stats])))
"""


def _run(backend, mode, path):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(path)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tensorflow_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("backends") / "tiny_grouped.keras"
    return path, _run("tensorflow", "save", path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_keras_file_saved_under_tensorflow_gives_the_same_logits_agc_step_and_stats(backend, tensorflow_run):
    path, reference = tensorflow_run
    other = _run(backend, "load", path)
    assert other["backend"] == backend
    assert other["tensorflow_loaded"] is False  # importing, building and calling the core load no TensorFlow
    np.testing.assert_allclose(other["logits"], reference["logits"], atol=1e-5)
    assert other["macs"] == reference["macs"]
    np.testing.assert_allclose(other["avg_var"], reference["avg_var"], rtol=1e-4)
    # One AGC-clipped SGD step from the same weights and gradients moves every variable alike.
    assert set(other["after"]) == set(reference["after"])
    for key, value in reference["after"].items():
        assert other["after"][key] == pytest.approx(value, rel=1e-5), key
