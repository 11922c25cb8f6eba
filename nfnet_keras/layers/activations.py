"""Variance-preserving ("scaled") activations for Normalizer-Free networks.

For an activation `g` and `z ~ N(0, 1)`, `gamma = 1 / sqrt(Var(g(z)))`, so that
`g(z) * gamma` has unit variance again (Brock et al. 2021, arXiv 2101.08692,
Section 4 and Appendix D). The table is recomputed by quadrature in
`tests/test_activations.py`.
"""

import functools
import math

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


_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715


@functools.cache
def _tf_fused_gelu():
    """`fused_gelu` for TensorFlow: a custom gradient whose two halves are XLA-compiled elementwise loops."""
    import tensorflow as tf

    def tanh_arg(x):
        return _GELU_C * x * (1 + _GELU_A * x * x)

    @tf.function(jit_compile=True, autograph=False)
    def forward(x, scale):
        x32 = tf.cast(x, tf.float32)
        return tf.cast(scale * 0.5 * x32 * (1 + tf.tanh(tanh_arg(x32))), x.dtype)

    @tf.function(jit_compile=True, autograph=False)
    def backward(upstream, x, scale):
        # d/dx [x (1 + tanh u) / 2] = (1 + t) / 2 + x (1 - t^2) u' / 2, with t = tanh(u) recomputed from x
        # (cheaper than storing it: each half reads and writes each element once).
        x32 = tf.cast(x, tf.float32)
        t = tf.tanh(tanh_arg(x32))
        slope = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x32 * x32)
        return tf.cast(tf.cast(upstream, tf.float32) * (scale * slope), upstream.dtype)

    def gelu(x, scale):
        @tf.custom_gradient
        def fused(x):
            return forward(x, scale), lambda upstream: backward(upstream, x, scale)

        return fused(x)

    return gelu


def fused_gelu(x, scale=1.0):
    """`gelu(x, approximate=True) * scale` in one pass over `x`, and its gradient in one more.

    Under TensorFlow the forward and backward halves are each an XLA-compiled
    elementwise loop that computes in float32, whatever the dtype of `x`:
    written with separate ops, the tanh GELU and its gradient took about 15%
    of a `cifar_speed` train step's op time on a CPU (`mixed_bfloat16`), in
    some twenty passes over each feature map. The layers use it in training
    only (`training=True`), on TensorFlow without a GPU, in float32, bfloat16
    or float16 (`activate`); inference, and so every export, keeps the plain
    ops, which need no XLA. Other backends compute `ops.gelu(x) * scale`
    (JAX's jit fuses it already).
    """
    if keras.backend.backend() == "tensorflow":
        return _tf_fused_gelu()(x, float(scale))
    return ops.gelu(x, approximate=True) * ops.cast(scale, x.dtype)


@functools.cache
def tensorflow_on_cpu_only():
    """Whether Keras runs on TensorFlow with no GPU visible: where the layers' CPU fast paths apply."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


def activate(activation, x, scale=None, training=None):
    """`ACTIVATIONS[activation](x) * scale` (no scale: None), the tanh GELU fused while training on a CPU."""
    if (activation == "gelu" and training is True and tensorflow_on_cpu_only()
            and keras.backend.standardize_dtype(x.dtype) in ("float32", "bfloat16", "float16")):
        return fused_gelu(x, 1.0 if scale is None else scale)
    y = ACTIVATIONS[activation](x)
    return y if scale is None else y * ops.cast(scale, x.dtype)


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
        self.supports_masking = True

    def call(self, inputs, training=None):
        return activate(self.activation, inputs, self.gamma, training)

    def unscaled(self, inputs, training=None):
        """The activation without its gamma (for callers that fold gamma elsewhere)."""
        return activate(self.activation, inputs, None, training)

    def compute_output_shape(self, input_shape):
        if self.activation == "glu":
            return tuple(input_shape[:-1]) + (input_shape[-1] // 2,)
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["activation"] = self.activation
        return config
