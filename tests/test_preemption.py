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

from nfnet_keras import data, exits
from nfnet_keras.preemption import Preempted, StepCheckpoint, StopSignals

from conftest import checkout_env, ctrl_c_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 320 training images in batches of 16: 20 steps per epoch.
STEPS = 20
RUN = ["--preset", "tiny", "--val-size", "64", "--quiet", "--no-export", "--epochs", "3", "--batch-size", "16",
       "--train-limit", "320", "--deterministic", "--seed", "3", "--augment", "noise_rotate_flip"]
HINT = re.compile(r"Interrupted( by SIGTERM)? after epoch (\d) of 3(?: and step (\d+) of 20 of epoch (\d))?; "
                  r"rerun the same command to resume\.")


def _env():
    return checkout_env(TF_CPP_MIN_LOG_LEVEL="2")


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
    assert status == exits.TERMINATED == 143
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
    assert status == exits.INTERRUPTED == 130
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


# === Checkpoints ===

# A child that writes a mid-epoch checkpoint, then is killed (SIGKILL) half-way through writing the next one.
KILLED_WRITER = """
import os, signal, sys
import keras, numpy as np
from nfnet_keras.preemption import StepCheckpoint

folder = sys.argv[1]
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("sgd", "mse", metrics=["mae"])
model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
checkpoint = StepCheckpoint(folder)
checkpoint.set_model(model)
checkpoint._save_step(0, 1, 5)
np.save(os.path.join(folder, "kernel.npy"), keras.ops.convert_to_numpy(model.layers[0].kernel))
model.layers[0].kernel.assign(np.full((3, 2), 7.0, "float32"))

def killed_half_way(path):
    with open(path, "wb") as f:
        f.write(b"\\x89HDF\\r\\n")  # the start of an HDF5 file, then nothing
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

model.save_weights = killed_half_way
checkpoint._save_step(0, 2, 5)
"""


def _tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse", metrics=["mae"])
    model.optimizer.build(model.trainable_variables)
    return model


def _restore(folder, steps=5):
    model = _tiny_model()
    checkpoint = StepCheckpoint(str(folder))
    checkpoint.set_model(model)
    checkpoint.set_params({"steps": steps, "epochs": 3})
    checkpoint.on_train_begin()
    return checkpoint, model


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_to_resume_from(tmp_path, capsys):
    from nfnet_keras import rundir

    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    assert sorted(os.listdir(tmp_path)) == sorted(["kernel.npy", "step-0000-000001", *leftovers])
    assert len(leftovers) == 1  # the half-written checkpoint, never renamed to step-0000-000002

    checkpoint, model = _restore(tmp_path)
    assert (checkpoint.restored_epoch, checkpoint.restored_step) == (0, 1)
    assert model._initial_epoch == 0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel),
                                  np.load(tmp_path / "kernel.npy"))
    assert "at step 1 of 5 of epoch 1." in capsys.readouterr().out
    assert rundir.remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / leftovers[0])]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    model = _tiny_model()
    checkpoint = StepCheckpoint(str(tmp_path), keep_steps=3)
    checkpoint.set_model(model)
    checkpoint._current_epoch = 1
    checkpoint._save_model()  # epoch-0001
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    checkpoint._save_step(1, 2, 5)
    model.layers[0].kernel.assign(kernel + 1)
    checkpoint._save_step(1, 4, 5)
    weights = tmp_path / "step-0001-000004" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated

    checkpoint, model = _restore(tmp_path)
    assert (checkpoint.restored_epoch, checkpoint.restored_step) == (1, 2)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel), kernel)
    assert "checkpoint " + str(weights) + " is unreadable; trying the one before." in capsys.readouterr().out
    # A mid-epoch checkpoint of another number of steps per epoch (other data) is not resumed from.
    checkpoint, _ = _restore(tmp_path, steps=6)
    assert (checkpoint.restored_epoch, checkpoint.restored_step) == (1, 0)


def test_mid_epoch_checkpoints_keep_the_newest_and_none_older_than_an_epoch(tmp_path):
    model = _tiny_model()
    checkpoint = StepCheckpoint(str(tmp_path))
    checkpoint.set_model(model)
    for step in (1, 2, 3):
        checkpoint._save_step(0, step, 5)
    assert sorted(os.listdir(tmp_path)) == ["step-0000-000002", "step-0000-000003"]
    assert checkpoint.newest() == (0, 3)
    checkpoint.on_epoch_end(0)
    assert sorted(os.listdir(tmp_path)) == ["epoch-0001"]
    assert checkpoint.newest() == (1, 0)


def test_every_steps_must_be_a_count():
    with pytest.raises(ValueError, match=r"every_steps must be an int >= 0 \(0: only at epoch ends\), got -2\."):
        StepCheckpoint("unused", every_steps=-2)


# === Signals ===


def test_a_first_signal_sets_the_flag_a_second_ctrl_c_interrupts_and_the_handlers_come_back():
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored, which
    # StopSignals leaves alone: give this process Python's own Ctrl-C handler for the test.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with StopSignals() as stop:
            assert stop.received is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs at the next bytecode
            assert stop.received == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_preempted_names_the_signal_and_where():
    e = Preempted(signal.SIGTERM, 2, 7, 20)
    assert (e.signum, e.completed, e.step, e.steps) == (signal.SIGTERM, 2, 7, 20)
    assert str(e) == "stopped by SIGTERM after epoch 2, step 7"


