"""What a training run shows in TensorBoard: scalars, HParams and signal-propagation plots.

A run of `python -m nfnet_keras.fit` writes under `<run>/logs/`:

```
fit/                  the HParams session: hyperparameters, experiment, signal-propagation plot
fit/train/            loss, accuracy and learning rate, per epoch
fit/validation/       loss and accuracy, per epoch
fit/test/             test loss and accuracy, at the step of the last epoch
fit/signal_propagation.json   the numbers behind the plot
```

TensorBoard names a run by its folder's path below `--logdir` and links an
HParams session only to the runs *below* the session's folder. With the
session in `fit/`, its metrics show both under `tensorboard --logdir <run>/logs`
(session `fit`) and under `tensorboard --logdir runs` (session
`<time>/logs/fit`); and since the session's folder also holds the plot, no run
appears that holds nothing but hyperparameters. A grid-search trial is a
session too: KerasTuner writes its hyperparameters into
`<log_dir>/<trial_id>/execution<i>/`, above that trial's `train/` and
`validation/` (see `nfnet_keras.tuner.hypermodel`).
"""

import io
import math
import os
import re
import time
import warnings

import keras
import numpy as np

from nfnet_keras import fileio
from nfnet_keras.config import AUGMENTATIONS, OPTIMIZERS, PRECISIONS, SCHEDULES, WEIGHT_DECAY_MODES
from nfnet_keras.model import nf_blocks
from nfnet_keras.presets import PRESETS
from nfnet_keras.signal import signal_propagation

SESSION = "fit"
SIGNAL_TAG = "signal_propagation"
SIGNAL_FILE = "signal_propagation.json"

# === Scalars ===


def session_dir(log_dir):
    """The folder of a fit run's HParams session, `<log_dir>/fit`."""
    return os.path.join(log_dir, SESSION)


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, per epoch, without the graph and the `*_vs_iterations` copies.

    Keras writes each validation metric twice: per epoch in `validation/`
    (`epoch_accuracy`) and against the optimizer's step
    (`evaluation_accuracy_vs_iterations`). With one validation per epoch the
    second chart repeats the first, so it is not written.

    The class keeps Keras' name: KerasTuner recognises a TensorBoard callback by
    its class name, writes each trial to `<log_dir>/<trial_id>/execution<i>`
    and adds its HParams callback there.

    Args:
        log_dir: str. The session folder; `train/` and `validation/` go below it.
        experiment: `api_pb2.Experiment` or None. An HParams experiment (see
            `experiment`), written into the `train/` run when training starts.
            TensorBoard reads the experiment from whichever run holds it; a
            folder of its own would show up as a run with nothing in it.
            Defaults to `None`.

    Example:

    ```python
    model.fit(x, y, validation_data=(xv, yv), callbacks=[TensorBoard("logs/fit")])
    ```
    """

    def __init__(self, log_dir, experiment=None):
        super().__init__(log_dir, write_graph=False, update_freq="epoch", profile_batch=0)
        # Bytes, not the message: KerasTuner deep-copies its callbacks.
        self._experiment = None if experiment is None else _experiment_summary(experiment)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._experiment is not None:
            import tensorflow as tf

            with self._train_writer.as_default():
                tf.summary.experimental.write_raw_pb(self._experiment, step=0)

    def on_test_end(self, logs=None):
        self._pop_writer()  # Keras' version also writes `evaluation_<metric>_vs_iterations`


def log_test_metrics(log_dir, step, loss, accuracy):
    """Writes the test loss and accuracy of a fit run and closes its HParams session.

    The values go to `<log_dir>/test/` as `epoch_loss` and `epoch_accuracy` at
    `step` (the last epoch's, so they appear on the train and validation
    charts), where the HParams session in `log_dir` finds them as its test
    metrics; the session is marked successful.

    Args:
        log_dir: str. The session folder (`session_dir(...)`).
        step: int. The step of the last epoch's scalars (epochs trained - 1).
        loss: float. Test loss.
        accuracy: float. Test accuracy (a fraction).
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary as hp_summary

    writer = tf.summary.create_file_writer(os.path.join(log_dir, "test"))
    with writer.as_default(step=step):
        tf.summary.scalar("epoch_loss", float(loss))
        tf.summary.scalar("epoch_accuracy", float(accuracy))
    writer.close()
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(hp_summary.session_end_pb(api_pb2.STATUS_SUCCESS).SerializeToString(),
                                             step=0)
    writer.close()


