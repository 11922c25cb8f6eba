"""The training run, shared by `python -m nfnet_keras.fit` and the tuner.

`fit_model` trains a compiled model and returns a `FitResult` (history,
divergence, epoch times); the tuner calls it for each trial. `train` runs one
whole resumable job around it: data -> model -> fit -> test -> save -> export,
in a locked run directory (`nfnet_keras.rundir`).
"""

import dataclasses
import math
import os
import shlex
import signal
import time

import keras
import numpy as np
import tensorflow as tf

from nfnet_keras import data as data_lib
from nfnet_keras import distribution, fileio, rundir, sources
from nfnet_keras.callbacks import DivergenceMonitor, EpochTimer
from nfnet_keras.config import PRECISIONS, RECIPES, SCHEDULES, STRATEGIES, TrainConfig  # noqa: F401  (re-exported)
from nfnet_keras.contract import NUM_CLASSES, write_class_names
from nfnet_keras.inference import TTA_POLICY_VIEWS, TTA_POLICY_WEIGHTS, keras_predictor, with_tta
from nfnet_keras.network import (  # noqa: F401  (re-exported)
    ADAPT_IMAGES,
    adapt_to,
    build_for,
    compile_model,
    init_from_file,
    recipe_callbacks,
    resolve_jit,
)
from nfnet_keras.preemption import Preempted, StepCheckpoint, StopSignals
from nfnet_keras.tensorboard import SignalPropagationLogger, TensorBoard, log_hparams, log_test_metrics, session_dir

# === Runtime ===


def setup_runtime(config):
    """Seeds every generator, sets determinism, precision and the distribution.

    Returns what to build the model under (`with ...scope():`): the
    `tf.distribute` strategy (the default one for `config.strategy == "none"`,
    `MirroredStrategy` for `mirrored`), or for `data_parallel` the
    `keras.distribution.DataParallel` set for the process (`nfnet_keras.distribution`).

    Raises:
        ValueError: the strategy does not run on the Keras backend, or the
            batch does not split across the data-parallel devices.
    """
    distribution.check_backend(config.strategy)
    data_parallel = None
    if config.strategy == "data_parallel":  # joins the processes first: before any JAX computation
        data_parallel = distribution.data_parallel(config.batch_size)
    if config.strategy == "mirrored" and not tf.config.list_physical_devices("GPU"):
        # No GPU: mirror over logical CPU devices (for testing the code path).
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(os.environ.get("NFNET_CPU_REPLICAS", 2))
            )
        except RuntimeError:
            pass  # already initialised (e.g. a second run in one process)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()  # the tf.data pipeline's ops, on every backend
    keras.mixed_precision.set_global_policy(config.precision)
    if data_parallel is not None:
        return data_parallel
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# === Data ===


@dataclasses.dataclass
class Splits:
    """A run's data: `train`, `val` and `test` as `(uint8 NHWC, int64 labels)`, the class names, and notes.

    Attributes:
        notes: list of str. How the splits were made where the config did not say (printed by `train`).
    """

    train: tuple
    val: tuple
    test: tuple
    class_names: tuple
    notes: list

    @property
    def image_shape(self):
        return tuple(self.train[0].shape[1:])


def load_data(config):
    """The run's `Splits`: `config.dataset` (`sources.load_dataset`), validation held out of its training images."""
    data = sources.load_dataset(config.dataset, config.data_dir, config.tfds_dir, config.image_size)
    val_size, val_note = sources.val_size_for(config.dataset, config.val_size, len(data.train[0]))
    train, val = data_lib.split(*data.train, val_size, config.train_limit)
    return Splits(train, val, data.test, tuple(data.class_names), [n for n in (data.note, val_note) if n])


