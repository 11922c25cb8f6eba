"""`--strategy data_parallel` (`nfnet_keras.distribution`): keras.distribution.DataParallel on JAX.

The JAX checks run in subprocesses with `KERAS_BACKEND=jax` and the CPU split into two devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`); they skip without jax.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nfnet_keras import distribution, exits, fit

from conftest import checkout_env, interrupt_after_first_epoch, run_fit_under

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")

# Two SGD steps (momentum, weight decay, AGC: the package's optimizer) of the tiny net on batches of 16,
# from the same weights, first on one device, then data-parallel on two; prints the losses and weights.
# Then a tf.data batch of 15, which cannot split across two devices.
STEP_SCRIPT = r"""
import json, sys
import jax
import keras
import numpy as np
import tensorflow as tf
import nfnet_keras as nk
from nfnet_keras import distribution
from nfnet_keras.config import TrainConfig
from nfnet_keras.training import compile_model

config = TrainConfig(preset="tiny", epochs=1, batch_size=16, lr=0.1, agc=0.01).validate()
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 32, 32, 3)).astype("float32")
y = rng.integers(0, 10, 32)
weights_path = sys.argv[1]
start = []

def train(initial=None):
    model = nk.build_model("tiny")
    if initial is None:
        model.save_weights(weights_path)
    else:
        model.load_weights(weights_path)
    start.append([np.asarray(v) for v in model.trainable_variables])
    compile_model(model, config, steps_per_epoch=2)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    history = model.fit(data, epochs=1, shuffle=False, verbose=0).history
    return model, history["loss"][0], [np.asarray(v) for v in model.trainable_variables]

keras.utils.set_random_seed(0)
_, one_loss, one_weights = train()
parallel = distribution.data_parallel(16)
model, dp_loss, dp_weights = train(initial=weights_path)
kernel = model.trainable_variables[0].value
uneven = tf.data.Dataset.from_tensor_slices((x[:15], y[:15])).batch(16)
try:
    model.evaluate(uneven, verbose=0)
    uneven_error = None
except Exception as e:
    uneven_error = str(e)
print(json.dumps(dict(
    devices=jax.device_count(), mesh=list(parallel.device_mesh.shape),
    axes=list(parallel.device_mesh.axis_names), kernel_devices=len(kernel.sharding.device_set),
    one_loss=float(one_loss), dp_loss=float(dp_loss),
    max_weight_diff=max(float(np.abs(a - b).max()) for a, b in zip(one_weights, dp_weights)),
    max_start_diff=max(float(np.abs(a - b).max()) for a, b in zip(*start)),
    max_weight_change=max(float(np.abs(a - b).max()) for a, b in zip(start[0], one_weights)),
    uneven_error=uneven_error)))
"""


@pytest.mark.slow
@needs_jax
def test_a_data_parallel_step_on_two_devices_equals_one_device_on_the_global_batch(tmp_path):
    env = checkout_env(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", **TWO_DEVICES)
    result = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(tmp_path / "start.weights.h5")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["mesh"] == [2] and out["axes"] == ["batch"]
    assert out["kernel_devices"] == 2  # the weights are replicated on both devices
    assert "Data parallel over 2 device(s) in 1 process(es)" in result.stdout
    assert out["dp_loss"] == pytest.approx(out["one_loss"], abs=1e-5)
    assert out["max_start_diff"] == 0.0 and out["max_weight_change"] > 1e-3  # same start, and the steps moved it
    assert out["max_weight_diff"] < 1e-5
    assert distribution.UNEVEN_BATCH in out["uneven_error"] and "multiple of 2 images" in out["uneven_error"]


@pytest.mark.slow
@needs_jax
def test_data_parallel_fit_checkpoints_and_resumes(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    args = ["--preset", "tiny", "--epochs", "3", "--batch-size", "32", "--train-limit", "256", "--val-size", "64",
            "--quiet", "--strategy", "data_parallel", "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir),
            "--no-export"]
    status, output, done = interrupt_after_first_epoch(run_fit_under("jax", args, TWO_DEVICES, wait=False), run_dir)
    assert "Data parallel over 2 device(s)" in output
    if done < 3:
        assert status == 130, output[-3000:]
        result = run_fit_under("jax", args, TWO_DEVICES)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"(epoch {done} complete)" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["strategy"] == "data_parallel"
    assert metrics["history"]["epoch"] == [0, 1, 2] and metrics["epochs_completed"] == 3
    assert np.isfinite(metrics["history"]["loss"]).all() and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (run_dir / "model.keras").is_file()


@pytest.mark.slow
@needs_jax
def test_a_last_batch_that_does_not_split_exits_2_with_one_line(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    # 250 training images in batches of 32: the last holds 26 (splits); 63 validation images: 31 does not.
    result = run_fit_under("jax", ["--preset", "tiny", "--epochs", "1", "--batch-size", "32", "--train-limit",
                                   "250", "--val-size", "63", "--quiet", "--strategy", "data_parallel",
                                   "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir), "--no-export"],
                           TWO_DEVICES)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not split evenly across the 2 devices" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_data_parallel_under_tensorflow_exits_2_before_writing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = fit.main(["--preset", "tiny", "--epochs", "1", "--strategy", "data_parallel", "--run-dir",
                       str(run_dir), "--no-export"])
    assert status == exits.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --strategy data_parallel runs on the JAX backend (keras.distribution), not on "
                   "tensorflow: run with KERAS_BACKEND=jax (pip install -e '.[jax]')."]
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "strategy, backend, message",
    [
        ("data_parallel", "torch", "runs on the JAX backend"),
        ("mirrored", "jax", "use KERAS_BACKEND=tensorflow, or --strategy data_parallel under JAX"),
        ("mirrored", "torch", "not available on torch"),
    ],
)
def test_strategies_refuse_the_backends_they_do_not_run_on(strategy, backend, message):
    with pytest.raises(ValueError, match=message):
        distribution.check_backend(strategy, backend)
    distribution.check_backend("none", backend)


def test_strategies_run_on_their_backends():
    distribution.check_backend("mirrored", "tensorflow")
    distribution.check_backend("data_parallel", "jax")


@needs_jax
@pytest.mark.parametrize(
    "environ, message",
    [
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234"}, "KERAS_DISTRIBUTION_NUM_PROCESSES, "
         "KERAS_DISTRIBUTION_PROCESS_ID not set"),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two", "KERAS_DISTRIBUTION_PROCESS_ID": "0"}, "must be integers"),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "2"}, r"must be in \[0, 1\]"),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1"}, "must name the coordinator"),
    ],
)
def test_bad_multi_host_settings_are_refused_before_joining(environ, message):
    assert distribution.multi_host_requested(environ)
    with pytest.raises(ValueError, match=message):
        distribution._initialize_processes(environ)


def test_one_host_needs_no_multi_host_settings():
    assert not distribution.multi_host_requested({"KERAS_DISTRIBUTION_PROCESS_ID": ""})


def test_jit_is_on_by_default_under_jax_and_follows_the_flag():
    from nfnet_keras.training import TrainConfig, resolve_jit

    assert resolve_jit(TrainConfig(), has_gpu=False, backend="jax") is True
    assert resolve_jit(TrainConfig(strategy="data_parallel"), has_gpu=False, backend="jax") is True
    assert resolve_jit(TrainConfig(jit=False), has_gpu=True, backend="jax") is False
    assert resolve_jit(TrainConfig(), has_gpu=False, backend="tensorflow") is False