# === HParams ===

_KINDS = {float: "DATA_TYPE_FLOAT64", int: "DATA_TYPE_FLOAT64", bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}


def hparam(name, kind, values=None, shown=False, display_name=None, description=""):
    """The HParams dashboard's column for one hyperparameter.

    Args:
        name: str. The hyperparameter's key in each session.
        kind: `float`, `int`, `bool` or `str`.
        values: sequence or None. Every value it can take (a discrete domain:
            the dashboard offers one check box each); `None` for any value of
            `kind`. Defaults to `None`.
        shown: bool. Whether the dashboard shows the column before the user
            asks for it. TensorBoard lists the columns marked `differs` first
            and shows the first five; this sets `differs`. Defaults to `False`.
        display_name: str or None. The column's title. Defaults to `name`.
        description: str. Its tooltip. Defaults to `""`.

    Returns:
        An `api_pb2.HParamInfo`.
    """
    from tensorboard.plugins.hparams import api_pb2

    info = api_pb2.HParamInfo(name=name, display_name=display_name or name, description=description,
                              type=api_pb2.DataType.Value(_KINDS[kind]), differs=shown)
    if values is not None:
        info.domain_discrete.extend([kind(v) for v in values])
    return info


def metric(tag, group, display_name):
    """The HParams dashboard's column for the last value of scalar `tag` in run `<session>/<group>`."""
    from tensorboard.plugins.hparams import api as hp

    return hp.Metric(tag, group=group, display_name=display_name).as_proto()


def experiment(hparams, metrics):
    """An HParams experiment: the columns of the dashboard, in the order given.

    Args:
        hparams: list of `api_pb2.HParamInfo` (from `hparam`).
        metrics: list of `api_pb2.MetricInfo` (from `metric`). The dashboard
            shows the first five.

    Returns:
        An `api_pb2.Experiment`.
    """
    from tensorboard.plugins.hparams import api_pb2

    return api_pb2.Experiment(hparam_infos=hparams, metric_infos=metrics, time_created_secs=time.time())


def _experiment_summary(exp):
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.EXPERIMENT_TAG,
                      metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=exp)),
                      tensor=metadata.NULL_TENSOR)
    return summary.SerializeToString()


# The columns of a fit run: (config field, kind, values, shown by default, description).
FIT_HPARAMS = (
    ("lr", float, None, True, "peak learning rate"),
    ("batch_size", int, None, True, "images per step"),
    ("schedule", str, SCHEDULES, True, "learning-rate schedule"),
    ("epochs", int, None, True, "epochs of the run"),
    ("preset", str, tuple(PRESETS), True, "model variant"),
    ("weight_decay", float, None, False, "L2 weight decay"),
    ("momentum", float, None, False, "SGD momentum"),
    ("nesterov", bool, (False, True), False, "Nesterov momentum"),
    ("warmup_epochs", float, None, False, "linear warm-up, in epochs"),
    ("label_smoothing", float, None, False, "label smoothing"),
    ("agc", float, None, False, "adaptive gradient clipping factor (0: off)"),
    ("weight_decay_mode", str, WEIGHT_DECAY_MODES, False, "decoupled, or coupled (L2 through momentum)"),
    ("bias_lr_mult", float, None, False, "learning-rate multiplier of the biases"),
    ("gain_lr_mult", float, None, False, "learning-rate multiplier of the gains"),
    ("head_lr_mult", float, None, False, "learning-rate multiplier of the classifier"),
    ("optimizer", str, OPTIMIZERS, False, "the conv kernels' optimizer"),
    ("kernel_lr", float, None, False, "peak lr of the conv kernels' optimizer (unset: lr)"),
    ("lookahead", int, None, False, "Lookahead sync period in steps (0: off)"),
    ("augment", str, AUGMENTATIONS, False, "augmentation policy"),
    ("precision", str, PRECISIONS, False, "Keras dtype policy"),
    ("seed", int, None, False, "random seed"),
    ("train_limit", int, None, False, "training images used (unset: all)"),
    ("val_size", int, None, False, "validation images held out of the training set"),
    ("overrides", str, None, False, "preset keys changed (none: the preset as is)"),
)
FIT_METRICS = (
    ("epoch_accuracy", "validation", "validation accuracy"),
    ("epoch_loss", "validation", "validation loss"),
    ("epoch_accuracy", "test", "test accuracy"),
    ("epoch_accuracy", "train", "train accuracy"),
    ("epoch_loss", "train", "train loss"),
    ("epoch_loss", "test", "test loss"),
)


