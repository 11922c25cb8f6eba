"""Adaptive Gradient Clipping (Brock et al. 2021, arXiv 2102.06171, Section 4).

For every unit `i` of a weight `W` (an output channel of a conv kernel, an
output column of a dense kernel, each element of a vector or scalar):

    max_i = clipping * max(||W_i||, eps)
    G_i  <- G_i * max_i / max(||G_i||, 1e-6)    if ||G_i|| > max_i

Use it with any Keras optimizer: `with_agc(keras.optimizers.SGD(0.1), 0.01)`
returns an optimizer of the same kind that clips before its update. The
classifier's weights are not clipped (variables whose path contains one of
`exclude`).

Order, per step: gradients unscaled (`loss_scale_factor`, `LossScaleOptimizer`)
-> AGC, against the weights before this step -> the optimizer's own `clipnorm`
/ `global_clipnorm` / `clipvalue` -> decoupled weight decay -> the update.
`tests/test_agc.py` pins it with hand-computed steps.

Keras 3.15 has no public hook between the unscaling and its own clipping:
the public `apply` receives the gradients before Keras filters and unscales
them, and re-doing that here would copy private code. So the AGC class overrides one private method,
`_backend_apply_gradients(grads, trainable_variables)`, which `apply` (hence
`apply_gradients`, `fit` and a `LossScaleOptimizer`) calls with the unscaled
gradients, and which clips, decays and updates. Creating an AGC class fails
if the method is gone; `tests/test_agc.py` fails if Keras stops calling it.
"""

import keras
from keras import ops


def unitwise_norm(x):
    """Per-unit L2 norm of `x`, broadcastable to `x`.

    Scalars and vectors: the absolute value of each element. A 2D (dense)
    kernel `(in, out)`: the norm over `in` per output column. A conv kernel
    `(h, w, in, out)`: the norm over `h, w, in` per output channel.
    """
    if len(x.shape) <= 1:
        return ops.abs(x)
    return ops.sqrt(ops.sum(ops.square(x), axis=tuple(range(len(x.shape) - 1)), keepdims=True))


def clip_gradient(grad, param, clipping=0.01, eps=1e-3):
    """Returns `grad` clipped unit-wise relative to the norm of `param`."""
    grad_f = ops.cast(grad, "float32")
    param_norm = unitwise_norm(ops.cast(param, "float32"))
    grad_norm = unitwise_norm(grad_f)
    max_norm = ops.maximum(param_norm, eps) * clipping
    clipped = grad_f * (max_norm / ops.maximum(grad_norm, 1e-6))
    return ops.cast(ops.where(grad_norm > max_norm, clipped, grad_f), grad.dtype)


def _is_excluded(variable, exclude):
    path = getattr(variable, "path", None) or variable.name
    return any(pattern in path for pattern in exclude)


# The private method of `keras.optimizers.Optimizer` the AGC classes override.
HOOK = "_backend_apply_gradients"


class _AGCMixin:
    """Clips gradients with AGC before the wrapped optimizer's clipping, decay and update."""

    def _backend_apply_gradients(self, grads, trainable_variables):
        grads = [
            g if g is None or _is_excluded(v, self.agc_exclude)
            else clip_gradient(g, v, self.agc_clipping, self.agc_eps)
            for g, v in zip(grads, trainable_variables)
        ]
        return super()._backend_apply_gradients(grads, trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.update(
            agc_clipping=self.agc_clipping,
            agc_eps=self.agc_eps,
            agc_exclude=list(self.agc_exclude),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        agc = {k: config.pop(k) for k in ("agc_clipping", "agc_eps", "agc_exclude")}
        optimizer = super().from_config(config, custom_objects=custom_objects)
        _set_agc(optimizer, agc["agc_clipping"], agc["agc_eps"], agc["agc_exclude"])
        return optimizer


_AGC_CLASSES = {}


def _agc_class(base):
    """The AGC subclass of optimizer class `base`, created once and registered for loading."""
    if base not in _AGC_CLASSES:
        if not callable(getattr(base, HOOK, None)):
            raise RuntimeError(
                f"Keras {keras.__version__}: {base.__name__} has no {HOOK}(), the method "
                "nfnet_keras.agc overrides to clip gradients; this Keras version is not supported."
            )
        name = f"AGC{base.__name__}"
        cls = type(name, (_AGCMixin, base), {"__doc__": f"{base.__name__} with AGC."})
        _AGC_CLASSES[base] = keras.saving.register_keras_serializable(
            package="nfnet_keras", name=name
        )(cls)
    return _AGC_CLASSES[base]


def _set_agc(optimizer, clipping, eps, exclude):
    if not clipping > 0:
        raise ValueError(f"AGC clipping must be > 0, got {clipping!r}.")
    if optimizer.gradient_accumulation_steps:
        # Keras would clip each micro-batch's gradient, not the accumulated one.
        raise ValueError(
            "AGC does not support gradient_accumulation_steps "
            f"(got {optimizer.gradient_accumulation_steps}): it would clip every "
            "micro-batch's gradient instead of the accumulated gradient of the update."
        )
    optimizer.agc_clipping = float(clipping)
    optimizer.agc_eps = float(eps)
    optimizer.agc_exclude = tuple(exclude)


def with_agc(optimizer, clipping=0.01, eps=1e-3, exclude=("classifier",)):
    """Returns a copy of a Keras optimizer that applies Adaptive Gradient Clipping.

    Args:
        optimizer: a `keras.optimizers.Optimizer` instance, not yet built.
        clipping: float. The clipping factor lambda. The paper uses 0.01 for
            batch sizes up to ~4096 and smaller values for larger batches.
            Defaults to `0.01`.
        eps: float. Floor of a unit's weight norm. Defaults to `1e-3`.
        exclude: sequence of str. Variables whose path contains any of these are
            not clipped. Defaults to `("classifier",)`, the final dense layer.

    Returns:
        An optimizer of a subclass of `type(optimizer)` with the same config.
        It saves and loads with the model (registered as `nfnet_keras>AGC<Name>`).

    Raises:
        TypeError: `optimizer` is not a Keras optimizer.
        ValueError: `clipping <= 0`; the optimizer is built, already applies
            AGC, or accumulates gradients (`gradient_accumulation_steps`).

    Example:

    >>> opt = with_agc(keras.optimizers.SGD(0.1, momentum=0.9), clipping=0.01)
    >>> type(opt).__name__
    'AGCSGD'
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"with_agc expects a keras optimizer instance, got {optimizer!r}.")
    if isinstance(optimizer, _AGCMixin):
        raise ValueError("This optimizer already applies AGC.")
    if optimizer.built:
        raise ValueError("Wrap the optimizer with with_agc before it is built (used).")
    clone = _agc_class(type(optimizer)).from_config(
        dict(optimizer.get_config(), agc_clipping=clipping, agc_eps=eps, agc_exclude=list(exclude))
    )
    return clone


# The built-in optimizers' AGC classes exist from import on, so a saved model
# with e.g. an AGCSGD optimizer loads in a fresh process.
for _base in (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.Nadam,
    keras.optimizers.RMSprop,
    keras.optimizers.Lion,
    keras.optimizers.Lamb,
):
    _agc_class(_base)
