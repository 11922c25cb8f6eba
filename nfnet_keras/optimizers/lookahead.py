"""Lookahead (Zhang et al. 2019, arXiv 1907.08610) around any Keras optimizer.

The wrapped ("fast") optimizer takes every step. Every `sync_period` steps,
the slow weights move towards the fast ones and the fast ones restart there:

    slow <- slow + alpha * (fast - slow)
    fast <- slow

The slow weights start as the weights before the first step; they are
optimizer variables, so they are saved and restored with the optimizer (a
checkpoint resumes a run exactly).

`schedule="airbench"` is the variant of the airbench94 speed run, which keeps
a copy of the weights that every 5 steps becomes an average of itself
(weight `decay`) and the network, and is copied into the network:
`alpha = 1 - base**sync_period * (t / total_steps)**3` at step `t` (airbench:
`0.95**5`), so early syncs keep the fast weights (alpha ~1) and late ones
average over more steps; after the last step (`t = total_steps`) the network
gets the slow weights.

Order per step: the inner optimizer's whole step (its AGC, decay, update and
EMA of the fast weights), then the sync. Under mixed precision Keras puts its
`LossScaleOptimizer` around this wrapper; a skipped (non-finite) step skips
the sync too.
"""

import keras
from keras import ops

SCHEDULES = ("constant", "airbench")


@keras.saving.register_keras_serializable(package="nfnet_keras")
class Lookahead(keras.optimizers.Optimizer):
    """Lookahead around a Keras optimizer: slow weights synced every `sync_period` steps.

    Args:
        inner_optimizer: a `keras.optimizers.Optimizer` (also a
            `MultiOptimizer` or one with AGC), not yet built.
        sync_period: int. Steps between syncs, `k`. Defaults to `5`.
        alpha: float. The slow weights' step size in (0, 1] for
            `schedule="constant"`. Defaults to `0.5`.
        schedule: str. `constant` (alpha) or `airbench`
            (`alpha = 1 - base**k * (t / total_steps)**3`, a last sync to the
            slow weights at `total_steps`). Defaults to `"constant"`.
        total_steps: int or None. Steps of the run; needed by `airbench`.
            Defaults to `None`.
        base: float. The per-step decay of the `airbench` schedule. Defaults
            to `0.95`.
        name: str. Defaults to `"lookahead"`.

    Example:

    >>> opt = Lookahead(keras.optimizers.SGD(0.1, momentum=0.9), sync_period=5, alpha=0.5)
    >>> opt.inner_optimizer.momentum
    0.9
    """

    def __init__(self, inner_optimizer, sync_period=5, alpha=0.5, schedule="constant", total_steps=None,
                 base=0.95, name="lookahead", **kwargs):
        if kwargs:
            raise ValueError(f"Lookahead takes no optimizer arguments (set them on the inner optimizer): "
                             f"{', '.join(sorted(kwargs))}.")
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"Lookahead wraps a keras optimizer instance, got {inner_optimizer!r}.")
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError("Put the LossScaleOptimizer around Lookahead, not inside it (compile does that).")
        if not (isinstance(sync_period, int) and sync_period >= 1):
            raise ValueError(f"sync_period must be an integer >= 1, got {sync_period!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
        if schedule == "constant" and not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}.")
        if schedule == "airbench" and not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"schedule 'airbench' needs total_steps, an integer >= 1, got {total_steps!r}.")
        if not 0 < base <= 1:
            raise ValueError(f"base must be in (0, 1], got {base!r}.")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.sync_period = sync_period
        self.alpha = float(alpha)
        self.schedule = schedule
        self.total_steps = total_steps
        self.base = float(base)

    def build(self, var_list):
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._slow_weights = self.add_optimizer_variables(var_list, "slow")

    @property
    def optimizers(self):
        """The optimizers that may keep an EMA (for `keras.callbacks.SwapEMAWeights` under loss scaling)."""
        return list(getattr(self.inner_optimizer, "optimizers", [self.inner_optimizer]))

    @property
    def variables(self):
        return self._variables[:] + list(self.inner_optimizer.variables)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        if hasattr(self, "inner_optimizer"):
            self.inner_optimizer.learning_rate = value

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def alpha_at(self, step):
        """The slow weights' step size at (1-based) step `step`."""
        if self.schedule == "constant":
            return ops.convert_to_tensor(self.alpha, "float32")
        progress = ops.minimum(ops.cast(step, "float32") / float(self.total_steps), 1.0)
        return 1.0 - self.base**self.sync_period * progress**3

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        if not self.built:
            self.build(trainable_variables)
        trainable_variables = list(trainable_variables)
        value = ops.convert_to_tensor  # a variable's current value (also inside JAX's stateless scope)
        first = ops.equal(value(self.inner_optimizer.iterations), 0)
        for slow, fast in zip(self._slow_weights, trainable_variables):
            slow.assign(ops.where(first, value(fast), value(slow)))  # the weights before the first step
        self.inner_optimizer.apply(grads, trainable_variables)
        step = value(self.inner_optimizer.iterations)
        mix = ops.equal(ops.mod(step, self.sync_period), 0)
        copy = mix
        if self.schedule == "airbench":
            copy = ops.logical_or(mix, ops.equal(step, self.total_steps))
        alpha = self.alpha_at(step)
        for slow, fast in zip(self._slow_weights, trainable_variables):
            slow_value, fast_value = value(slow), value(fast)
            new_slow = ops.where(mix, slow_value + ops.cast(alpha, slow.dtype) * (fast_value - slow_value), slow_value)
            slow.assign(new_slow)
            fast.assign(ops.where(copy, new_slow, fast_value))
        self._iterations.assign_add(1)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "sync_period": self.sync_period,
            "alpha": self.alpha,
            "schedule": self.schedule,
            "total_steps": self.total_steps,
            "base": self.base,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
