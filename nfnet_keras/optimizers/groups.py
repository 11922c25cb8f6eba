"""Parameter groups of an NF network and SGD with a learning-rate multiplier and weight-decay mode per group.

Every trainable variable belongs to one group:

- `head`: the classifier's weights (variables of the layer named `classifier`);
- `gain`: WS gains, skip gains (and BatchNorm `gamma` in the BatchNorm twin);
- `bias`: biases (and BatchNorm `beta`);
- `kernel`: everything else (conv and dense kernels).

Weight decay is separate from the groups: every variable whose name contains
one of `NO_DECAY_NAMES` is not decayed (so the classifier's kernel is, its
bias is not), the rule `make_optimizer` has always used.

`GroupSGD` is Keras' SGD with two additions, both inside its public
`update_step`:

- the step of a variable of group `g` uses `lr * lr_multipliers[g]`, for the
  momentum update and for decoupled decay alike (as a torch parameter group's
  `lr` does);
- `weight_decay_mode="coupled"` adds `weight_decay * w` to the gradient before
  the momentum update (L2 regularisation, torch SGD's `weight_decay`, the
  decay of the airbench speed runs), instead of Keras' decoupled
  `w <- w - lr * weight_decay * w` before the update.

With every multiplier 1 and decoupled decay, a step equals Keras' SGD with
`weight_decay` and `exclude_from_weight_decay(var_names=NO_DECAY_NAMES)` bit
for bit (`tests/test_optimizers.py`).
"""

import keras
from keras import ops

from nfnet_keras.agc import _agc_class

# Variables that get no weight decay: WS gains, skip gains and biases.
NO_DECAY_NAMES = ("bias", "gain", "skip_gain")
GROUPS = ("kernel", "bias", "gain", "head")
WEIGHT_DECAY_MODES = ("decoupled", "coupled")
HEAD_LAYER = "classifier"
_GAIN_NAMES = ("gain", "skip_gain", "gamma")
_BIAS_NAMES = ("bias", "beta")


def param_group(variable):
    """The group (`kernel`, `bias`, `gain` or `head`) of a trainable variable, from its path."""
    path = getattr(variable, "path", None) or variable.name
    parts = path.split("/")
    if HEAD_LAYER in parts[:-1]:
        return "head"
    if parts[-1] in _GAIN_NAMES:
        return "gain"
    if parts[-1] in _BIAS_NAMES:
        return "bias"
    return "kernel"


def decays(variable):
    """Whether weight decay applies to `variable` (its name contains none of `NO_DECAY_NAMES`)."""
    return not any(name in variable.name for name in NO_DECAY_NAMES)


def check_multipliers(lr_multipliers):
    """`lr_multipliers` as a dict over all `GROUPS` (missing ones 1.0); ValueError on a bad key or value.

    A multiplier of 0 freezes its group: those variables keep their values (as a frozen BatchNorm scale).
    """
    lr_multipliers = dict(lr_multipliers or {})
    unknown = sorted(set(lr_multipliers) - set(GROUPS))
    if unknown:
        raise ValueError(f"Unknown parameter group(s) {', '.join(map(repr, unknown))}; groups: {', '.join(GROUPS)}.")
    for group, value in lr_multipliers.items():
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"The lr multiplier of group {group!r} must be a number >= 0 (0 freezes the group), "
                             f"got {value!r}.")
    return {group: float(lr_multipliers.get(group, 1.0)) for group in GROUPS}


@keras.saving.register_keras_serializable(package="nfnet_keras")
class GroupSGD(keras.optimizers.SGD):
    """SGD (momentum, Nesterov) with a learning-rate multiplier per parameter group and coupled or decoupled decay.

    Args:
        learning_rate: float or `LearningRateSchedule`. The base learning rate.
            Defaults to `0.01`.
        momentum: float. Defaults to `0.0`.
        nesterov: bool. Defaults to `False`.
        weight_decay: float or None. Decay of the variables `decays()` selects.
            Defaults to `None` (none).
        weight_decay_mode: str. `decoupled` (`w -= lr_g * wd * w` before the
            update) or `coupled` (`g += wd * w` before the momentum update).
            Defaults to `"decoupled"`.
        lr_multipliers: dict. `{group: multiplier}` for groups in `GROUPS`;
            missing groups get 1; 0 freezes a group. Defaults to `None` (all 1).
        **kwargs: the other `keras.optimizers.Optimizer` arguments (`use_ema`,
            `clipnorm`, `loss_scale_factor`, ...).

    Example:

    >>> opt = GroupSGD(0.1, momentum=0.9, weight_decay=5e-4, weight_decay_mode="coupled",
    ...                lr_multipliers={"bias": 2.0, "head": 0.5})
    >>> opt.lr_multipliers["bias"]
    2.0
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None,
                 weight_decay_mode="decoupled", lr_multipliers=None, name="group_sgd", **kwargs):
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay_mode must be one of {', '.join(WEIGHT_DECAY_MODES)}, got {weight_decay_mode!r}."
            )
        if weight_decay is not None and not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0 or None, got {weight_decay!r}.")
        # Keras' own (decoupled, global-lr) decay stays off: update_step decays per group.
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=None,
                         name=name, **kwargs)
        self.group_weight_decay = float(weight_decay) if weight_decay else None
        self.weight_decay_mode = weight_decay_mode
        self.lr_multipliers = check_multipliers(lr_multipliers)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._step_multipliers = [self.lr_multipliers[param_group(v)] for v in variables]
        self._step_decays = [bool(self.group_weight_decay) and decays(v) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        multiplier = self._step_multipliers[index]
        if multiplier == 0.0:  # a frozen group: no decay, no momentum step
            return
        if multiplier != 1.0:
            learning_rate = ops.multiply(learning_rate, multiplier)
        if self._step_decays[index]:
            wd = ops.cast(self.group_weight_decay, variable.dtype)
            if self.weight_decay_mode == "coupled":
                gradient = ops.add(ops.cast(gradient, variable.dtype), ops.multiply(variable, wd))
            else:  # the expression of Keras' decoupled decay, with this group's lr
                lr = ops.cast(learning_rate, variable.dtype)
                self.assign_sub(variable, variable * wd * lr)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            weight_decay=self.group_weight_decay,
            weight_decay_mode=self.weight_decay_mode,
            lr_multipliers=dict(self.lr_multipliers),
        )
        return config


# Its AGC subclass exists from import on, so a saved model with an AGCGroupSGD loads in a fresh process.
_agc_class(GroupSGD)