def fit_experiment():
    """The HParams experiment of a fit run: `FIT_HPARAMS` and `FIT_METRICS`.

    Every fit run declares the same one, so TensorBoard started on a folder of
    many runs shows them in one table.
    """
    return experiment([hparam(name, kind, values, shown, description=text)
                       for name, kind, values, shown, text in FIT_HPARAMS],
                      [metric(*m) for m in FIT_METRICS])


def format_overrides(overrides):
    """`{"depths": [1, 1], "activation": "gelu"}` -> `"activation=gelu, depths=(1, 1)"`; `{}` -> `"none"`."""
    if not overrides:
        return "none"
    text = {k: str(tuple(v)) if isinstance(v, (list, tuple)) else str(v) for k, v in overrides.items()}
    return ", ".join(f"{k}={text[k]}" for k in sorted(text))


def fit_hparams(config):
    """The values of `FIT_HPARAMS` for `config` (a `TrainConfig`); unset ones are left out."""
    values = config.to_dict()
    values["overrides"] = format_overrides(values["overrides"])
    return {name: kind(values[name]) for name, kind, *_ in FIT_HPARAMS if values[name] is not None}


def log_hparams(log_dir, config):
    """Makes `log_dir` a fit run's HParams session: writes the experiment and the run's values.

    Args:
        log_dir: str. The session folder (`session_dir(...)`); the run's
            `train/`, `validation/` and `test/` go below it.
        config: TrainConfig.
    """
    import tensorflow as tf
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    # No group name: TensorBoard then names the group after the session's run,
    # which is unique, where a name of our own could merge two runs' rows.
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in fit_hparams(config).items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, str):
            start.hparams[name].string_value = value
        else:
            start.hparams[name].number_value = value
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.SESSION_START_INFO_TAG,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        tensor=metadata.NULL_TENSOR,
    )
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(_experiment_summary(fit_experiment()), step=0)
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)
    writer.close()


# === Signal propagation ===

SIGNAL_CAPTION = """\
Per-block statistics of the network (`nfnet_keras.signal.signal_propagation`), in inference mode;
the step is the number of epochs trained (0: at initialisation).

* **unit-Gaussian input**: {n} inputs of i.i.d. N(0, 1) pixels, the papers' convention.
* **CIFAR-10 images**: {n} validation images, normalised as in training.
* **expected, gains = 1**: the variance the tracking rule predicts for unit-Gaussian input with
  every skip gain at 1: 1 + alpha^2 after each stage's first block, + alpha^2 per block after.
* **expected, current gains**: the same rule with the skip gains the model has now. At
  initialisation they are 0 (SkipInit: every block is its shortcut) while each block still
  divides its input by the beta of gains 1, so the curve is 1 in the first stage and drops at
  each later stage's first block by the variance the rule expected there (1.2 in the report's
  network).

Real images sit well below the unit-Gaussian curves: the weight-standardized stem's filters
have zero mean, so they drop the smooth, low-frequency part of a natural image that carries
most of its variance. See docs/tensorboard.md.
"""


def logged_epochs(total):
    """The epochs after which the plot is drawn: 1, 2, 5, 10, 20, 50, ... below `total`, and `total`."""
    epochs, scale = [], 1
    while scale < total:
        epochs += [m * scale for m in (1, 2, 5) if m * scale < total]
        scale *= 10
    return epochs + [total]