def load_splits(config):
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)) as uint8/int64 arrays."""
    data = load_data(config)
    return data.train, data.val, data.test


def check_batch_size(batch_size, train_size, flag="--batch-size"):
    """Raises a one-line ValueError if a batch of `batch_size` is larger than the `train_size` training images."""
    if batch_size > train_size:
        raise ValueError(
            f"{flag} {batch_size} is larger than the training set ({train_size} images); lower {flag} or "
            "train on more images (--train-limit, --val-size)."
        )


def make_datasets(config, train, val, batch_size=None, num_classes=NUM_CLASSES):
    """The training and validation `tf.data` pipelines for `config`."""
    batch_size = batch_size or config.batch_size
    one_hot = bool(config.label_smoothing)
    train_ds = data_lib.make_dataset(*train, batch_size, training=True, augment=config.augment, seed=config.seed,
                                     one_hot=one_hot, num_classes=num_classes, epochs=config.epochs)
    val_ds = data_lib.make_dataset(*val, batch_size, one_hot=one_hot, num_classes=num_classes)
    return train_ds, val_ds


# === Fitting ===


@dataclasses.dataclass
class FitResult:
    """What `fit_model` observed.

    Attributes:
        history: dict of lists. Keras' per-epoch logs of this call.
        diverged_at: dict or None. `{"epoch", "step"}` (1-based) of the first
            NaN/inf loss.
        seconds_per_epoch: list of float. Wall time of each epoch of this call.
    """

    history: dict
    diverged_at: dict | None
    seconds_per_epoch: list

    @property
    def diverged(self):
        return self.diverged_at is not None

    def best_epoch(self, metric="val_accuracy"):
        """(1-based epoch, {metric: value}) of the epoch with the best `metric`, or None."""
        scores = self.history.get(metric)
        if not scores or self.diverged:
            return None
        best = int(np.argmax(scores))
        return best + 1, {k: float(v[best]) for k, v in self.history.items()}


def fit_model(model, config, train_ds, val_ds, callbacks=(), verbose="auto", train_images=None):
    """Trains a compiled `model` for `config.epochs` epochs; stops at the first NaN/inf loss.

    Args:
        model: keras.Model. Compiled (see `compile_model`).
        config: TrainConfig.
        train_ds, val_ds: tf.data.Dataset. From `make_datasets`. A training
            pipeline with an `epoch_feed` (an epoch-indexed augmentation) is
            read `epoch_feed.steps_per_epoch` batches per epoch from one
            iterator, and the feed is told the epoch fit starts at (and, through
            a `preemption.StepCheckpoint` among `callbacks`, the step).
        callbacks: sequence of keras.callbacks.Callback. Extra callbacks,
            after the divergence monitor and the epoch timer.
        verbose: Keras' `verbose`. Defaults to `"auto"`.
        train_images: uint8 array or None. The training images; with
            `config.bn_recalibrate`, the first that many recompute the
            BatchNorm statistics of the averaged weights
            (`callbacks.RecalibrateBatchNorm`).

    Returns:
        A `FitResult`.
    """
    monitor = DivergenceMonitor()
    timer = EpochTimer(total_epochs=config.epochs)
    callbacks = [monitor, timer, *callbacks]
    feed = getattr(train_ds, "epoch_feed", None)
    if feed is not None:
        callbacks.insert(0, feed)
        for callback in callbacks:
            if isinstance(callback, StepCheckpoint):
                callback.feed = feed
    callbacks += recipe_callbacks(model, config, train_images)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        steps_per_epoch=None if feed is None else feed.steps_per_epoch,
        verbose=verbose,
    )
    return FitResult(
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        diverged_at=monitor.diverged_at,
        seconds_per_epoch=timer.seconds_per_epoch,
    )


def _accuracy(predict, split):
    images, labels = split
    return float((predict(images).argmax(1) == labels).mean())


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal (Ctrl-C: SIGINT, or SIGTERM); checkpointed where it stopped.

    Attributes:
        completed: int. Complete epochs checkpointed.
        total: int. The run's epochs.
        step: int. Steps of epoch `completed + 1` checkpointed too (0: none).
        steps: int or None. Steps per epoch.
        signum: int. The signal.
    """

    def __init__(self, completed, total, step=0, steps=None, signum=signal.SIGINT):
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        where = f"after epoch {completed} of {total}"
        if step:
            where += f" and step {step} of {steps} of epoch {completed + 1}"
        super().__init__(f"Interrupted{by} {where}; rerun the same command to resume.")
        self.completed, self.total, self.step, self.steps, self.signum = completed, total, step, steps, signum


