"""The training run, shared by `python -m nfnet_keras.fit` and the tuner.

Pieces: `TrainConfig` (every knob, with the report's final run as defaults),
`setup_runtime` (seeds, determinism, precision, devices), `make_optimizer`
(SGD + schedule + weight decay, optionally AGC), `compile_model`, the callbacks
(`DivergenceMonitor`, `EpochCheckpoint`, `SignalPropagationLogger`) and
`train`, which runs one whole job: data -> model -> fit -> test -> save -> export.
"""

import dataclasses
import datetime
import glob
import io
import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from nfnet_keras import data as data_lib
from nfnet_keras.agc import with_agc
from nfnet_keras.inference import keras_predictor, with_flip_tta
from nfnet_keras.model import build_model, resolve_config
from nfnet_keras.presets import PRESETS
from nfnet_keras.signal import signal_propagation

SCHEDULES = ("step", "cosine", "onecycle", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("none", "mirrored")


# Named sets of TrainConfig values: `python -m nfnet_keras.fit --recipe NAME`
# (explicit flags and --hparams win). See README, "Time to accuracy".
RECIPES = {
    # The defaults: the report's final run (200 epochs, lr 0.01, batch 64, step schedule).
    "report": {},
    # 20 epochs, one-cycle to lr 0.1 at batch 128 with Nesterov momentum, pad-crop-flip,
    # label smoothing 0.1, weight decay 5e-4, 49,000 training images (1,000 held out),
    # NFNet's avg-pool + 1x1 transition shortcuts (the strided 1x1 conv drops 3/4 of the
    # positions: 10 points behind at epoch 5, 4 at epoch 9 in the same recipe). README:
    # 89.42% test after 20 epochs.
    "fast": dict(epochs=20, batch_size=128, lr=0.1, schedule="onecycle", nesterov=True, weight_decay=5e-4,
                 label_smoothing=0.1, augment="standard", val_size=1000, overrides={"shortcut_pool": True}),
}


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the report's final run."""

    preset: str = "seed"
    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "step"
    warmup_epochs: float = 0.0
    weight_decay: float = 2e-4
    label_smoothing: float = 0.0
    agc: float = 0.0  # AGC clipping factor; 0 disables it
    augment: str = "seed"
    jit: bool | None = None  # None: True on GPU, False on CPU (measured faster there)
    precision: str = "float32"
    seed: int = 0
    deterministic: bool = False
    train_limit: int | None = None
    val_size: int = 5000
    data_dir: str | None = None
    tfds_dir: str | None = None
    strategy: str = "none"
    overrides: dict = dataclasses.field(default_factory=dict)  # preset overrides

    def validate(self):
        """Raises ValueError with a one-line, actionable message on a bad value."""
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}. Use one of: {', '.join(PRESETS)}.")
        resolve_config(self.preset, self.overrides)
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}."),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}."),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}."),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}."),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}."),
            (0 <= self.warmup_epochs < self.epochs, f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}."),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}."),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}."),
            (self.agc >= 0, f"--agc must be >= 0 (0 disables it), got {self.agc}."),
            (self.augment in data_lib.AUGMENTATIONS, f"--augment must be one of {', '.join(data_lib.AUGMENTATIONS)}, got {self.augment!r}."),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}."),
            (self.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}."),
            (self.val_size >= 1, f"--val-size must be >= 1, got {self.val_size}."),
            (self.train_limit is None or self.train_limit >= 1, f"--train-limit must be >= 1, got {self.train_limit}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


# === Runtime ===


def setup_runtime(config):
    """Seeds every generator, sets determinism, precision and (for mirrored) devices.

    Returns the `tf.distribute` strategy to build under (the default one when
    `config.strategy == "none"`).
    """
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
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(config.precision)
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def resolve_jit(config):
    """XLA on GPU, off on CPU (slower there, see README), off under a strategy (keras#19005)."""
    if config.strategy != "none":
        if config.jit:
            print("note: --jit is ignored under --strategy mirrored (keras#19005: XLA under "
                  "MirroredStrategy fails to place resources).")
        return False
    if config.jit is None:
        return bool(tf.config.list_physical_devices("GPU"))
    return config.jit


# === Optimizer ===


@keras.saving.register_keras_serializable(package="nfnet_keras")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `peak / div` to `peak` over `pct` of the steps, then cosine to ~0."""

    def __init__(self, peak, total_steps, pct=0.25, div=25.0):
        self.peak, self.total_steps, self.pct, self.div = float(peak), int(total_steps), float(pct), float(div)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = max(1.0, self.pct * self.total_steps)
        down = max(1.0, self.total_steps - up)
        start = self.peak / self.div
        warm = start + (self.peak - start) * step / up
        t = keras.ops.clip((step - up) / down, 0.0, 1.0)
        cool = self.peak * 0.5 * (1.0 + keras.ops.cos(math.pi * t))
        return keras.ops.where(step < up, warm, cool)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, pct=self.pct, div=self.div)


def make_schedule(config, steps_per_epoch):
    """The learning-rate schedule over `config.epochs` epochs of `steps_per_epoch` steps.

    `step` divides the lr by 10 at 25%, 50% and 75% of the epochs (epochs
    50/100/150 of the report's 200); `cosine` decays to 0 after an optional linear
    warm-up; `onecycle` ramps up for 25% of the steps then anneals.
    """
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        boundaries = [int(config.epochs * f) * steps_per_epoch for f in (0.25, 0.5, 0.75)]
        boundaries = sorted(set(b for b in boundaries if 0 < b < total))
        values = [config.lr * 0.1**i for i in range(len(boundaries) + 1)]
        if not boundaries:
            return config.lr
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    if config.schedule == "cosine":
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, alpha=0.0, warmup_target=config.lr, warmup_steps=warmup
            )
        return keras.optimizers.schedules.CosineDecay(config.lr, total, alpha=0.0)
    return OneCycle(config.lr, total)


def make_optimizer(config, steps_per_epoch):
    """SGD with momentum, the schedule, decoupled weight decay (not on gains or biases), AGC."""
    optimizer = keras.optimizers.SGD(
        learning_rate=make_schedule(config, steps_per_epoch),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay or None,
    )
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gain", "skip_gain"])
    if config.agc:
        optimizer = with_agc(optimizer, clipping=config.agc)
    return optimizer


def compile_model(model, config, steps_per_epoch):
    """Compiles `model` with the config's optimizer, loss and jit setting."""
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
        if config.label_smoothing
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=resolve_jit(config),
    )
    return model


# === Data ===


def load_splits(config):
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)) as uint8/int64 arrays."""
    (x, y), test = data_lib.load_cifar10(config.data_dir, config.tfds_dir)
    train, val = data_lib.split(x, y, config.val_size, config.train_limit)
    return train, val, test


def _labels_for_loss(ds, config):
    """One-hot labels when label smoothing is on (the sparse loss cannot smooth)."""
    if not config.label_smoothing:
        return ds
    return ds.map(lambda x, y: (x, tf.one_hot(y, 10)), num_parallel_calls=tf.data.AUTOTUNE)


def make_datasets(config, train, val, batch_size=None):
    """The training and validation `tf.data` pipelines for `config`."""
    batch_size = batch_size or config.batch_size
    train_ds = data_lib.make_dataset(*train, batch_size, training=True, augment=config.augment, seed=config.seed)
    val_ds = data_lib.make_dataset(*val, batch_size)
    return _labels_for_loss(train_ds, config), _labels_for_loss(val_ds, config)


# === Callbacks ===


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


class EpochCheckpoint(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore`, written atomically.

    Keras writes the weights and then the epoch counter in place, so a kill
    during the save leaves a corrupt file or a counter that disagrees with the
    weights. Here every epoch's state (weights with optimizer state + epoch) goes
    to a temporary folder that is renamed to `epoch-NNNN` only when complete;
    older ones are then removed. On start the newest complete one is restored.
    """

    def __init__(self, backup_dir, delete_checkpoint=False):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=delete_checkpoint)

    def _complete(self):
        found = []
        for path in glob.glob(os.path.join(self.backup_dir, "epoch-*")):
            meta = os.path.join(path, "state.json")
            if os.path.isfile(meta):
                with open(meta) as f:
                    found.append((json.load(f)["epoch"], path))
        return sorted(found)

    def latest_epoch(self):
        found = self._complete()
        return found[-1][0] if found else 0

    def _load_model(self):
        found = self._complete()
        if not found:
            return
        epoch, path = found[-1]
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(path, "model.weights.h5"))
        self.model._initial_epoch = epoch
        print(f"Resuming from {path} (epoch {epoch} complete).")

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = os.path.join(self.backup_dir, f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.model.save_weights(os.path.join(tmp, "model.weights.h5"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"epoch": self._current_epoch}, f)
        final = os.path.join(self.backup_dir, f"epoch-{self._current_epoch:04d}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, path in self._complete()[:-1]:
            shutil.rmtree(path, ignore_errors=True)


class SignalPropagationLogger(keras.callbacks.Callback):
    """Logs per-block signal-propagation stats (scalars and a plot) at train start and end."""

    def __init__(self, log_dir, images):
        super().__init__()
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "signal_propagation"))
        self.images = images
        self.stats = {}

    def _log(self, tag, step):
        stats = signal_propagation(self.model, self.images)
        self.stats[tag] = stats
        with self.writer.as_default(step=step):
            for key in ("avg_sq_mean", "avg_var", "residual_var"):
                for i, s in enumerate(stats):
                    tf.summary.scalar(f"{tag}/{key}/{i:02d}_{s['block']}", s[key])
            tf.summary.image(f"{tag}/plot", _plot_signal(stats, tag), step=step)
        self.writer.flush()

    def on_train_begin(self, logs=None):
        self._log("start", int(self.model.optimizer.iterations.numpy()))

    def on_train_end(self, logs=None):
        self._log("end", int(self.model.optimizer.iterations.numpy()))


