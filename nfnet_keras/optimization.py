"""The optimizer of a training run: SGD, the learning-rate schedules, weight decay, AGC, the loss."""

import dataclasses
import math

import keras

from nfnet_keras.agc import with_agc
from nfnet_keras.optimizers.conv_muon import ConvMuon
from nfnet_keras.optimizers.groups import NO_DECAY_NAMES, GroupSGD
from nfnet_keras.optimizers.lookahead import Lookahead
from nfnet_keras.optimizers.renorm import RenormSGD
from nfnet_keras.optimizers.split import split_kernels


@keras.saving.register_keras_serializable(package="nfnet_keras")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `peak / div` to `peak` over `pct` of the steps, then cosine to ~0.

    Args:
        peak: float. The highest learning rate.
        total_steps: int. Steps of the whole run.
        pct: float. Fraction of the steps spent warming up. Defaults to `0.25`.
        div: float. The first step's lr is `peak / div`. Defaults to `25.0`.
    """

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


@keras.saving.register_keras_serializable(package="nfnet_keras")
class Triangle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from `start * peak` up to `peak` at `pct` of the steps, then linear down to `end * peak`.

    The schedule of the CIFAR-10 speed runs (e.g. airbench94: 0.2 -> 1 at 23% -> 0.07).

    Args:
        peak: float. The highest learning rate.
        total_steps: int. Steps of the whole run.
        pct: float. Where the peak is, as a fraction of the steps. Defaults to `0.23`.
        start: float. The first step's lr as a fraction of `peak`. Defaults to `0.2`.
        end: float. The last step's lr as a fraction of `peak`. Defaults to `0.07`.
    """

    def __init__(self, peak, total_steps, pct=0.23, start=0.2, end=0.07):
        self.peak, self.total_steps, self.pct = float(peak), int(total_steps), float(pct)
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = max(1.0, self.pct * self.total_steps)
        down = max(1.0, self.total_steps - up)
        rise = self.start + (1.0 - self.start) * step / up
        fall = 1.0 + (self.end - 1.0) * keras.ops.clip((step - up) / down, 0.0, 1.0)
        return self.peak * keras.ops.where(step < up, rise, fall)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, pct=self.pct, start=self.start, end=self.end)


def make_schedule(config, steps_per_epoch, peak_pct=None):
    """The learning-rate schedule over `config.epochs` epochs of `steps_per_epoch` steps.

    `step` divides the lr by 10 at 25%, 50% and 75% of the epochs (epochs
    50/100/150 of the report's 200); `cosine` decays to 0 after an optional linear
    warm-up; `onecycle` ramps up for 25% of the steps then anneals; `constant`
    keeps `config.lr`; `triangle` rises to `config.lr` at `peak_pct` of the steps (None: 0.23), then falls.
    """
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        boundaries = [int(config.epochs * f) * steps_per_epoch for f in (0.25, 0.5, 0.75)]
        boundaries = sorted(set(b for b in boundaries if 0 < b < total))
        if not boundaries:
            return config.lr
        values = [config.lr * 0.1**i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    if config.schedule == "cosine":
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, total - warmup, alpha=0.0, warmup_target=config.lr, warmup_steps=warmup
            )
        return keras.optimizers.schedules.CosineDecay(config.lr, total, alpha=0.0)
    if config.schedule == "onecycle":
        return OneCycle(config.lr, total)
    if config.schedule == "triangle":
        return Triangle(config.lr, total, **({} if peak_pct is None else dict(pct=peak_pct)))
    raise ValueError(f"Unknown schedule {config.schedule!r}.")


def lr_multipliers(config):
    """`{group: multiplier}` of the config's parameter groups (see `nfnet_keras.optimizers.groups`)."""
    return {"kernel": 1.0, "bias": config.bias_lr_mult, "gain": config.gain_lr_mult, "head": config.head_lr_mult}


