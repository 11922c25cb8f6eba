"""The CIFAR speed network: a whitening stem and three conv-pool groups, without residuals.

The shape of the BatchNorm CIFAR-10 speed runs (e.g. airbench94: a 2x2
patch-whitening stem, then three groups `conv3x3 -> max-pool -> BN -> GELU ->
conv3x3 -> BN -> GELU` of widths 64/256/256, max-pool, a linear head with
scaled logits), built Normalizer-Free: weight-standardized convolutions and
scaled activations where the BatchNorms were, and the whitening stem giving
the first group unit-variance input. `build_model("cifar_speed",
norm_layer=...)` builds the normalized twin of the same network.
"""

import keras
from keras import ops

from nfnet_keras.activations import ScaledActivation, check_activation
from nfnet_keras.blocks import NormActivation, _folds_scales, layer_class_name, resolve_layer_class
from nfnet_keras.flops import conv_macs
from nfnet_keras.whitening import PatchWhitening
from nfnet_keras.wsconv import WSConv2D


@keras.saving.register_keras_serializable(package="nfnet_keras")
class ConvGroup(keras.layers.Layer):
    """`conv3x3 -> max-pool -> act -> conv3x3 -> act`, without a residual connection.

    In the Normalizer-Free network (`norm_layer=None`) each `act` is the scaled
    activation (`act(x) * gamma`) after a weight-standardized conv, so a
    unit-variance input gives unit-variance activations; in the normalized
    twin each is `norm -> act` (`NormActivation`). The max-pool before the
    first activation raises the mean of its input (the largest of four unit
    Gaussians has mean 1.03 and standard deviation 0.70); removing that shift
    and scale analytically made the network train far slower on CIFAR-10
    (docs/model.md), so the group keeps the pooled values as they are.

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
        norm_layer: class, str or None. None for the Normalizer-Free group,
            else a normalization layer class. Defaults to `None`.
        **kwargs: Standard `keras.layers.Layer` arguments.
    """

    skip_gain = None
    transition = False
    expected_var = 1.0
    expected_output_var = 1.0

    def __init__(self, filters, activation="gelu", pool_size=2, use_bias=True, conv_layer=WSConv2D,
                 norm_layer=None, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(filters, int) and filters > 0):
            raise ValueError(f"filters must be a positive int, got {filters!r}.")
        if not (isinstance(pool_size, int) and pool_size >= 1):
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}.")
        self.filters, self.pool_size, self.use_bias = filters, pool_size, bool(use_bias)
        self.activation = check_activation(activation)
        self.conv_layer = resolve_layer_class(conv_layer, keras.layers.Conv2D, "conv_layer")
        self.norm_layer = None if norm_layer is None else resolve_layer_class(norm_layer, keras.layers.Layer,
                                                                              "norm_layer")
        self._fold = _folds_scales(self.conv_layer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        policy = self.dtype_policy
        if self.norm_layer is None:
            act = lambda name: ScaledActivation(self.activation, name=name, dtype=policy)
        else:
            act = lambda name: NormActivation(self.norm_layer, self.activation, name=name, dtype=policy)
        conv = lambda name: self.conv_layer(self.filters, 3, padding="same", use_bias=self.use_bias,
                                            kernel_initializer="he_normal", name=name, dtype=policy)
        self.conv1, self.act1, self.conv2, self.act2 = conv("conv1"), act("act1"), conv("conv2"), act("act2")
        self.pool = None
        if self.pool_size > 1:
            self.pool = keras.layers.MaxPooling2D(self.pool_size, name="pool", dtype=policy)
        pooled = self.compute_output_shape(input_shape)
        self.conv1.build(input_shape)
        self.conv2.build(pooled)
        if self.norm_layer is not None:
            self.act1.build(pooled)
            self.act2.build(pooled)

    def conv_sublayers(self):
        """The group's two convolutions, in order (needs a built group)."""
        return [self.conv1, self.conv2]

    def macs(self, input_shape):
        """`(multiply-adds, output_shape)` on one input `(height, width, channels)` (see `count_macs`)."""
        if not self.built:
            raise ValueError(f"ConvGroup {self.name!r} must be built before counting its MACs.")
        macs, (h, w, c) = conv_macs(self.conv1, tuple(input_shape))
        shape = (h // self.pool_size, w // self.pool_size, c)
        more, shape = conv_macs(self.conv2, shape)
        return macs + more, shape

    def call(self, inputs, training=None):
        x = self.conv1(inputs)
        if self.pool is not None:
            x = self.pool(x)
        if self.norm_layer is not None:
            return self.act2(self.conv2(self.act1(x, training=training)), training=training)
        # gamma of the first activation is folded into the second conv's kernel where it can be.
        x = self.act1.unscaled(x)
        if self._fold:
            x = self.conv2(x, input_scale=self.act1.gamma)
        else:
            x = self.conv2(x * ops.cast(self.act1.gamma, x.dtype))
        return self.act2(x)

    def residual_branch(self, inputs):
        """The group's output in inference mode (the group has no skip path)."""
        return self(inputs, training=False)

    def compute_output_shape(self, input_shape):
        pool = lambda n: None if n is None else n // self.pool_size
        return (input_shape[0], pool(input_shape[1]), pool(input_shape[2]), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, activation=self.activation, pool_size=self.pool_size, use_bias=self.use_bias,
            conv_layer=layer_class_name(self.conv_layer, "conv_layer"),
            norm_layer=None if self.norm_layer is None else layer_class_name(self.norm_layer, "norm_layer"),
        )
        return config


def build_conv_groups_model(config, num_classes, input_shape, conv_layer, norm_layer, name):
    """The functional speed network for a resolved `conv_groups` preset config (see `build_model`)."""
    act = config["activation"]
    inputs = keras.Input(input_shape, name="image")
    x = PatchWhitening(config["whitening_patch"], config["whitening_epsilon"], name="stem_whitening")(inputs)
    # No normalization after the stem in either network (a constant gamma changes nothing before BN).
    x = ScaledActivation(act, name="stem_act")(x)
    for stage, width in enumerate(config["widths"], start=1):
        x = ConvGroup(width, act, pool_size=2, use_bias=config["conv_bias"], conv_layer=conv_layer,
                      norm_layer=norm_layer, name=f"stage{stage}_group")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    if config["dropout"]:
        x = keras.layers.Dropout(config["dropout"], name="dropout")(x)
    x = keras.layers.Dense(num_classes, use_bias=False, dtype="float32", name="classifier")(x)
    outputs = keras.layers.Rescaling(config["logit_scale"], dtype="float32", name="logit_scale")(x)
    return keras.Model(inputs, outputs, name=name)
