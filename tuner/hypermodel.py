"""`NFNetHyperModel`: the NF-ResNet training run of `nfnet_keras.training`, as a HyperModel.

`build(hp)` declares the grid (`lr`, `batch_size`) and builds and compiles the
model through `nfnet_keras.training`; `fit(hp, model, train, val, ...)` makes
the tf.data pipelines at the trial's batch size and trains. A trial whose loss
becomes NaN/inf stops at that step (`training.DivergenceMonitor`) and reports
a NaN objective with `diverged = 1` (never the chance-level accuracy of a
dead network); see `tuner.oracle`.
"""

import dataclasses
import json
import math
import os

import keras
import keras_tuner
import numpy as np

from nfnet_keras import training
from nfnet_keras.model import build_model
from tuner.oracle import DIVERGED

OBJECTIVE = "val_accuracy"


class NFNetHyperModel(keras_tuner.HyperModel):
    """Tunes the learning rate and the batch size of a `TrainConfig`.

    Args:
        config: nfnet_keras.training.TrainConfig. Every fixed setting of a trial
            (preset, epochs, schedule, augmentation, seed, ...); its `lr` and
            `batch_size` are replaced by the trial's.
        lrs: sequence of float. The learning rates of the grid.
        batch_sizes: sequence of int. The batch sizes of the grid.
        train_size: int or None. Number of training images, for the schedule's
            steps per epoch; `None` only where no trial runs (the chief).
        project_dir: str or None. The tuner's project folder: each execution's
            history, divergence and seconds per epoch go to
            `trial_<id>/result.json` (`result_execution<i>.json` for i > 0)
            there. Defaults to `None` (not written).

    Example:

    ```python
    train, val, _ = training.load_splits(config)
    hypermodel = NFNetHyperModel(config, [0.01, 0.1], [32, 64], len(train[0]))
    tuner = NFNetGridSearch(hypermodel, max_trials=4, directory="tuner_runs")
    tuner.search(train=train, val=val)
    ```
    """

    def __init__(self, config, lrs, batch_sizes, train_size=None, project_dir=None):
        super().__init__(name="nfnet")
        self.config = config
        self.lrs = [float(v) for v in lrs]
        self.batch_sizes = [int(v) for v in batch_sizes]
        self.train_size = train_size
        self.project_dir = project_dir
        self._trial_id = None
        self._execution = 0
        self._trial_config = None

    def begin_trial(self, trial_id):
        """Called by the tuner before a trial's executions (seeds: `seed + execution`)."""
        self._trial_id = trial_id
        self._execution = 0

    def trial_config(self, hp, execution=0):
        """The trial's `TrainConfig`: the fixed one with the trial's lr, batch size and seed."""
        return dataclasses.replace(
            self.config,
            lr=hp.get("lr"),
            batch_size=hp.get("batch_size"),
            seed=self.config.seed + execution,
        ).validate()

    def build(self, hp):
        hp.Choice("lr", self.lrs)
        hp.Choice("batch_size", self.batch_sizes)
        config = self.trial_config(hp, self._execution)
        self._trial_config = config
        training.setup_runtime(config)  # seeds, determinism, precision: the same start for every trial
        model = build_model(config.preset, **config.overrides)
        steps_per_epoch = math.ceil(self.train_size / config.batch_size) if self.train_size else 1
        return training.compile_model(model, config, steps_per_epoch)

    def fit(self, hp, model, train, val, callbacks=None, verbose="auto", **kwargs):
        """Trains `model` on `train` = (images, labels) and validates on `val`.

        Returns:
            The metrics of the epoch with the best validation accuracy, plus
            `diverged` (0 or 1); a diverged trial returns `val_accuracy = nan`.
        """
        config = self._trial_config or self.trial_config(hp)
        self._execution += 1
        train_ds, val_ds = training.make_datasets(config, train, val, batch_size=config.batch_size)
        monitor = training.DivergenceMonitor()
        timer = training.EpochTimer()
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=config.epochs,
            callbacks=[monitor, timer, *(callbacks or [])],
            shuffle=False,  # the tf.data pipeline shuffles
            verbose=verbose,
            **kwargs,
        )
        record = dict(
            trial_id=self._trial_id,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=config.seed,
            diverged=monitor.diverged,
            diverged_at=monitor.diverged_at,
            seconds_per_epoch=timer.seconds_per_epoch,
            history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        )
        if monitor.diverged:
            at = monitor.diverged_at
            print(f"Trial {self._trial_id} (lr {config.lr}, batch {config.batch_size}) diverged: "
                  f"the loss became NaN/inf at epoch {at['epoch']}, step {at['step']}; stopped.", flush=True)
            metrics = {OBJECTIVE: float("nan"), DIVERGED: 1.0,
                       "diverged_epoch": float(at["epoch"]), "diverged_step": float(at["step"])}
        else:
            scores = history.history[OBJECTIVE]
            best = int(np.argmax(scores))
            metrics = {k: float(v[best]) for k, v in history.history.items()}
            metrics.update({DIVERGED: 0.0, "best_epoch": float(best + 1)})
        if timer.seconds_per_epoch:
            metrics["seconds_per_epoch"] = float(np.mean(timer.seconds_per_epoch))
        record["metrics"] = metrics
        self._write_record(record)
        return metrics

    def _write_record(self, record):
        if not self.project_dir or self._trial_id is None:
            return
        execution = self._execution - 1
        folder = os.path.join(self.project_dir, f"trial_{self._trial_id}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"result_execution{execution}.json" if execution else "result.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)


def hparams_experiment(log_dir, lrs, batch_sizes):
    """Writes the HParams experiment (domains and metrics) at the root of the TensorBoard logs.

    KerasTuner writes each trial's values into `<log_dir>/<trial_id>/execution<i>`;
    this names the columns the dashboard shows for them.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp_api

    hparams = [hp_api.HParam("lr", hp_api.Discrete([float(v) for v in lrs])),
               hp_api.HParam("batch_size", hp_api.Discrete([int(v) for v in batch_sizes]))]
    metrics = [hp_api.Metric("epoch_accuracy", group="validation", display_name="val accuracy"),
               hp_api.Metric("epoch_loss", group="validation", display_name="val loss"),
               hp_api.Metric("epoch_accuracy", group="train", display_name="train accuracy"),
               hp_api.Metric("epoch_loss", group="train", display_name="train loss")]
    with tf.summary.create_file_writer(log_dir).as_default():
        hp_api.hparams_config(hparams=hparams, metrics=metrics)


def tensorboard_callback(log_dir):
    """A `keras.callbacks.TensorBoard` for `search`: KerasTuner gives each trial its own
    `<log_dir>/<trial_id>/execution<i>` and adds the HParams callback."""
    return keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq="epoch", profile_batch=0)
