"""The speed network's block: `conv3x3 -> max-pool -> act -> conv3x3 -> act`, and its BatchNorm twin."""

import keras

from nfnet_keras.layers import (
    NormLayerMixin,
    ScaledActivation,
    WSConv2D,
    check_activation,
    layer_class_name,
    resolve_layer_class,
    scaled_conv,
)
from nfnet_keras.models.flops import conv_macs
from nfnet_keras.models.initialization import channel_moments
from nfnet_keras.models.signal_block import SignalBlock, legacy_twin_message


@keras.saving.register_keras_serializable(package="nfnet_keras")
class ConvGroup(SignalBlock):
    """`conv3x3 -> max-pool -> act -> conv3x3 -> act`, without a residual connection.

    Each `act` is the scaled activation (`act(x) * gamma`) after a
    weight-standardized conv, so a unit-variance input gives unit-variance
    activations. The max-pool before the first activation raises the mean of
    its input (the largest of four unit Gaussians has mean 1.03 and standard
    deviation 0.70); removing that shift and scale analytically made the
    network train far slower on CIFAR-10 (docs/model.md), so the group keeps
    the pooled values as they are. Its BatchNorm twin is `NormConvGroup`.

    For the signal-propagation tools the group is a block whose branch is the
    whole group (there is no skip path): `residual_branch(x)` is its output,
    `expected_output_var` is 1 and it has no skip gain.

    Args:
        filters: int. Output channels of both convs.
        activation: str. A key of `nfnet_keras.GAMMAS`. Defaults to `"gelu"`.
        pool_size: int. Max-pool window and stride after the first conv (1: none).
            Defaults to `2`.
        use_bias: bool. Whether the convs have biases. Defaults to `True`.
        conv_layer: class or str. A `keras.layers.Conv2D` subclass or its
            registered name. Defaults to `WSConv2D`.
        conv_config: dict or None. More keyword arguments of `conv_layer`
            (e.g. `{"center": False}` for a `WSConv2D`). Defaults to `None`.
        **kwargs: Standard `keras.layers.Layer` arguments.
    """

    expected_var = 1.0
    expected_output_var = 1.0

    def __init__(self, filters, activation="gelu", pool_size=2, use_bias=True, conv_layer=WSConv2D, conv_config=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(filters, int) and filters > 0):
            raise ValueError(f"filters must be a positive int, got {filters!r}.")
        if not (isinstance(pool_size, int) and pool_size >= 1):
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}.")
        self.filters, self.pool_size, self.use_bias = filters, pool_size, bool(use_bias)
        self.activation = check_activation(activation)
        self.conv_layer = resolve_layer_class(conv_layer, keras.layers.Conv2D, "conv_layer")
        self.conv_config = dict(conv_config) if conv_config else None

    def _make_activation(self, name):
        return ScaledActivation(self.activation, name=name, dtype=self.dtype_policy)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        conv = lambda name: self.conv_layer(self.filters, 3, padding="same", use_bias=self.use_bias,
                                            kernel_initializer="he_normal", name=name, dtype=self.dtype_policy,
                                            **(self.conv_config or {}))
        self.conv1, self.conv2 = conv("conv1"), conv("conv2")
        self.act1, self.act2 = self._make_activation("act1"), self._make_activation("act2")
        self.pool = None
        if self.pool_size > 1:
            self.pool = keras.layers.MaxPooling2D(self.pool_size, name="pool", dtype=self.dtype_policy)
        pooled = self.compute_output_shape(input_shape)
        self.conv1.build(input_shape)
        self.conv2.build(pooled)
        self.act1.build(pooled)
        self.act2.build(pooled)

    def conv_sublayers(self):
        """The group's two convolutions, in order (needs a built group)."""
        return [self.conv1, self.conv2]

    def macs(self, input_shape):
        """`(multiply-adds, output_shape)` on one input `(height, width, channels)` (see `count_macs`)."""
        if not self.built:
            raise ValueError(f"{type(self).__name__} {self.name!r} must be built before counting its MACs.")
        macs, (h, w, c) = conv_macs(self.conv1, tuple(input_shape))
        shape = (h // self.pool_size, w // self.pool_size, c)
        more, shape = conv_macs(self.conv2, shape)
        return macs + more, shape

    def _pooled(self, inputs):
        x = self.conv1(inputs)
        return x if self.pool is None else self.pool(x)

    def call(self, inputs, training=None):
        # gamma of the first activation is folded into the second conv's kernel where it can be.
        x = scaled_conv(self.conv2, self.act1.unscaled(self._pooled(inputs), training), input_scale=self.act1.gamma)
        return self.act2(x, training=training)

    def data_initialize(self, inputs, batch_size=256):
        """Sets the convs' gains and biases so that each activation's input is standardized on `inputs`.

        On these inputs (the group's, from real images) each activation then
        sees mean 0 and variance 1 per channel, as after a BatchNorm at the
        start of training: conv1's outputs are standardized through the
        max-pool (which commutes with a positive scale and a shift per
        channel), then conv2's on the activations of the new conv1. Only the
        gains and biases change; nothing normalizes afterwards. Needs convs
        with a gain (`WSConv2D`).

        Args:
            inputs: array `(n, h, w, c)`: the group's inputs.
            batch_size: int. Images per forward pass.

        Returns:
            The paths of the gains set.
        """
        self.conv1.standardize_outputs(*channel_moments(self._pooled, inputs, batch_size))
        pre_act2 = lambda x: self.conv2(self.act1(self._pooled(x)))
        self.conv2.standardize_outputs(*channel_moments(pre_act2, inputs, batch_size))
        return [self.conv1.gain.path, self.conv2.gain.path]

    def residual_branch(self, inputs):
        """The group's output in inference mode (the group has no skip path)."""
        return self(inputs, training=False)

    def compute_output_shape(self, input_shape):
        pool = lambda n: None if n is None else n // self.pool_size
        return (input_shape[0], pool(input_shape[1]), pool(input_shape[2]), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, activation=self.activation, pool_size=self.pool_size,
                      use_bias=self.use_bias, conv_layer=layer_class_name(self.conv_layer, "conv_layer"),
                      conv_config=self.conv_config)
        return config

    @classmethod
    def from_config(cls, config):
        if cls is ConvGroup and config.pop("norm_layer", None) is not None:
            raise ValueError(legacy_twin_message("ConvGroup", "NormConvGroup"))
        return cls(**config)


@keras.saving.register_keras_serializable(package="nfnet_keras")
class NormConvGroup(NormLayerMixin, ConvGroup):
    """The BatchNorm twin of `ConvGroup`: `conv3x3 -> max-pool -> norm -> act -> conv3x3 -> norm -> act`.

    Args:
        filters, activation, pool_size, use_bias, conv_layer: as `ConvGroup`'s.
            `conv_layer` defaults to a plain `keras.layers.Conv2D`.
        norm_layer: class or str. A normalization layer class (or its registered
            name). Defaults to `"BatchNormalization"`.
        norm_config: dict or None. Keyword arguments of `norm_layer` (see
            `NormActivation`). Defaults to `None`.
    """

    expected_var = None
    expected_output_var = None
    data_initialize = None  # its BatchNorms standardize the activations' inputs at every step

    def __init__(self, filters, activation="gelu", *, norm_layer="BatchNormalization", conv_layer="Conv2D",
                 norm_config=None, **kwargs):
        super().__init__(filters, activation, conv_layer=conv_layer, **kwargs)
        self._set_norm(norm_layer, norm_config)

    def call(self, inputs, training=None):
        x = self.act1(self._pooled(inputs), training=training)
        return self.act2(self.conv2(x), training=training)