def make_sgd(config, learning_rate):
    """The config's SGD: Keras' own, or `GroupSGD` when a group lr multiplier is not 1 or decay is coupled."""
    common = dict(
        learning_rate=learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay or None,
        use_ema=bool(config.ema),
        ema_momentum=config.ema or 0.99,
    )
    multipliers = lr_multipliers(config)
    if config.weight_decay_mode != "decoupled" or any(m != 1.0 for m in multipliers.values()):
        return GroupSGD(weight_decay_mode=config.weight_decay_mode, lr_multipliers=multipliers, **common)
    optimizer = keras.optimizers.SGD(**common)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    return optimizer


def make_kernel_optimizer(config, steps_per_epoch):
    """The conv kernels' optimizer of `config.optimizer` (`renorm_sgd` or `muon`), on the config's schedule.

    Its peak lr is `config.kernel_lr` (default `config.lr`), reached at `config.kernel_peak_pct` of the steps
    under the triangle schedule (default: the schedule's own), its momentum `config.kernel_momentum`
    (default `config.momentum`). Muon decays the kernels decoupled (Keras' Muon) by
    `config.kernel_weight_decay` (default `config.weight_decay`), without the Moonlight rescaling
    (`rms_rate=None`), as the speed runs, and with `config.muon_normalize` rescales each kernel before its
    step (airbench94_muon's); `renorm_sgd` needs no decay (its filters stay at unit norm).
    """
    schedule = make_schedule(dataclasses.replace(config, lr=config.kernel_lr or config.lr), steps_per_epoch,
                             peak_pct=config.kernel_peak_pct)
    momentum = config.momentum if config.kernel_momentum is None else config.kernel_momentum
    ema = dict(use_ema=bool(config.ema), ema_momentum=config.ema or 0.99)
    if config.optimizer == "renorm_sgd":
        return RenormSGD(schedule, momentum=momentum, nesterov=config.nesterov, **ema)
    if config.optimizer == "muon":
        decay = config.weight_decay if config.kernel_weight_decay is None else config.kernel_weight_decay
        return ConvMuon(schedule, momentum=momentum, nesterov=config.nesterov, ns_steps=config.muon_ns_steps,
                        weight_decay=decay or None, rms_rate=None, normalize_weights=config.muon_normalize, **ema)
    raise ValueError(f"Unknown kernel optimizer {config.optimizer!r}; expected renorm_sgd or muon.")


def make_optimizer(config, steps_per_epoch):
    """SGD with momentum, the schedule, weight decay (not on gains or biases), AGC, EMA.

    Group learning-rate multipliers and coupled decay make it a `GroupSGD`
    (see `make_sgd`). `config.optimizer` `renorm_sgd` or `muon` gives the conv
    kernels their own optimizer (`make_kernel_optimizer`) in a `MultiOptimizer`
    with the SGD for the rest. `config.lookahead` wraps it all in `Lookahead`.

    With `config.ema`, the optimizer keeps an exponential moving average of
    the weights (Keras' `use_ema`); `fit_model` evaluates and checkpoints it
    (`keras.callbacks.SwapEMAWeights`) and the model ends with it.
    """
    optimizer = make_sgd(config, make_schedule(config, steps_per_epoch))
    if config.optimizer != "sgd":
        kernels = make_kernel_optimizer(config, steps_per_epoch)
        if config.agc:
            kernels = with_agc(kernels, clipping=config.agc)
            optimizer = with_agc(optimizer, clipping=config.agc)
        optimizer = split_kernels(kernels, optimizer)
    elif config.agc:
        optimizer = with_agc(optimizer, clipping=config.agc)
    if config.lookahead:
        optimizer = Lookahead(optimizer, sync_period=config.lookahead, alpha=config.lookahead_alpha,
                              schedule=config.lookahead_schedule, total_steps=config.epochs * steps_per_epoch)
    return optimizer


def make_loss(config):
    """Cross-entropy on logits; with label smoothing on one-hot labels (`make_dataset(..., one_hot=True)`)."""
    if config.label_smoothing:
        return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
