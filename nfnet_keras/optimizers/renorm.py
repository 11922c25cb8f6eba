"""SGD that keeps every filter of a kernel at unit norm, for weight-standardized (scale-invariant) kernels.

The idea of KellerJordan's airbench experiments without BatchNorm
(`batchnorm_begone.py`): a weight-standardized conv computes the same
function at any scale of a filter, so only the filter's direction matters.
Per output filter `j` of a kernel (the norm over all axes but the last: `h, w,
in` of an HWIO conv kernel, `in` of a dense kernel), with `w_j` at unit norm,
each step

    m   <- momentum * m + g                    (torch-style buffer, no lr inside)
    d   <- g + momentum * m                    Nesterov (or `d <- m`)
    d_j <- d_j - (d_j . w_j) w_j               the radial part removed
    d_j <- d_j / ||d_j||                       the filter's step, normalized
    w_j <- (w_j - lr * d_j) / ||w_j - lr * d_j||   back to unit norm

so the step turns each filter by `atan(lr)` radians (about `lr`) whatever its
gradient's scale and however long the momentum has agreed with it, and weight
decay has nothing to do. A filter is brought to unit norm before its first
step. Use it for the conv kernels and another optimizer for gains, biases and
the classifier (`split_kernels`).
"""

import keras
from keras import ops

from nfnet_keras.agc import _agc_class, unitwise_norm


def filter_norm(x):
    """The norm of each output filter of a kernel (all axes but the last), broadcastable to `x`."""
    return unitwise_norm(x)


def _filter_dot(x, y):
    """Each output filter's dot product of two kernels of one shape, broadcastable to them."""
    return ops.sum(x * y, axis=tuple(range(len(x.shape) - 1)), keepdims=True)


@keras.saving.register_keras_serializable(package="nfnet_keras")
class RenormSGD(keras.optimizers.Optimizer):
    """Nesterov SGD whose step turns every unit-norm filter by the lr, then renormalizes it.

    Args:
        learning_rate: float or `LearningRateSchedule`. About the angle (radians)
            each filter turns per step. Defaults to `0.025`.
        momentum: float. Defaults to `0.9`.
        nesterov: bool. Defaults to `True`.
        epsilon: float. Floor of the norms divided by. Defaults to `1e-12`.
        name: str. Defaults to `"renorm_sgd"`.
        **kwargs: the other `keras.optimizers.Optimizer` arguments (`use_ema`, ...).

    Example:

    >>> opt = RenormSGD(0.03, momentum=0.9)
    >>> opt.nesterov
    True
    """

    def __init__(self, learning_rate=0.025, momentum=0.9, nesterov=True, epsilon=1e-12, name="renorm_sgd",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.epsilon = float(epsilon)

    def build(self, variables):
        if self.built:
            return
        for v in variables:
            if len(v.shape) < 2:
                raise ValueError(f"RenormSGD normalizes the filters of kernels (2 or more dims); {v.path} has "
                                 f"shape {tuple(v.shape)}: give it to another optimizer (see split_kernels).")
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        self.assign(m, ops.add(ops.multiply(m, self.momentum), g))
        step = ops.add(g, ops.multiply(m, self.momentum)) if self.nesterov else m
        w = variable / ops.maximum(filter_norm(variable), self.epsilon)
        step = step - _filter_dot(step, w) * w
        step = step / ops.maximum(filter_norm(step), self.epsilon)
        w = ops.subtract(w, ops.multiply(step, lr))
        self.assign(variable, w / ops.maximum(filter_norm(w), self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, nesterov=self.nesterov, epsilon=self.epsilon)
        return config


# Its AGC subclass exists from import on, so a saved model with an AGCRenormSGD loads in a fresh process.
_agc_class(RenormSGD)