def measure(model, images):
    """`signal_propagation(model, images)` plus each block's skip gain and the rule with it.

    Each row gains `skip_gain` (float; `None` for a block without one, e.g. the
    normalized twin) and `expected_var_current_gains`: the variance the
    tracking rule predicts for unit-Gaussian input with the model's current
    skip gains. A block scales its input by `1 / beta`, `beta**2` being the
    variance expected with every gain at 1, so its branch (and a transition's
    shortcut) sees `v / beta**2`; the output is then
    `(v_in if not transition else v_in / beta**2) + (alpha * skip_gain)**2 * v_in / beta**2`.
    With every gain at 1 this is `expected_var`; at initialisation (gains 0)
    it stays at 1 within the first stage and drops by `beta**2` at each later
    transition.

    Args:
        model: a model from `nfnet_keras.build_model`.
        images: float array `(batch, h, w, c)` of model inputs.

    Returns:
        A list of dicts, one per block.
    """
    with warnings.catch_warnings():
        # The probe model inside is called on a bare array where the model names its input.
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
        rows = signal_propagation(model, images)
    var = 1.0
    for row, block in zip(rows, nf_blocks(model)):
        gain = None if block.skip_gain is None else float(keras.ops.convert_to_numpy(block.skip_gain))
        row["skip_gain"] = gain
        if gain is None or var is None:
            row["expected_var_current_gains"] = var = None
            continue
        scaled = var / block.expected_var
        var = (scaled if block.transition else var) + (block.alpha * gain) ** 2 * scaled
        row["expected_var_current_gains"] = var
    return rows


class SignalPropagationLogger(keras.callbacks.Callback):
    """Plots the per-block signal statistics at initialisation, after a few epochs and at the end.

    The plot (`plot_signal`) is the image `signal_propagation` of `log_dir`, at
    step 0 (before training), after each epoch of `logged_epochs(epochs)`, and
    at the end of training if that ended elsewhere (a divergence); each shows
    the model on unit-Gaussian input and on `images`. The numbers go to
    `<log_dir>/signal_propagation.json`, which a resumed run reads back, so
    `stats` holds the start of the run even after a restart.

    Args:
        log_dir: str. The HParams session folder (`session_dir(...)`).
        images: float array `(n, h, w, c)`. Preprocessed real images (e.g. 64
            validation images).
        seed: int. Seed of the unit-Gaussian input (same shape as `images`).
            Defaults to `0`.
    """

    def __init__(self, log_dir, images, seed=0):
        super().__init__()
        self.log_dir = log_dir
        self.images = np.asarray(images, dtype="float32")
        self.gaussian = np.random.default_rng(seed).standard_normal(self.images.shape).astype("float32")
        self.path = os.path.join(log_dir, SIGNAL_FILE)
        saved = fileio.read_json(self.path, default=None) or {}
        self.measured = {int(step): profile for step, profile in saved.get("steps", {}).items()}
        self._writer = None
        self._epochs_done = 0
        self._last_step = None

    @property
    def stats(self):
        """`start`, `end` (on the images) and `start_unit_gaussian`, `end_unit_gaussian` rows."""
        out = {}
        if 0 in self.measured:
            out.update(start=self.measured[0]["images"], start_unit_gaussian=self.measured[0]["unit_gaussian"])
        if self._last_step is not None:
            last = self.measured[self._last_step]
            out.update(end=last["images"], end_unit_gaussian=last["unit_gaussian"])
        return out

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 0 and 0 not in self.measured:
            self._log(0)

    def on_epoch_end(self, epoch, logs=None):
        self._epochs_done = epoch + 1
        if self._epochs_done in logged_epochs(self.params.get("epochs") or self._epochs_done):
            self._log(self._epochs_done)

    def on_train_end(self, logs=None):
        if self._last_step is None or self._last_step < self._epochs_done:  # the end is not drawn yet
            self._log(self._epochs_done)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _log(self, step):
        import tensorflow as tf

        profile = dict(images=measure(self.model, self.images), unit_gaussian=measure(self.model, self.gaussian))
        self.measured[step] = profile
        self._last_step = step
        steps = {str(k): v for k, v in sorted(self.measured.items())}
        fileio.write_json(self.path, dict(images=len(self.images), steps=steps))
        png = plot_signal(profile, "at initialisation" if step == 0 else f"after {_plural(step, 'epoch')}",
                          n_images=len(self.images))
        if self._writer is None:  # created late: the session's hyperparameters are written first
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.image(SIGNAL_TAG, tf.image.decode_png(png, channels=4)[None], step=step,
                             description=SIGNAL_CAPTION.format(n=len(self.images)))
        self._writer.flush()


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _stage_starts(rows):
    """Indices of the first block of each stage, from the names `stage<s>_block<b>`."""
    stages = [re.match(r"stage(\d+)_", row["block"]) for row in rows]
    keys = [m.group(1) if m else None for m in stages]
    return [i for i, key in enumerate(keys) if i == 0 or key != keys[i - 1]]


