"""The signal-propagation plot of TensorBoard: per-block statistics drawn as a PNG, and its caption."""

import io
import math
import re
import warnings

import keras
import numpy as np

from nfnet_keras.models.signal import signal_propagation
from nfnet_keras.models.signal_block import signal_blocks

_CAPTION_HEAD = """\
Per-block statistics of the network (`nfnet_keras.signal_propagation`), in inference mode;
the step is the number of epochs trained (0: at initialisation).

* **unit-Gaussian input**: {n} inputs of i.i.d. N(0, 1) pixels, the papers' convention.
* **CIFAR-10 images**: {n} validation images, normalised as in training.
"""
_CAPTION_TRACKED = """\
* **expected, gains = 1**: the variance the tracking rule predicts for unit-Gaussian input with
  every skip gain at 1: 1 + alpha^2 after each stage's first block, + alpha^2 per block after.
* **expected, current gains**: the same rule with the skip gains the model has now. At
  initialisation they are 0 (SkipInit: every block is its shortcut) while each block still
  divides its input by the beta of gains 1, so the curve is 1 in the first stage and drops at
  each later stage's first block by the variance the rule expected there (1.2 in the report's
  network).
"""
_CAPTION_UNIT = """\
* **expected, gains = 1**: each block is built to keep unit-variance input at unit variance
  (weight-standardized convolutions and scaled activations); it has no skip path and no gain.
"""
_CAPTION_WS_STEM = """
Real images sit well below the unit-Gaussian curves: the weight-standardized stem's filters
have zero mean, so they drop the smooth, low-frequency part of a natural image that carries
most of its variance.
"""
_CAPTION_WHITENING_STEM = """
The stem is a fixed patch-whitening layer adapted to training images: it gives their 2x2
patches a unit second moment along every principal direction, and Gaussian noise, whose
patches are already white, a different scale in each.
"""


def signal_caption(model, n):
    """The caption of the signal-propagation plot of `model`, true for its network family.

    It names the expected curves only where the blocks predict a variance (the
    NF-ResNet's tracking rule, the speed network's unit variance; a normalized
    twin predicts none), and says what the stem does to real images.

    Args:
        model: a model from `nfnet_keras.build_model`.
        n: int. The number of inputs of each kind.

    Returns:
        str. Markdown.
    """
    blocks = signal_blocks(model)
    parts = [_CAPTION_HEAD.format(n=n)]
    if any(block.skip_gain is not None for block in blocks):
        parts.append(_CAPTION_TRACKED)
    elif blocks and all(block.expected_output_var is not None for block in blocks):
        parts.append(_CAPTION_UNIT)
    layers = {type(layer).__name__ for layer in model.layers}
    if "PatchWhitening" in layers:
        parts.append(_CAPTION_WHITENING_STEM)
    elif "WSConv2D" in layers:
        parts.append(_CAPTION_WS_STEM)
    return "".join(parts) + "\nSee docs/tensorboard.md.\n"


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
    skip gains, block after block (`SignalBlock.output_var_for`; None from
    the first block without such a rule on). For an `NFBlock` with every gain
    at 1 this is `expected_var`; at initialisation (gains 0) it stays at 1
    within the first stage and drops by `beta**2` at each later transition.

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
    for row, block in zip(rows, signal_blocks(model)):
        row["skip_gain"] = None if block.skip_gain is None else float(keras.ops.convert_to_numpy(block.skip_gain))
        var = None if var is None else block.output_var_for(var)
        row["expected_var_current_gains"] = var
    return rows


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
        expected = [r["expected_var"] for r in gauss]
        if any(v is not None for v in expected):  # a normalized twin's blocks predict nothing
            axes[0].plot(x, [np.nan if v is None else v for v in expected], color="0.3", linestyle="--",
                         linewidth=1.3, label="expected, gains = 1")
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
        # Fixed margins, room for six-character tick labels ("0.0005") beside the axis label: what
        # `tight_layout` picks for this figure, without its text measuring (60% of the plot's time).
        fig.subplots_adjust(left=0.23, right=0.9625, bottom=0.09, top=0.80, hspace=0.2)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()


def _tick_label(value, _):
    return f"{value:g}".replace("e-0", "e-")


def _positive(values):
    """Values for a log axis: non-positive and non-finite ones become gaps."""
    return [v if v is not None and math.isfinite(v) and v > 0 else np.nan for v in values]
