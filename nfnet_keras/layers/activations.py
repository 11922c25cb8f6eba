"""Variance-preserving ("scaled") activations for Normalizer-Free networks.

For an activation `g` and `z ~ N(0, 1)`, `gamma = 1 / sqrt(Var(g(z)))`, so that
`g(z) * gamma` has unit variance again (Brock et al. 2021, arXiv 2101.08692,
Section 4 and Appendix D). The table is recomputed by quadrature in
`tests/test_activations.py`.
"""

import keras
from keras import ops

from nfnet_keras.layers.gammas import GAMMAS, check_activation  # noqa: F401  (re-exported)


def _glu(x):
    a, b = ops.split(x, 2, axis=-1)
    return a * ops.sigmoid(b)


# Every activation in `GAMMAS`, written with `keras.ops` so that it runs on
# every backend. Parameters match the ones the published gammas were measured
# with: leaky_relu slope 0.01, elu/celu alpha 1, tanh-approximated GELU ("gelu"; "gelu_exact" is the erf form).
ACTIVATIONS = {
    "relu": ops.relu,
    "gelu": lambda x: ops.gelu(x, approximate=True),
    "gelu_exact": lambda x: ops.gelu(x, approximate=False),
    "silu": ops.silu,
    "swish": ops.silu,
    "elu": lambda x: ops.elu(x, alpha=1.0),
    "selu": ops.selu,
    "tanh": ops.tanh,
    "sigmoid": ops.sigmoid,
    "softplus": ops.softplus,
    "leaky_relu": lambda x: ops.leaky_relu(x, negative_slope=0.01),
    "relu6": ops.relu6,
    "celu": lambda x: ops.celu(x, alpha=1.0),
    "glu": _glu,
    "log_sigmoid": ops.log_sigmoid,
    "soft_sign": ops.softsign,
    "log_softmax": lambda x: ops.log_softmax(x, axis=-1),
    "identity": lambda x: x,
    "linear": lambda x: x,
}


@keras.saving.register_keras_serializable(package="nfnet_keras")
class ScaledActivation(keras.layers.Layer):
    """An activation multiplied by its gamma, so unit-Gaussian inputs keep unit variance.

    Args:
        activation: str. A key of `nfnet_keras.GAMMAS`. Defaults to `"relu"`.
        **kwargs: Standard `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:

    >>> layer = ScaledActivation("relu")
    >>> layer(keras.ops.ones((1, 2))).shape
    (1, 2)
    """

    def __init__(self, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.activation = check_activation(activation)
        self.gamma = GAMMAS[activation]
        self._fn = ACTIVATIONS[activation]
        self.supports_masking = True

    def call(self, inputs):
        return self._fn(inputs) * ops.cast(self.gamma, inputs.dtype)

    def unscaled(self, inputs):
        """The activation without its gamma (for callers that fold gamma elsewhere)."""
        return self._fn(inputs)

    def compute_output_shape(self, input_shape):
        if self.activation == "glu":
            return tuple(input_shape[:-1]) + (input_shape[-1] // 2,)
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["activation"] = self.activation
        return config
