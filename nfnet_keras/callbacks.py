"""The Keras callbacks of a training run.

`DivergenceMonitor` stops at the first NaN/inf loss and says where;
`EpochCheckpoint` saves every epoch atomically and restores the newest
readable one; `EpochTimer` times epochs and estimates the rest of the run;
`FreezeAfterEpochs` trains some layers for the first epochs only;
`RecalibrateBatchNorm` gives the averaged weights BatchNorm statistics of
their own.
What a run shows in TensorBoard is in `nfnet_keras.tensorboard`.
"""

import glob
import json
import os
import shutil
import time

import keras
import numpy as np

from nfnet_keras import fileio
from nfnet_keras.models.batchnorm_stats import (
    batchnorm_statistics,
    recompute_batchnorm_statistics,
    set_batchnorm_statistics,
)


class DivergenceMonitor(keras.callbacks.TerminateOnNaN):
    """Stops training at the first NaN/inf loss and remembers where (`diverged_at`)."""

    def __init__(self):
        super().__init__()
        self.diverged_at = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss) and self.diverged_at is None:
            self.diverged_at = dict(epoch=self._epoch + 1, step=batch + 1)
        super().on_batch_end(batch, logs)

    @property
    def diverged(self):
        return self.diverged_at is not None


class CheckpointError(RuntimeError):
    """No checkpoint of the run could be read; the message names the files and what to do."""