# === The pipeline: a function of (seed, epoch, step) ===


@pytest.mark.parametrize("policy", ["noise_rotate_flip", "standard", "translate_flip", "translate_altflip", "none"])
def test_every_policy_resumes_at_any_step_on_the_same_batches(policy):
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    y = np.arange(20)

    def batches(ds):
        return [(a.numpy(), b.numpy()) for a, b in ds]

    full = batches(data.make_epoch_dataset(x, y, 6, 3, policy, seed=3, start_epoch=0))
    assert len(full) == 3 * 4
    for epoch in range(3):  # every image once per epoch, in an order that changes with the epoch
        labels = np.concatenate([b for _, b in full[epoch * 4:(epoch + 1) * 4]])
        assert sorted(labels) == list(range(20))
    assert not np.array_equal(full[0][1], full[4][1])
    given = batches(data.make_epoch_dataset(x, y, 6, 3, policy, seed=3, start_epoch=1, start_step=2))
    fed = data.make_epoch_dataset(x, y, 6, 3, policy, seed=3)  # as fit tells it, through its EpochFeed
    fed.epoch_feed.start_epoch.assign(1)
    fed.epoch_feed.start_step.assign(2)
    for resumed in (given, batches(fed)):
        assert len(resumed) == len(full) - 6
        for (a, b), (c, d) in zip(full[6:], resumed, strict=True):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
    other = batches(data.make_epoch_dataset(x, y, 6, 1, policy, seed=4, start_epoch=0))
    assert not np.array_equal(other[0][1], full[0][1])  # the order depends on the seed
    if policy != "none":  # and the augmentation on the epoch: image 0's view changes
        views = [a[list(b).index(0)] for epoch in range(3) for a, b in full[epoch * 4:(epoch + 1) * 4] if 0 in b]
        assert len(views) == 3 and not (np.array_equal(views[0], views[1]) and np.array_equal(views[1], views[2]))


def test_the_start_step_must_lie_inside_an_epoch():
    x, y = np.zeros((20, 8, 8, 3), np.uint8), np.arange(20)
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, 4\) \(the batches of an epoch\), got 4"):
        data.make_epoch_dataset(x, y, 6, 3, "none", start_epoch=0, start_step=4)


def test_rotate_batch_turns_about_the_centre():
    images = np.random.default_rng(1).normal(size=(2, 5, 5, 3)).astype("float32")
    np.testing.assert_array_equal(data.rotate_batch(images, np.zeros(2, "float32")).numpy(), images)
    quarter = data.rotate_batch(images, np.full(2, 90.0, "float32")).numpy()
    np.testing.assert_allclose(quarter, np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)


# === In process: training.fit_model with a StepCheckpoint ===


class _SignalAt(keras.callbacks.Callback):
    """Sets `stop.received` to SIGTERM at the end of step `at = (epoch, batch)`, as the signal handler would."""

    def __init__(self, stop, at):
        super().__init__()
        self.stop, self.at, self.epoch = stop, at, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.stop.received = signal.SIGTERM


def _fit_in_process(folder, stop_at=None):
    """3 epochs of 4 steps of a small classifier through `training.fit_model`; returns (weights, history)."""
    from types import SimpleNamespace

    from nfnet_keras import training
    from nfnet_keras.config import TrainConfig

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 20)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    train_ds = data.make_dataset(x, y, 6, training=True, augment="noise_rotate_flip", seed=1, epochs=3)
    stop = SimpleNamespace(received=None)
    callbacks = [_SignalAt(stop, stop_at), StepCheckpoint(str(folder), stop=stop)]
    result = training.fit_model(model, TrainConfig(epochs=3), train_ds, data.make_dataset(x[:12], y[:12], 6),
                                callbacks=callbacks, verbose=0)
    return [keras.ops.convert_to_numpy(w) for w in model.weights], result.history


@pytest.mark.parametrize("stop_at, preempted, listing", [
    ((0, 1), (0, 2, 4), ["step-0000-000002"]),  # inside epoch 1: checkpointed at its step 2
    ((1, 3), (2, 0, 4), ["epoch-0001", "epoch-0002"]),  # at epoch 2's last step: epoch 2 ends first
])
def test_a_stop_checkpoints_where_it_says_and_the_resumed_fit_ends_as_an_uninterrupted_one(
        stop_at, preempted, listing, tmp_path):
    expected, history = _fit_in_process(tmp_path / "reference")
    folder = tmp_path / "stopped"
    with pytest.raises(Preempted) as stopped:
        _fit_in_process(folder, stop_at)
    assert (stopped.value.completed, stopped.value.step, stopped.value.steps) == preempted
    assert stopped.value.signum == signal.SIGTERM
    assert sorted(os.listdir(folder)) == listing
    weights, resumed = _fit_in_process(folder)
    for a, b in zip(expected, weights, strict=True):
        np.testing.assert_array_equal(a, b)
    # The resumed run's epochs (and, for a mid-epoch stop, its first one over all of its steps) log as the reference.
    first = preempted[0]
    assert resumed["loss"] == history["loss"][first:] and resumed["accuracy"] == history["accuracy"][first:]