def plot_signal(profile, when, n_images=None):
    """A PNG (bytes) of the per-block signal statistics, legible at ~330-400 px wide.

    Three panels share the block axis (stages marked): the output's average
    channel variance with the expected curves, the residual branch's average
    channel variance, and the output's average squared channel mean; each on a
    log scale, for unit-Gaussian input and for real images.

    Args:
        profile: dict. `{"unit_gaussian": rows, "images": rows}`, rows from `measure`.
        when: str. Ends the title, e.g. `"after 5 epochs"`.
        n_images: int or None. The number of inputs, for the legend.

    Returns:
        bytes. A 400 x 580 PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gauss, real = profile["unit_gaussian"], profile["images"]
    x = np.arange(1, len(gauss) + 1)
    starts = _stage_starts(gauss)
    n = f"{n_images} " if n_images else ""
    series = (
        (gauss, "unit-Gaussian input", dict(color="tab:blue", marker="o")),
        (real, f"{n}CIFAR-10 images", dict(color="tab:orange", marker="s")),
    )
    from matplotlib import ticker

    with plt.rc_context({"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 9,
                         "xtick.labelsize": 9, "ytick.labelsize": 9}):
        fig, axes = plt.subplots(3, 1, figsize=(4.0, 5.8), dpi=100, sharex=True)
        panels = (("avg_var", "block output, channel variance", "variance"),
                  ("residual_var", "residual branch, channel variance", "variance"),
                  ("avg_sq_mean", "block output, squared channel mean", "mean²"))
        for ax, (key, title, label) in zip(axes, panels):
            for rows, name, style in series:
                ax.plot(x, _positive([r[key] for r in rows]), label=name, markersize=3.5, linewidth=1.5, **style)
            ax.set_yscale("log")
            low, high = ax.get_ylim()
            subs = (1.0, 2.0, 5.0) if high / low < 30 else (1.0,)  # 1-2-5 over a short range, else decades
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs, numticks=6))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick_label))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(title, loc="left", pad=3)
            ax.set_ylabel(label)
            ax.grid(True, which="major", alpha=0.3)
            for s in starts[1:]:
                ax.axvline(s + 0.5, color="0.6", linewidth=0.8)
        axes[0].plot(x, [r["expected_var"] for r in gauss], color="0.3", linestyle="--", linewidth=1.3,
                     label="expected, gains = 1")
        current = [r.get("expected_var_current_gains") for r in gauss]
        if any(v is not None for v in current):
            axes[0].plot(x, [np.nan if v is None else v for v in current], color="0.3", linestyle=":",
                         linewidth=1.6, label="expected, current gains")
        bounds = starts + [len(x)]
        axes[-1].set_xticks([(a + b + 1) / 2 for a, b in zip(bounds, bounds[1:])],
                            [f"stage {i + 1}" for i in range(len(starts))])
        axes[-1].tick_params(axis="x", which="major", length=0)
        axes[-1].set_xticks(x, minor=True)
        axes[-1].set_xlabel("block")
        axes[-1].set_xlim(0.5, len(x) + 0.5)
        fig.suptitle(f"Signal propagation {when}", fontsize=11, y=0.99)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.955), frameon=False,
                   handlelength=2.2, columnspacing=1.0)
        fig.tight_layout(rect=(0, 0, 1, 0.905), h_pad=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()


def _tick_label(value, _):
    return f"{value:g}".replace("e-0", "e-")


def _positive(values):
    """Values for a log axis: non-positive and non-finite ones become gaps."""
    return [v if v is not None and math.isfinite(v) and v > 0 else np.nan for v in values]
