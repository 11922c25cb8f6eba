"""Training that survives preemption: stop signals and mid-epoch checkpoints.

Clusters and preemptible machines stop a job with SIGTERM (Ctrl-C sends
SIGINT), and an epoch can take hours. `StopSignals` turns both signals into a
flag, never an exception in the middle of a step; `StepCheckpoint` (an
`EpochCheckpoint` that also writes checkpoints inside an epoch) sees the flag
at the next step boundary, writes a checkpoint of the weights, the optimizer
state, the metrics so far and the (epoch, step) reached, and raises
`Preempted`. A rerun restores the newest readable checkpoint, epoch or
mid-epoch, and finishes the interrupted epoch from the step after it; with an
epoch-indexed pipeline (`data.make_epoch_dataset`, told the step through its
`EpochFeed`) it trains on the batches an uninterrupted run trains on.
"""

import glob
import json
import os
import shutil
import signal
import threading

import keras
import numpy as np

from nfnet_keras.callbacks import EpochCheckpoint


class Preempted(Exception):
    """Training stopped on a signal at a step boundary, with a checkpoint of where it stopped.

    Attributes:
        signum: int. The signal (`signal.SIGTERM` or `signal.SIGINT`).
        completed: int. Complete epochs checkpointed.
        step: int. Steps of epoch `completed + 1` checkpointed (0: at an epoch's end).
        steps: int or None. Steps per epoch.
    """

    def __init__(self, signum, completed, step=0, steps=None):
        super().__init__(f"stopped by {signal.Signals(signum).name} after epoch {completed}, step {step}")
        self.signum, self.completed, self.step, self.steps = signum, completed, step, steps