class EpochCheckpoint(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore`, written atomically, with a fallback to the previous epoch.

    Keras writes the weights and then the epoch counter in place, so a kill
    during the save leaves a corrupt file or a counter that disagrees with the
    weights. Here every epoch's state (weights with optimizer state + epoch)
    goes to a temporary folder renamed to `epoch-NNNN` only when complete; the
    newest `keep` complete ones are kept. On start the newest one that loads is
    restored (a truncated file falls back to the one before, with a note).

    The class relies on `BackupAndRestore`'s private `_save_model`,
    `_load_model` and `_current_epoch` and sets `model._initial_epoch`
    (Keras 3.15); `tests/test_fit.py` fails if those change.

    Args:
        backup_dir: str. The checkpoint folder.
        keep: int. Complete checkpoints kept. Defaults to `2`.
    """

    def __init__(self, backup_dir, keep=2):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.keep = keep
        self.restored_epoch = 0

    def complete(self):
        """[(epoch, folder)] of the complete checkpoints, oldest first."""
        found = []
        for path in glob.glob(os.path.join(self.backup_dir, "epoch-*")):
            meta = os.path.join(path, "state.json")
            try:
                with open(meta) as f:
                    found.append((int(json.load(f)["epoch"]), path))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # incomplete or unreadable: not a checkpoint
        return sorted(found)

    def latest_epoch(self):
        found = self.complete()
        return found[-1][0] if found else 0

    def _load_model(self):
        found = self.complete()
        if not found:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        failures = []
        for epoch, path in reversed(found):
            weights = os.path.join(path, "model.weights.h5")
            try:
                self.model.load_weights(weights)
            except Exception as e:  # truncated or corrupt h5
                failures.append(f"{weights} ({type(e).__name__})")
                print(f"note: checkpoint {weights} is unreadable; trying the one before.", flush=True)
                continue
            self.model._initial_epoch = epoch
            self.restored_epoch = epoch
            print(f"Resuming from {path} (epoch {epoch} complete).", flush=True)
            return
        raise CheckpointError(
            f"no readable checkpoint in {self.backup_dir}: {'; '.join(failures)}. Delete that folder to "
            "start the run from epoch 1, or restore the files from a backup."
        )

    def _save_model(self):
        self._write_checkpoint(f"epoch-{self._current_epoch:04d}", {"epoch": self._current_epoch})
        for _, path in self.complete()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def _write_checkpoint(self, name, state):
        """Writes the model's weights (with optimizer state) and `state` (state.json) to the folder `name`, atomically.

        Everything goes to a temporary folder first, renamed to `name` when complete: a kill during the
        write leaves the checkpoints before it as they were (and a temporary removed at the next start).
        """
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = os.path.join(self.backup_dir, f"{fileio.TMP_MARK}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        final = os.path.join(self.backup_dir, name)
        fileio.check_free_space(self.backup_dir, _state_bytes(self.model), final)
        try:
            os.makedirs(tmp)
            self.model.save_weights(os.path.join(tmp, "model.weights.h5"))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise fileio.describe_write_error(e, final) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _state_bytes(model):
    """About what a checkpoint of `model` takes: its weights and its optimizer's, plus headroom."""
    variables = list(model.weights) + (list(model.optimizer.variables) if model.optimizer is not None else [])
    raw = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return int(raw * 1.1) + (1 << 20)


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch of this process; prints the estimate for the rest of the run.

    Args:
        total_epochs: int or None. The run's epochs, for the estimate. Defaults
            to `None` (no estimate).
    """

    def __init__(self, total_epochs=None):
        super().__init__()
        self.total_epochs = total_epochs
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.time() - self._t)
        left = (self.total_epochs or 0) - (epoch + 1)
        if left > 0:
            eta = left * float(np.median(self.times))
            print(f"Epoch {epoch + 1} of {self.total_epochs} done; about {_duration(eta)} left "
                  f"({left} epoch(s) at {_duration(np.median(self.times))} each).", flush=True)

    @property
    def seconds_per_epoch(self):
        return list(self.times)


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class FreezeAfterEpochs(keras.callbacks.Callback):
    """Trains the named layers for the first `epochs` epochs only, then freezes them.

    From the first epoch `>= epochs` on (also when a resumed run starts past
    it), the train step is rebuilt once with the layers not trainable: their
    variables then get no gradient and no optimizer update (their momentum is
    kept, not decayed), as PyTorch's `requires_grad = False`. The optimizer is
    built on every trainable variable before that, so its variables (and a
    checkpoint's) are the same whenever the freeze happens.

    Between epochs the layers are trainable again (the rebuilt train step
    keeps leaving them out): Keras pairs the model's trainable weights with
    the optimizer's moving averages by position when `fit` ends
    (`finalize_variable_values`, with `use_ema`), and the saved model is that
    of a run without the freeze. At the end of training the train step is
    rebuilt with them, for a later `fit`.

    Changing the trainable variables inside `fit` needs the TensorFlow
    backend: Keras' JAX trainer takes the trainable variables (and the
    optimizer's gradient list) as the state of its compiled step.
    `TrainConfig.validate` refuses `--whitening-bias-epochs` on other backends.

    Args:
        layer_names: sequence of str. Layers of the model.
        epochs: int. Epochs they train for (0: frozen from the start).
    """

    def __init__(self, layer_names, epochs):
        super().__init__()
        self.layer_names, self.epochs = tuple(layer_names), epochs
        self._step_rebuilt = False

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._step_rebuilt = False

    def on_epoch_begin(self, epoch, logs=None):
        if epoch < self.epochs:
            return
        self._set_trainable(False)
        if not self._step_rebuilt:
            self.model.make_train_function(force=True)
            self._step_rebuilt = True

    def on_epoch_end(self, epoch, logs=None):
        self._set_trainable(True)

    def on_train_end(self, logs=None):
        self._set_trainable(True)
        if self._step_rebuilt:
            self.model.make_train_function(force=True)
            self._step_rebuilt = False

    def _set_trainable(self, trainable):
        for name in self.layer_names:
            self.model.get_layer(name).trainable = trainable


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """BatchNorm statistics recomputed for the EMA weights whenever they are in the model.

    Keras' weight averaging (`use_ema`, swapped in by
    `keras.callbacks.SwapEMAWeights`) averages the trainable variables only:
    the averaged weights are evaluated with the moving statistics of the raw
    ones. With a fast BatchNorm momentum (airbench94's 0.4) those follow the
    last few steps, far from weights averaged over dozens of steps, and the
    validation accuracy suffers while the lr is high. Placed after a
    `SwapEMAWeights(swap_on_epoch=True)`, this callback recomputes the
    statistics for the averaged weights from `images`
    (`models.recompute_batchnorm_statistics`) once per epoch, before
    validation, and keeps them in the model with the averaged weights: during
    validation and from the epoch's end to the next epoch's start (so
    training ends with them). While the raw weights train, the raw
    statistics are back: a checkpoint written at an epoch's end, before the
    averages are swapped in, and one written mid-epoch hold the same
    variables as a run without this callback, and a resumed run continues
    exactly.

    Args:
        images: float array `(N, H, W, C)`, preprocessed training images.
        batch_size: int. Images per forward pass.
    """

    def __init__(self, images, batch_size):
        super().__init__()
        self.images, self.batch_size = images, batch_size
        self._raw = None  # the raw weights' statistics while the model holds the recomputed ones
        self._recomputed = None  # this epoch's recomputed statistics

    def on_train_begin(self, logs=None):
        self._raw = self._recomputed = None

    def on_epoch_begin(self, epoch, logs=None):
        self._restore_raw()
        self._recomputed = None

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_test_end(self, logs=None):
        self._restore_raw()

    def on_epoch_end(self, epoch, logs=None):
        self._swap_in()

    def _swap_in(self):
        if self._raw is not None:
            return
        self._raw = batchnorm_statistics(self.model)
        if self._recomputed is None:
            recompute_batchnorm_statistics(self.model, self.images, self.batch_size)
            self._recomputed = batchnorm_statistics(self.model)
        else:
            set_batchnorm_statistics(self.model, self._recomputed)

    def _restore_raw(self):
        if self._raw is not None:
            set_batchnorm_statistics(self.model, self._raw)
            self._raw = None