class ExportFailed(RuntimeError):
    """Training finished, its results are saved, but the SavedModel export failed."""


def export_command(model_path, export_name, export_dir="saved_models"):
    """The `nfnet_keras.export` command line that exports `model_path` as `fit` would have."""
    words = ["python", "-m", "nfnet_keras.export", "--model", model_path, "--name", export_name]
    if os.path.normpath(export_dir) != "saved_models":
        words += ["--base-dir", export_dir]
    return shlex.join(words)


def train(config, run_dir, export_name=None, export_dir="saved_models", verbose="auto"):
    """Runs one whole training job; resumable.

    Loads the data (`config.dataset`), builds and compiles the model (its
    classes and image size from the data), trains with TensorBoard logs,
    atomic checkpoints at every epoch's end, every `config.checkpoint_every`
    steps and on SIGTERM or Ctrl-C (`preemption.StepCheckpoint`; rerunning with
    the same `run_dir` resumes from the newest, mid-epoch too, on the batches of
    an uninterrupted run) and divergence detection, evaluates on the test
    set, saves `<run_dir>/model.keras` and `<run_dir>/metrics.json`, and exports
    a SavedModel to `<export_dir>/<export_name>/<version>/` when `export_name`.
    One process at a time may hold `run_dir`.

    Returns:
        The metrics dict written to `metrics.json`.

    Raises:
        TrainingDiverged: the loss became NaN/inf (metrics.json records it).
        TrainingInterrupted: SIGTERM or Ctrl-C; checkpointed at the step where it stopped.
        ExportFailed: trained and saved, but the export failed.
        rundir.RunBusy: another process holds `run_dir`.
        fileio.WriteError: a file could not be written (e.g. a full disk).
        ValueError, data.DataError: bad configuration or data.
    """
    config.validate()
    with distribution.own_run_dir(run_dir) as own:  # processes other than 0 write to a temporary folder
        if own != run_dir:
            export_name = None
        return _train_in(config, own, export_name, export_dir, verbose)


def _train_in(config, run_dir, export_name, export_dir, verbose):
    rundir.check_run_dir(run_dir, config)
    strategy = setup_runtime(config)
    data = load_data(config)  # before writing anything
    check_batch_size(config.batch_size, len(data.train[0]))
    fingerprint = rundir.data_fingerprint(*data.train, *data.val, *data.test)
    rundir.check_data(run_dir, fingerprint)
    resuming = StepCheckpoint(_checkpoint_dir(run_dir)).newest() != (0, 0)
    # A bad --init-from is an error before anything is written.
    model = _build_compiled(config, strategy, data.train, len(data.class_names), resuming)
    with rundir.locked(run_dir, what="--run-dir"):
        rundir.check_run_dir(run_dir, config)  # another process may have finished it meanwhile
        for path in rundir.remove_stale_temporaries(run_dir):
            print(f"Removed {path}, left by an interrupted process.")
        rundir.write_record(run_dir, config, fingerprint)
        print(f"Run directory: {run_dir}  (TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'logs')})",
              flush=True)
        for note in data.notes:
            print(note)
        return _train_locked(config, run_dir, model, data, fingerprint, export_name, export_dir, verbose)


def _checkpoint_dir(run_dir):
    return os.path.join(run_dir, "checkpoints")