class StopSignals:
    """A context manager: SIGTERM and SIGINT set `received` instead of stopping the process.

    The first signal only records its number (`received`); the training loop
    stops at the next step boundary. A second one acts as without this: a
    second Ctrl-C raises `KeyboardInterrupt`, a second SIGTERM ends the process
    with the default action. A signal the process ignores (e.g. SIGINT for a
    job started in the background by a shell) stays ignored. Outside the main
    thread (where Python cannot set handlers) nothing is installed.

    Args:
        signals: tuple of int. Defaults to `(signal.SIGTERM, signal.SIGINT)`.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            return
        self._restore()  # a second signal: what it did before
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def __enter__(self):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


class StepCheckpoint(EpochCheckpoint):
    """An `EpochCheckpoint` that also checkpoints inside an epoch: every `every_steps` steps and on a stop signal.

    A mid-epoch checkpoint is a folder `step-EEEE-SSSSSS` (epochs complete,
    steps of the next one done) in the checkpoint folder, written as the epoch
    ones are (a temporary folder renamed when complete): the weights with the
    optimizer state, and in `state.json` the epoch, the step, the steps per
    epoch and the values of the model's metric variables (sums, as Keras' mean
    metrics keep: the resumed epoch then reports the loss and accuracy of all
    its steps). The newest
    `keep_steps` are kept, and none older than the newest epoch checkpoint.

    On start the newest readable checkpoint, epoch or mid-epoch, is restored.
    After a mid-epoch one, `fit` runs the rest of that epoch: `feed` (the
    training pipeline's `EpochFeed`, set by `training.fit_model`) is told to
    leave out the batches done, the metrics are restored after the first
    step (when Keras has built them), and the epoch ends (validation, epoch checkpoint, logs) after its
    remaining steps, through `model.stop_training`, which Keras reads after
    every step; training then goes on with the next epoch.

    When `stop.received` is set (`StopSignals`), the next step end writes a
    mid-epoch checkpoint and raises `Preempted`; after an epoch's last step,
    the epoch is finished first (validation, its checkpoint and the logs of
    every callback) and `Preempted` is raised at the next epoch's start.

    Args:
        backup_dir: str. The checkpoint folder.
        keep: int. Complete epoch checkpoints kept. Defaults to `2`.
        every_steps: int. Steps between mid-epoch checkpoints; 0: only on a
            stop signal. Defaults to `0`.
        keep_steps: int. Mid-epoch checkpoints kept. Defaults to `2`.
        stop: object with a `received` attribute (a signal number or None),
            e.g. `StopSignals`; None: no signals. Defaults to `None`.
    """

    def __init__(self, backup_dir, keep=2, every_steps=0, keep_steps=2, stop=None):
        super().__init__(backup_dir, keep=keep)
        if not (isinstance(every_steps, int) and every_steps >= 0):
            raise ValueError(f"every_steps must be an int >= 0 (0: only at epoch ends), got {every_steps!r}.")
        self.every_steps, self.keep_steps, self.stop = every_steps, keep_steps, stop
        self.feed = None
        self.restored_step = 0
        self._metric_values = None
        self._offset = 0
        self._ended_epoch = False
        self._stop_at_epoch_begin = False
        self._epoch = 0

    # === Reading ===

    def mid_epoch(self):
        """[(epoch, step, folder, state)] of the complete mid-epoch checkpoints, oldest first."""
        found = []
        for path in glob.glob(os.path.join(self.backup_dir, "step-*")):
            try:
                with open(os.path.join(path, "state.json")) as f:
                    state = json.load(f)
                found.append((int(state["epoch"]), int(state["step"]), path, state))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # incomplete or unreadable: not a checkpoint
        return sorted(found, key=lambda item: item[:2])

    def newest(self):
        """(epochs complete, steps of the next epoch) of the newest complete checkpoint; (0, 0) if none."""
        found = [(epoch, 0) for epoch, _ in self.complete()] + [item[:2] for item in self.mid_epoch()]
        return max(found, default=(0, 0))

    def _load_model(self):
        candidates = [(epoch, 0, path, None) for epoch, path in self.complete()] + self.mid_epoch()
        candidates.sort(key=lambda item: item[:2])
        steps = self._steps()
        usable = [c for c in candidates if c[3] is None or (steps and c[3].get("steps_per_epoch") == steps)]
        if not usable or usable[-1][1] == 0:  # the newest is an epoch's: EpochCheckpoint's restore
            return super()._load_model()
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        for epoch, step, path, state in reversed(usable):
            if state is None:  # an epoch checkpoint older than every readable mid-epoch one
                return super()._load_model()
            weights = os.path.join(path, "model.weights.h5")
            try:
                self.model.load_weights(weights)
            except Exception:  # truncated or corrupt h5
                print(f"note: checkpoint {weights} is unreadable; trying the one before.", flush=True)
                continue
            self.model._initial_epoch = epoch
            self.restored_epoch, self.restored_step = epoch, step
            self._metric_values = state.get("metrics")
            if self.feed is not None:
                self.feed.resume_step = step
            print(f"Resuming from {path} (epoch {epoch} complete), at step {step} of {steps} of epoch {epoch + 1}.",
                  flush=True)
            return
        return super()._load_model()

    def _steps(self):
        return (self.params or {}).get("steps")

    # === Training ===

    def on_train_begin(self, logs=None):
        self.restored_step, self._metric_values = 0, None
        self._offset, self._ended_epoch, self._stop_at_epoch_begin = 0, False, False
        if self.feed is not None:
            self.feed.resume_step = 0
        super().on_train_begin(logs)
        self._offset = self.restored_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._stop_at_epoch_begin:
            raise Preempted(self.stop.received, epoch, 0, self._steps())

    def _restore_metrics(self):
        """Adds the checkpoint's metric values to the metrics of the resumed epoch's first step.

        Keras builds the compiled metrics in the first step, so they are restored after it. Their
        variables are sums (totals and counts), and `x + y == y + x` in floating point: the epoch's
        metrics then equal an uninterrupted run's bit for bit.
        """
        variables, values = self.model.metrics_variables, self._metric_values
        self._metric_values = None
        if len(variables) != len(values):
            print("note: the metrics differ from the checkpoint's; this epoch's training metrics cover the steps "
                  "since the resume.", flush=True)
            return
        for variable, value in zip(variables, values):
            variable.assign(variable + np.asarray(value, dtype=variable.dtype))

    def on_train_batch_end(self, batch, logs=None):
        if self._metric_values is not None:
            self._restore_metrics()
        steps = self._steps()
        step = self._offset + batch + 1  # steps of this epoch done
        epoch = self._epoch
        if steps and step < steps and not self.model.stop_training:
            if self.stop is not None and self.stop.received is not None:
                self._save_step(epoch, step, steps)
                raise Preempted(self.stop.received, epoch, step, steps)
            if self.every_steps and step % self.every_steps == 0:
                self._save_step(epoch, step, steps)
        if self._offset and steps and step >= steps and not self.model.stop_training:
            self.model.stop_training = True  # the rest of a resumed epoch is done: end it here
            self._ended_epoch = True

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)  # the epoch checkpoint
        self._prune()
        if self._ended_epoch:
            self.model.stop_training = False
            self._ended_epoch = False
        self._offset = 0
        if self.stop is not None and self.stop.received is not None:
            self._stop_at_epoch_begin = True  # after every callback has seen this epoch's end

    # === Writing ===

    def _save_step(self, epoch, step, steps):
        metrics = [keras.ops.convert_to_numpy(v).tolist() for v in self.model.metrics_variables]
        state = {"epoch": epoch, "step": step, "steps_per_epoch": steps, "metrics": metrics}
        self._write_checkpoint(f"step-{epoch:04d}-{step:06d}", state)
        self._prune()

    def _prune(self):
        """Removes the mid-epoch checkpoints beyond the newest `keep_steps` and those older than the newest epoch."""
        newest_epoch = self.latest_epoch()
        found = self.mid_epoch()
        for index, (epoch, _, path, _) in enumerate(found):
            if epoch < newest_epoch or index < len(found) - self.keep_steps:
                shutil.rmtree(path, ignore_errors=True)
