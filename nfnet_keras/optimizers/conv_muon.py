"""Muon for conv kernels: Keras' `Muon` with 4-D kernels orthogonalized as (fan-in, filters) matrices.

Keras 3.15's `keras.optimizers.Muon` applies its Muon step only to 2-D
variables and sends every other one, conv kernels included, to its AdamW
step (`Muon._should_use_adamw`: `len(variable.shape) != 2`, by design since
https://github.com/keras-team/keras/pull/21885). The CIFAR-10
speed runs (airbench94_muon) use Muon on the conv filters reshaped to
(filters, fan-in). `ConvMuon` does that: an HWIO kernel `(h, w, in, out)`
is reshaped to `(h * w * in, out)` for the momentum's Newton-Schulz
orthogonalization and back. (Newton-Schulz commutes with transposition and
with permuting the fan-in rows, so this equals airbench's `(out, in*h*w)`
layout.) Everything else (2-D Muon, AdamW for the rest, decay, EMA, saving)
is Keras' Muon, with airbench94_muon's rescaling of each kernel before its
step as an option (`normalize_weights`); the class overrides Muon's two private methods
`_should_use_adamw` and `_muon_update_step`, and `tests/test_optimizers.py`
checks a step against an explicit Newton-Schulz computation, so a Keras
change to them fails there.
"""

import re

import keras
from keras import ops

from nfnet_keras.agc import _agc_class


@keras.saving.register_keras_serializable(package="nfnet_keras")
class ConvMuon(keras.optimizers.Muon):
    """`keras.optimizers.Muon` that also takes the Muon step on 4-D conv kernels.

    Takes Keras' Muon arguments. For the speed runs' step pass
    `rms_rate=None` (no Moonlight rescaling), `nesterov=True` and e.g.
    `ns_steps=3`, and give it only the conv kernels (`split_kernels`).

    Args:
        normalize_weights: bool. Rescale each conv kernel to Frobenius norm
            `sqrt(filters)` (filters of unit norm on average) before its step,
            as airbench94_muon does. A kernel whose output is scale-invariant
            (a weight-standardized conv, a conv before a BatchNorm) then keeps
            its scale, so the lr alone sets how far a step turns it; without
            it, the orthogonal steps grow the kernel and each step turns it
            less. Weight decay then has no effect on the kernels. Defaults to
            `False`.
        *args, **kwargs: `keras.optimizers.Muon`'s.

    Example:

    >>> opt = ConvMuon(0.24, momentum=0.6, ns_steps=3, rms_rate=None, weight_decay=None)
    >>> opt.ns_steps
    3
    """

    def __init__(self, *args, normalize_weights=False, name="conv_muon", **kwargs):
        super().__init__(*args, name=name, **kwargs)
        self.normalize_weights = bool(normalize_weights)

    def get_config(self):
        config = super().get_config()
        config["normalize_weights"] = self.normalize_weights
        return config

    def _should_use_adamw(self, variable):
        if len(variable.shape) == 4:
            return any(re.search(keyword, variable.path) for keyword in self.exclude_layers)
        return super()._should_use_adamw(variable)

    def _muon_update_step(self, gradient, variable, lr, m):
        if len(variable.shape) != 4:
            return super()._muon_update_step(gradient, variable, lr, m)
        shape = tuple(variable.shape)
        self.assign_add(m, ops.add(gradient, m * (self.momentum - 1)))
        g = ops.add(gradient, self.momentum * m) if self.nesterov else m
        matrix = ops.reshape(g, (-1, shape[-1]))  # (fan-in, filters)
        update = ops.reshape(self.lr_adjust(lr * self.zeropower_via_newtonschulz5(matrix, self.ns_steps)), shape)
        if self.normalize_weights:
            scale = ops.sqrt(ops.cast(shape[-1], variable.dtype)) / ops.maximum(ops.norm(ops.reshape(variable, (-1,))),
                                                                               1e-12)
            self.assign(variable, ops.subtract(ops.multiply(variable, scale), update))
        else:
            self.assign_sub(variable, update)


# Its AGC subclass exists from import on, so a saved model with an AGCConvMuon loads in a fresh process.
_agc_class(ConvMuon)