def _train_locked(config, run_dir, model, data, fingerprint, export_name, export_dir, verbose):
    """The job inside the locked run directory: train, test, save, export."""
    num_classes = len(data.class_names)
    start = time.time()
    result, signal_logger, session = _train(config, run_dir, model, data, verbose)
    history = rundir.read_history(run_dir)
    metrics = dict(config=config.to_dict(), data_fingerprint=fingerprint, history=history,
                   epochs_completed=len(history.get("epoch", [])), seconds_per_epoch=result.seconds_per_epoch,
                   wall_seconds_this_process=time.time() - start, signal_propagation=signal_logger.stats)
    if result.diverged:
        _report_divergence(config, run_dir, metrics, result.diverged_at)
    metrics.update(_test(config, model, data.test, session, metrics["epochs_completed"] - 1, num_classes))
    model_path = os.path.join(run_dir, "model.keras")
    with fileio.atomic_path(model_path) as tmp:
        model.save(tmp)
        write_class_names(tmp, data.class_names)  # predict and evaluate name the classes with them
    metrics.update(diverged=False, model_path=model_path, class_names=list(data.class_names))
    if export_name:
        metrics["export_path"] = _export(model, metrics, run_dir, model_path, export_name, export_dir,
                                         data.class_names)
    rundir.write_metrics(run_dir, metrics)
    return metrics


def _build_compiled(config, strategy, train_images_labels, num_classes=NUM_CLASSES, resuming=False):
    """The run's model (for the images' shape and `num_classes`), compiled, its data-dependent layers adapted
    to the training images.

    With `--init-from` nothing is adapted: the file's body was trained on the
    output of its own whitening stem, and re-adapting the stem to these images
    would change what every layer after it sees; the stem comes from the file
    (or, resuming, from the checkpoint).
    """
    train_images = train_images_labels[0]
    with strategy.scope():
        model = build_for(config, num_classes, tuple(train_images.shape[1:]), resuming=resuming)
        compile_model(model, config, math.ceil(len(train_images) / config.batch_size))
    if config.init_from:
        if resuming:
            print(f"Resuming: the checkpoint restores the weights; --init-from {config.init_from} is not read.")
        return model
    for line in adapt_to(model, train_images, config.data_init):  # a resumed run then restores its checkpoint
        print(line)
    return model


def _train(config, run_dir, model, data, verbose):
    """Trains with checkpoints (at epoch ends, every `--checkpoint-every` steps and on SIGTERM/Ctrl-C), the
    history CSV and TensorBoard; returns `(FitResult, the signal logger, the HParams session folder)`."""
    train_arr, val_arr = data.train, data.val
    train_ds, val_ds = make_datasets(config, train_arr, val_arr, num_classes=len(data.class_names))
    stop = StopSignals()
    checkpoint_class = distribution.process_zero_checkpoint(StepCheckpoint) if distribution.is_multi_process() \
        else StepCheckpoint
    checkpoint = checkpoint_class(_checkpoint_dir(run_dir), every_steps=config.checkpoint_every, stop=stop)
    session = session_dir(os.path.join(run_dir, "logs"))  # the HParams session; train/, validation/, test/ below
    signal_logger = SignalPropagationLogger(session, data_lib.preprocess(val_arr[0][:64]))
    callbacks = [
        checkpoint,
        keras.callbacks.CSVLogger(os.path.join(run_dir, rundir.HISTORY_FILE), append=True),
        TensorBoard(session),
        signal_logger,
    ]
    if checkpoint.latest_epoch() == 0:
        log_hparams(session, config)
    try:
        with stop:  # SIGTERM / Ctrl-C: a checkpoint at the next step's end, then Preempted
            result = fit_model(model, config, train_ds, val_ds, callbacks=callbacks, verbose=verbose,
                               train_images=train_arr[0])
            if stop.received is not None and not result.diverged:  # during the last epoch's end: checkpointed
                raise Preempted(stop.received, checkpoint.latest_epoch())
    except Preempted as e:
        raise TrainingInterrupted(e.completed, config.epochs, e.step, e.steps, e.signum) from None
    except KeyboardInterrupt:  # a second Ctrl-C
        completed, step = checkpoint.newest()
        raise TrainingInterrupted(completed, config.epochs, step, math.ceil(len(train_arr[0]) / config.batch_size)
                                  ) from None
    return result, signal_logger, session


