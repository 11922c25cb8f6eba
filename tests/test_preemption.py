"""Training that survives preemption: SIGTERM and Ctrl-C checkpoint mid-epoch, and a rerun resumes there.

The end-to-end test stops a `--deterministic` run with SIGTERM in its first
epoch and with Ctrl-C in its second, reruns it each time, and checks the
final weights equal an uninterrupted run's bit for bit: the training
pipeline is a function of (seed, epoch, step) (`data.make_epoch_dataset`).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from nfnet_keras import fit

from conftest import ctrl_c_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 320 training images in batches of 16: 20 steps per epoch.
STEPS = 20
RUN = ["--preset", "tiny", "--val-size", "64", "--quiet", "--no-export", "--epochs", "3", "--batch-size", "16",
       "--train-limit", "320", "--deterministic", "--seed", "3", "--augment", "noise_rotate_flip"]
HINT = re.compile(r"Interrupted( by SIGTERM)? after epoch (\d) of 3(?: and step (\d+) of 20 of epoch (\d))?; "
                  r"rerun the same command to resume\.")


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _fit(args):
    result = subprocess.run([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _stop_when(args, checkpoint, signum, timeout=240):
    """Starts fit, sends `signum` once the folder `checkpoint` exists; returns (exit status, last stderr line)."""
    proc = subprocess.Popen([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_enabled)
    deadline = time.time() + timeout
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the run ended before it could be stopped:\n" + proc.stderr.read()[-3000:]
            assert time.time() < deadline, f"no {checkpoint.name} within {timeout} s"
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, err.strip().splitlines()[-1]


def _weights(run_dir):
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.slow
def test_sigterm_and_ctrl_c_mid_epoch_then_reruns_end_with_the_uninterrupted_weights(tmp_path, synthetic_cifar_dir):
    reference = tmp_path / "reference"
    _fit([*RUN, "--data-dir", synthetic_cifar_dir, "--run-dir", str(reference)])

    run_dir = tmp_path / "run"
    args = [*RUN, "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir), "--checkpoint-every", "1"]
    checkpoints = run_dir / "checkpoints"

    # SIGTERM in epoch 1: a checkpoint at the next step's end, exit 143, one line saying how to resume.
    status, last = _stop_when(args, checkpoints / "step-0000-000004", signal.SIGTERM)
    assert status == fit.EXIT_TERMINATED == 143
    hint = HINT.fullmatch(last)
    assert hint and hint.group(1) == " by SIGTERM" and hint.group(2) == "0", last
    step = int(hint.group(3))
    assert 4 < step < STEPS and hint.group(4) == "1"
    assert (checkpoints / f"step-0000-{step:06d}").is_dir()
    # Every step checkpointed (--checkpoint-every 1), the newest two kept; nothing half-written left.
    assert sorted(os.listdir(checkpoints)) == [f"step-0000-{step - 1:06d}", f"step-0000-{step:06d}"]
    state = json.loads((checkpoints / f"step-0000-{step:06d}" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["steps_per_epoch"]) == (0, step, STEPS)
    assert not (run_dir / "metrics.json").exists()

    # Ctrl-C in epoch 2 of the rerun: exit 130, the same kind of line.
    status, last = _stop_when(args, checkpoints / "step-0001-000003", signal.SIGINT)
    assert status == fit.EXIT_INTERRUPTED == 130
    hint = HINT.fullmatch(last)
    assert hint and hint.group(1) is None and hint.group(2) == "1" and hint.group(4) == "2", last
    step = int(hint.group(3))

    result = _fit(args)
    assert f"(epoch 1 complete), at step {step} of {STEPS} of epoch 2." in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == [0, 1, 2]  # each epoch logged once
    expected = json.loads((reference / "metrics.json").read_text())["history"]
    assert metrics["history"]["loss"] == expected["loss"]  # the resumed epochs' metrics cover all their steps
    assert sorted(os.listdir(checkpoints)) == ["epoch-0002", "epoch-0003"]  # mid-epoch ones pruned
    for a, b in zip(_weights(reference), _weights(run_dir), strict=True):
        np.testing.assert_array_equal(a, b)
