"""`NFNetHyperModel`: the NF-ResNet training run of `nfnet_keras.training`, as a HyperModel.

`build(hp)` declares the grid (`lr`, `batch_size`, and `agc` when it is an
axis) and builds and compiles the model through `nfnet_keras.training`;
`fit(hp, model, train, val, ...)` makes the tf.data pipelines at the trial's
batch size and trains with `training.fit_model`, the same fit as
`python -m nfnet_keras.fit`. A trial whose loss becomes NaN/inf stops at that
step and reports a NaN objective with `diverged = 1` (never the chance-level
accuracy of a dead network); see `nfnet_keras.tuner.oracle`.
"""

import dataclasses
import math
import os

import keras_tuner
import numpy as np

from nfnet_keras import fileio, training
from nfnet_keras.tuner.oracle import DIVERGED, trial_number

OBJECTIVE = "val_accuracy"


class NFNetHyperModel(keras_tuner.HyperModel):
    """Tunes the learning rate and the batch size of a `TrainConfig`.

    Args:
        config: nfnet_keras.training.TrainConfig. Every fixed setting of a trial
            (preset, epochs, schedule, augmentation, seed, ...); its `lr` and
            `batch_size` are replaced by the trial's.
        lrs: sequence of float. The learning rates of the grid.
        batch_sizes: sequence of int. The batch sizes of the grid.
        agcs: sequence of float or None. AGC clipping factors as a third axis
            of the grid (0 disables AGC); `None` keeps `config.agc` fixed.
            Defaults to `None`.
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

    def __init__(self, config, lrs, batch_sizes, train_size=None, project_dir=None, agcs=None):
        super().__init__(name="nfnet")
        self.config = config
        self.lrs = [float(v) for v in lrs]
        self.batch_sizes = [int(v) for v in batch_sizes]
        self.agcs = None if agcs is None else [float(v) for v in agcs]
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
            agc=hp.get("agc") if self.agcs is not None else self.config.agc,
            seed=self.config.seed + execution,
        ).validate()

    def build(self, hp):
        hp.Choice("lr", self.lrs)
        hp.Choice("batch_size", self.batch_sizes)
        if self.agcs is not None:
            hp.Choice("agc", self.agcs)
        config = self.trial_config(hp, self._execution)
        self._trial_config = config
        training.setup_runtime(config)  # seeds, determinism, precision: the same start for every trial
        model = training.build_for(config)
        steps_per_epoch = math.ceil(self.train_size / config.batch_size) if self.train_size else 1
        return training.compile_model(model, config, steps_per_epoch)

    def fit(self, hp, model, train, val, callbacks=None, verbose="auto"):
        """Trains `model` on `train` = (images, labels) and validates on `val`.

        Returns:
            The metrics of the epoch with the best validation accuracy, plus
            `diverged` (0 or 1); a diverged trial returns `val_accuracy = nan`.
        """
        config = self._trial_config or self.trial_config(hp)
        self._execution += 1
        train_ds, val_ds = training.make_datasets(config, train, val, batch_size=config.batch_size)
        training.adapt_to(model, train[0], config.data_init)
        result = training.fit_model(model, config, train_ds, val_ds, callbacks=callbacks or (), verbose=verbose,
                                    train_images=train[0])
        record = dict(
            trial_id=self._trial_id,
            lr=config.lr,
            batch_size=config.batch_size,
            agc=config.agc,
            seed=config.seed,
            diverged=result.diverged,
            diverged_at=result.diverged_at,
            seconds_per_epoch=result.seconds_per_epoch,
            history=result.history,
        )
        if result.diverged:
            at = result.diverged_at
            print(f"Trial {trial_number(self._trial_id)} (lr {config.lr}, batch {config.batch_size}) diverged: "
                  f"the loss became NaN/inf at epoch {at['epoch']}, step {at['step']}; stopped.", flush=True)
            metrics = {OBJECTIVE: float("nan"), DIVERGED: 1.0,
                       "diverged_epoch": float(at["epoch"]), "diverged_step": float(at["step"])}
        else:
            best_epoch, metrics = result.best_epoch(OBJECTIVE)
            metrics.update({DIVERGED: 0.0, "best_epoch": float(best_epoch)})
        if result.seconds_per_epoch:
            metrics["seconds_per_epoch"] = float(np.mean(result.seconds_per_epoch))
        record["metrics"] = metrics
        self._write_record(record)
        return metrics

    def _write_record(self, record):
        if not self.project_dir or self._trial_id is None:
            return
        execution = self._execution - 1
        folder = os.path.join(self.project_dir, f"trial_{self._trial_id}")
        os.makedirs(folder, exist_ok=True)
        fileio.write_json(os.path.join(folder, f"result_execution{execution}.json" if execution else "result.json"),
                          record)


def hparams_experiment(lrs, batch_sizes, agcs=None):
    """The HParams experiment of the grid: its axes against validation and training metrics.

    Each trial is one HParams session: KerasTuner writes the trial's values
    into `<log_dir>/<trial_id>/execution<i>`, above the trial's `train/` and
    `validation/` runs. The experiment names the columns: the axes of the
    grid (shown by default, with their grid values as the domain), then
    validation accuracy and loss and training accuracy and loss, so the
    parallel-coordinates view draws lr x batch size against validation
    accuracy. Pass it to `tensorboard_callback`.

    Args:
        lrs: sequence of float. The learning rates of the grid.
        batch_sizes: sequence of int. The batch sizes of the grid.
        agcs: sequence of float or None. The AGC factors, when an axis.
            Defaults to `None`.

    Returns:
        An `api_pb2.Experiment`.
    """
    from nfnet_keras import tensorboard as tb

    hparams = [tb.hparam("lr", float, lrs, shown=True, description="learning rate"),
               tb.hparam("batch_size", int, batch_sizes, shown=True, description="images per step")]
    if agcs is not None:
        hparams.append(tb.hparam("agc", float, agcs, shown=True, description="AGC clipping factor (0: off)"))
    metrics = [tb.metric("epoch_accuracy", "validation", "validation accuracy"),
               tb.metric("epoch_loss", "validation", "validation loss"),
               tb.metric("epoch_accuracy", "train", "train accuracy"),
               tb.metric("epoch_loss", "train", "train loss")]
    return tb.experiment(hparams, metrics)


def tensorboard_callback(log_dir, experiment=None):
    """The TensorBoard callback for `search`.

    KerasTuner recognises it, gives each trial its own
    `<log_dir>/<trial_id>/execution<i>` and adds its HParams callback there;
    the callback writes per-epoch scalars and, into each trial's `train/` run,
    the HParams `experiment` (TensorBoard reads it from any run, so the log
    folder gets no run of its own).

    Args:
        log_dir: str. The search's TensorBoard folder.
        experiment: `api_pb2.Experiment` or None. From `hparams_experiment`.
            Defaults to `None`.

    Returns:
        A `nfnet_keras.tensorboard.TensorBoard`.
    """
    from nfnet_keras.tensorboard import TensorBoard

    return TensorBoard(log_dir, experiment=experiment)