def _report_divergence(config, run_dir, metrics, at):
    """Records the divergence in `metrics.json` and raises `TrainingDiverged` with what to try."""
    metrics.update(diverged=True, diverged_at=at, test_accuracy=None)
    rundir.write_metrics(run_dir, metrics)
    raise TrainingDiverged(
        f"Training diverged: the loss became NaN/inf at epoch {at['epoch']}, step {at['step']} "
        f"(lr {config.lr}). Try a lower --lr (e.g. {config.lr / 10:g}) or adaptive gradient clipping "
        "(--agc 0.01)."
    )


def _test(config, model, test_arr, session, step, num_classes=NUM_CLASSES):
    """The final evaluation on the test images (`--test-limit`): plain, flip and the `--tta` policy.

    Returns the metrics it adds to `metrics.json`.
    """
    limit = config.evaluation_test_limit()
    if limit is not None:
        test_arr = (test_arr[0][:limit], test_arr[1][:limit])
    views = ("plain", "flip") + (() if config.tta in ("none", "flip") else (config.tta,))
    print(f"Evaluating on {len(test_arr[0])} test images ({', '.join(views)}) ...", flush=True)
    test_ds = data_lib.make_dataset(*test_arr, 256, one_hot=bool(config.label_smoothing), num_classes=num_classes)
    test_loss, test_accuracy = model.evaluate(test_ds, verbose=0)
    log_test_metrics(session, step, test_loss, test_accuracy)
    print(f"Test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(test_arr[0])} images.")
    predict = distribution.replicated_predictor(model) if distribution.is_multi_process() else keras_predictor(model)
    test_accuracy_flip_tta = _accuracy(with_tta(predict, "flip"), test_arr)
    print(f"Test accuracy with flip test-time augmentation: {test_accuracy_flip_tta:.4f}.")
    tta = dict(none=float(test_accuracy), flip=test_accuracy_flip_tta)
    if config.tta not in tta:
        tta[config.tta] = _accuracy(with_tta(predict, config.tta), test_arr)
        views = TTA_POLICY_VIEWS[config.tta]
        print(f"Test accuracy with {config.tta} test-time augmentation ({len(views)} views: {', '.join(views)}): "
              f"{tta[config.tta]:.4f}.")
    return dict(test_accuracy=float(test_accuracy), test_loss=float(test_loss),
                test_accuracy_flip_tta=test_accuracy_flip_tta, tta=config.tta,
                tta_views=list(TTA_POLICY_VIEWS[config.tta]),
                tta_weights=[weight for _, weight in TTA_POLICY_WEIGHTS[config.tta]],
                test_accuracy_tta=tta[config.tta], test_images=len(test_arr[0]))


def _export(model, metrics, run_dir, model_path, export_name, export_dir, class_names):
    """Exports the trained model for TF Serving; on failure records it and raises `ExportFailed`."""
    from nfnet_keras.export import export_saved_model

    try:
        path = export_saved_model(model, export_name, base_dir=export_dir, class_names=class_names)
    except Exception as e:  # training is done: keep its results, then report the export's failure
        metrics["export_error"] = str(e)
        rundir.write_metrics(run_dir, metrics)
        raise ExportFailed(
            f"Training finished ({os.path.join(run_dir, rundir.METRICS_FILE)}, {model_path}) but the export "
            f"failed: {e} Export again with: {export_command(model_path, export_name, export_dir)}"
        ) from e
    print(f"Exported SavedModel to {path}")
    return path