def _plot_signal(stats, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=90)
    xs = range(1, len(stats) + 1)
    for key, label in (("avg_var", "avg channel variance"), ("avg_sq_mean", "avg squared channel mean"),
                       ("residual_var", "residual-branch variance"), ("expected_var", "expected variance")):
        ax.plot(xs, [s[key] for s in stats], marker="o", label=label)
    ax.set_xlabel("block")
    ax.set_title(f"Signal propagation ({title} of training)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return tf.image.decode_png(buf.getvalue(), channels=4)[None]


def log_hparams(log_dir, config):
    """Writes the run's hyperparameters to TensorBoard's HParams dashboard."""
    from tensorboard.plugins.hparams import api as hp

    flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.to_dict().items()}
    with tf.summary.create_file_writer(log_dir).as_default():
        hp.hparams(flat, trial_id=os.path.basename(os.path.dirname(log_dir.rstrip("/"))) or None)


# === The run ===


def default_run_dir(config, root="runs"):
    """The newest unfinished run under `root` with the same config, else a new `runs/<time>`."""
    for path in sorted(glob.glob(os.path.join(root, "*")), reverse=True):
        try:
            with open(os.path.join(path, "config.json")) as f:
                same = json.load(f) == json.loads(json.dumps(config.to_dict()))
        except (OSError, ValueError):
            continue
        if same and not os.path.exists(os.path.join(path, "metrics.json")):
            return path
    return os.path.join(root, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class ExportFailed(RuntimeError):
    """Training finished, its results are saved, but the SavedModel export failed."""


def _atomic_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _history(csv_path):
    """Per-epoch history from the CSV log, keeping the last row of a repeated epoch."""
    import csv

    rows = {}
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    history = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            history.setdefault(key, []).append(value)
    return history


def train(config, run_dir, export_name=None, export_dir="saved_models", verbose="auto"):
    """Runs one whole training job; resumable.

    Loads CIFAR-10, builds and compiles the model, trains with TensorBoard logs,
    per-epoch atomic checkpoints (rerunning with the same `run_dir` resumes from
    the last complete epoch) and divergence detection, evaluates on the test
    set, saves `<run_dir>/model.keras` and `<run_dir>/metrics.json`, and exports
    a SavedModel to `<export_dir>/<export_name>/<version>/` when `export_name`.

    Returns:
        The metrics dict written to `metrics.json`.

    Raises:
        TrainingDiverged: the loss became NaN/inf (metrics.json records it).
        ValueError, data.DataError: bad configuration or data.
    """
    config.validate()
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(config.to_dict())):
            changed = sorted(k for k in set(previous) | set(config.to_dict())
                             if previous.get(k) != json.loads(json.dumps(config.to_dict())).get(k))
            raise ValueError(
                f"{run_dir} holds a run with a different config ({', '.join(changed)} differ); "
                "use another --run-dir or the same flags to resume."
            )
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            raise ValueError(f"{run_dir} holds a finished run; use another --run-dir.")
    strategy = setup_runtime(config)
    train_arr, val_arr, test_arr = load_splits(config)  # before writing anything
    os.makedirs(run_dir, exist_ok=True)
    _atomic_json(config_path, config.to_dict())
    steps_per_epoch = math.ceil(len(train_arr[0]) / config.batch_size)
    train_ds, val_ds = make_datasets(config, train_arr, val_arr)
    with strategy.scope():
        model = build_model(config.preset, **config.overrides)
        compile_model(model, config, steps_per_epoch)

    log_dir = os.path.join(run_dir, "logs")
    monitor = DivergenceMonitor()
    checkpoint = EpochCheckpoint(os.path.join(run_dir, "checkpoints"))
    probe = data_lib.preprocess(val_arr[0][:64])
    callbacks = [
        monitor,
        checkpoint,
        keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq="epoch"),
        SignalPropagationLogger(log_dir, probe),
        EpochTimer(),
    ]
    if checkpoint.latest_epoch() == 0:
        log_hparams(log_dir, config)
    start = time.time()
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=verbose,
    )
    history = _history(os.path.join(run_dir, "history.csv"))
    metrics = dict(config=config.to_dict(), history=history, epochs_completed=len(history.get("epoch", [])),
                   seconds_per_epoch=callbacks[-1].seconds_per_epoch, wall_seconds_this_session=time.time() - start,
                   signal_propagation=callbacks[-2].stats)
    if monitor.diverged:
        metrics.update(diverged=True, diverged_at=monitor.diverged_at, test_accuracy=None)
        _atomic_json(os.path.join(run_dir, "metrics.json"), metrics)
        raise TrainingDiverged(
            f"Training diverged: the loss became NaN/inf at epoch {monitor.diverged_at['epoch']}, "
            f"step {monitor.diverged_at['step']} (lr {config.lr}). Try a lower --lr (e.g. {config.lr / 10:g}) "
            "or adaptive gradient clipping (--agc 0.01)."
        )

    test_ds = _labels_for_loss(data_lib.make_dataset(*test_arr, 256), config)
    test_loss, test_accuracy = model.evaluate(test_ds, verbose=0)
    print(f"Test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(test_arr[0])} images.")
    tta_probabilities = with_flip_tta(keras_predictor(model))(test_arr[0])
    test_accuracy_flip_tta = float((tta_probabilities.argmax(1) == test_arr[1]).mean())
    print(f"Test accuracy with flip test-time augmentation: {test_accuracy_flip_tta:.4f}.")
    model_path = os.path.join(run_dir, "model.keras")
    tmp_model = os.path.join(run_dir, ".tmp-model.keras")
    model.save(tmp_model)
    os.replace(tmp_model, model_path)
    metrics.update(diverged=False, test_accuracy=float(test_accuracy), test_loss=float(test_loss),
                   test_accuracy_flip_tta=test_accuracy_flip_tta, model_path=model_path)
    if export_name:
        from nfnet_keras.export import export_saved_model

        try:
            metrics["export_path"] = export_saved_model(model, export_name, base_dir=export_dir)
        except Exception as e:  # training is done: keep its results, then report the export's failure
            metrics["export_error"] = str(e)
            _atomic_json(os.path.join(run_dir, "metrics.json"), metrics)
            raise ExportFailed(
                f"Training finished ({os.path.join(run_dir, 'metrics.json')}, {model_path}) but the export "
                f"failed: {e} Export again with: python -m nfnet_keras.export --model {model_path} --name {export_name}"
            ) from e
        print(f"Exported SavedModel to {metrics['export_path']}")
    _atomic_json(os.path.join(run_dir, "metrics.json"), metrics)
    return metrics


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch of this session."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.time() - self._t)

    @property
    def seconds_per_epoch(self):
        return self.times
