"""The NF-ResNet family's residual blocks: the Normalizer-Free bottleneck and its BatchNorm twin.

`NFBlock`: `x_out = shortcut + alpha * skip_gain * f(act(x) * gamma / beta)`
(Brock et al. 2021, arXiv 2101.08692 and 2102.06171).
`PreActBottleneck`: the same convolutions as a BatchNorm pre-activation block,
`x_out = shortcut + f(x)` with `norm -> act` before each conv.

Both share `Bottleneck`, the convolutions and shortcut of a pre-activation
bottleneck, and differ only in what activates and scales the signal.
"""

import math

import keras
from keras import ops

from nfnet_keras.layers import (
    NormLayerMixin,
    ScaledActivation,
    SqueezeExcite,
    StochasticDepth,
    WSConv2D,
    check_activation,
    layer_class_name,
    resolve_layer_class,
    scaled_conv,
)
from nfnet_keras.models.flops import conv_macs
from nfnet_keras.models.nf_resnet.presets import check_beta, check_bottleneck
from nfnet_keras.models.signal_block import SignalBlock, legacy_twin_message


class Bottleneck(SignalBlock):
    """The convolutions of a pre-activation bottleneck block, shared by `NFBlock` and its twin.

    The residual branch is 1x1 -> 3x3 (strided, grouped) -> 3x3 (grouped) -> 1x1,
    an activation before each conv, then an optional Squeeze-Excite and
    stochastic depth. A transition block (the first of a stage) takes its
    shortcut from the activated input through a 1x1 conv, strided itself or
    (`shortcut_pool=True`, NFNet's way) after a 2x2 average pool; any other
    block's shortcut is its input.

    A subclass says what an activation is (`_make_activation`) and how the
    branch and shortcut are scaled (`call`). The arguments are `NFBlock`'s,
    less the normalization-free ones.
    """

    def __init__(self, filters, strides=1, transition=False, bottleneck_ratio=0.25, group_width=None,
                 activation="relu", se_ratio=0.0, stochastic_depth_rate=0.0, shortcut_pool=True, use_bias=True,
                 conv_layer=WSConv2D, se_activation=None, **kwargs):
        super().__init__(**kwargs)
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides!r}.")
        if strides != 1 and not transition:
            raise ValueError(f"A strided {type(self).__name__} must be a transition block (transition=True).")
        if not 0 <= se_ratio <= 1:
            raise ValueError(f"se_ratio must be in [0, 1], got {se_ratio!r}.")
        self.filters = int(filters)
        self.strides = int(strides)
        self.transition = bool(transition)
        self.bottleneck_ratio = float(bottleneck_ratio)
        self.group_width = None if group_width is None else int(group_width)
        self.activation = check_activation(activation)
        self.se_activation = None if se_activation is None else check_activation(se_activation)
        self.se_ratio = float(se_ratio)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.shortcut_pool = bool(shortcut_pool)
        self.use_bias = bool(use_bias)
        self.conv_layer = resolve_layer_class(conv_layer, keras.layers.Conv2D, "conv_layer")
        self.width = check_bottleneck(self.filters, self.bottleneck_ratio, self.group_width)
        self.groups = 1 if self.group_width is None else self.width // self.group_width

    def _make_activation(self, name):
        raise NotImplementedError

    def _conv(self, filters, kernel_size, name, **kwargs):
        return self.conv_layer(filters, kernel_size, use_bias=self.use_bias, kernel_initializer="he_normal",
                               name=name, dtype=self.dtype_policy, **kwargs)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        in_channels = input_shape[-1]
        if not self.transition and in_channels != self.filters:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} maps {in_channels} to {self.filters} channels "
                "and so needs transition=True (a projection shortcut)."
            )
        policy = self.dtype_policy  # sublayers compute in the block's own policy
        out_hw = lambda n: None if n is None else -(-n // self.strides)
        inner_shape = (input_shape[0], out_hw(input_shape[1]), out_hw(input_shape[2]), self.width)
        wide_shape = input_shape[:3] + (self.width,)
        self.act0, self.act1 = self._make_activation("act0"), self._make_activation("act1")
        self.act2, self.act3 = self._make_activation("act2"), self._make_activation("act3")
        for act, shape in ((self.act0, input_shape), (self.act1, wide_shape), (self.act2, inner_shape),
                           (self.act3, inner_shape)):
            act.build(shape)
        self.conv0 = self._conv(self.width, 1, "conv0")
        self.conv1 = self._conv(self.width, 3, "conv1", strides=self.strides, padding="same", groups=self.groups)
        self.conv1b = self._conv(self.width, 3, "conv1b", padding="same", groups=self.groups)
        self.conv2 = self._conv(self.filters, 1, "conv2")
        self.conv0.build(input_shape)
        self.conv1.build(wide_shape)
        self.conv1b.build(inner_shape)
        self.conv2.build(inner_shape)
        self.se = None
        if self.se_ratio > 0:
            se_activation = self.activation if self.se_activation is None else self.se_activation
            self.se = SqueezeExcite(self.se_ratio, se_activation, name="se", dtype=policy)
            self.se.build(inner_shape[:3] + (self.filters,))
        self.drop_path = StochasticDepth(self.stochastic_depth_rate, name="drop_path", dtype=policy)
        self.pool = None
        self.shortcut_conv = None
        if self.transition:
            conv_strides = self.strides
            if self.strides > 1 and self.shortcut_pool:
                conv_strides = 1
                self.pool = keras.layers.AveragePooling2D(
                    self.strides, self.strides, padding="same", name="shortcut_pool", dtype=policy
                )
            self.shortcut_conv = self._conv(self.filters, 1, "shortcut_conv", strides=conv_strides)
            self.shortcut_conv.build((inner_shape if self.pool is not None else input_shape)[:3] + (in_channels,))

    def conv_sublayers(self):
        """The block's convolutions in order: conv0, conv1, conv1b, conv2 (and shortcut_conv).

        Needs a built block. Their `name`s are the scopes of their ops.
        """
        convs = [self.conv0, self.conv1, self.conv1b, self.conv2]
        return convs + ([self.shortcut_conv] if self.shortcut_conv is not None else [])

    def macs(self, input_shape):
        """Multiply-adds of the block on one input of shape `(height, width, channels)`.

        Counts the convolutions and the Squeeze-Excite's dense layers; the
        activations, pooling, normalization and weight standardization are not
        counted (see `nfnet_keras.count_macs`).

        Returns:
            `(macs, output_shape)`, the output shape as `(height, width, filters)`.

        Raises:
            ValueError: if the block is not built.
        """
        if not self.built:
            raise ValueError(f"{type(self).__name__} {self.name!r} must be built before counting its MACs.")
        input_shape = tuple(input_shape)
        macs, shape = conv_macs(self.conv0, input_shape)
        for conv in (self.conv1, self.conv1b, self.conv2):
            m, shape = conv_macs(conv, shape)
            macs += m
        if self.se is not None:
            macs += self.se.macs(shape)[0]
        if self.shortcut_conv is not None:
            # After a pool the conv sees the output resolution; else it strides itself.
            pooled = shape[:2] + (input_shape[2],) if self.pool is not None else input_shape
            macs += conv_macs(self.shortcut_conv, pooled)[0]
        return macs, shape

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        hw = [None if n is None else -(-n // self.strides) for n in input_shape[1:3]]
        return (input_shape[0], *hw, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            strides=self.strides,
            transition=self.transition,
            bottleneck_ratio=self.bottleneck_ratio,
            group_width=self.group_width,
            activation=self.activation,
            se_ratio=self.se_ratio,
            stochastic_depth_rate=self.stochastic_depth_rate,
            shortcut_pool=self.shortcut_pool,
            use_bias=self.use_bias,
            conv_layer=layer_class_name(self.conv_layer, "conv_layer"),
            se_activation=self.se_activation,
        )
        return config


@keras.saving.register_keras_serializable(package="nfnet_keras")
class NFBlock(Bottleneck):
    """A Normalizer-Free pre-activation bottleneck residual block.

    Computes `h = act(x) * gamma / beta` with `beta = sqrt(expected_var)`, the
    residual branch `f(h)` = 1x1 -> 3x3 (strided, grouped) -> 3x3 (grouped) -> 1x1
    weight-standardized convs, each but the first preceded by the scaled
    activation, an optional Squeeze-Excite, stochastic depth, and returns
    `shortcut + alpha * skip_gain * f(h)`. `skip_gain` is a scalar initialised to
    0 (SkipInit), so every block starts as the identity on its shortcut.

    A transition block (the first of a stage) takes its shortcut from `h`
    through a 1x1 WS conv, strided itself or (`shortcut_pool=True`, NFNet's
    way) after a 2x2 average pool; its output's expected variance restarts at
    `1 + alpha**2`. (The pool divides the variance of a spatially white signal
    by ~4, so the restart holds for natural images there, not for white
    noise.) Any other block's shortcut is `x` and its output's expected
    variance is `expected_var + alpha**2`: read it from `expected_output_var`
    and pass it on to the next block.

    The convolutions are `conv_layer`s (`WSConv2D` by default, as DeepMind's
    `which_conv`). The block's scalars (`gamma`, `1 / beta`, `alpha * skip_gain`)
    are folded into the kernels of a conv layer whose `call` takes
    `input_scale` and `output_scale` (as `WSConv2D`'s does), and multiply the
    feature maps for any other (e.g. a plain `keras.layers.Conv2D`). Its
    BatchNorm twin is `PreActBottleneck`.

    Args:
        filters: int. Output channels.
        expected_var: float. Expected variance of the block's input. Defaults to `1`.
        alpha: float. Residual-branch scale. Defaults to `0.2`.
        strides: int. Stride of the first 3x3 conv (and the shortcut pool).
            Defaults to `1`.
        transition: bool. Whether this is the first block of a stage (projection
            shortcut from the scaled activation). Needed when `strides > 1` or
            the channel count changes. Defaults to `False`.
        bottleneck_ratio: float. Width of the 3x3 convs as a fraction of
            `filters` (rounded; must not round to 0). Defaults to `0.25`.
        group_width: int or None. Channels per group of the 3x3 convs; `None`
            for ordinary (ungrouped) convs. Defaults to `None`.
        activation: str. A key of `GAMMAS`. Defaults to `"relu"`.
        se_ratio: float. Squeeze-Excite hidden ratio; `0` disables it. Defaults to `0`.
        stochastic_depth_rate: float in [0, 1). Defaults to `0`.
        skip_gain_init: float. Initial value of `skip_gain`. Defaults to `0`.
        shortcut_pool: bool. In a strided transition, average-pool before the
            1x1 shortcut conv (NFNet) instead of striding the conv (ResNet).
            Defaults to `True`.
        use_bias: bool. Whether the convs have biases (NFNet: yes).
            Defaults to `True`.
        conv_layer: class or str. A `keras.layers.Conv2D` subclass, or its
            registered name, for every conv of the block. Defaults to `WSConv2D`.
        se_activation: str or None. The Squeeze-Excite's hidden activation (a
            key of `GAMMAS`, scaled by its gamma); `None`: `activation`.
            Defaults to `None`.
        beta: str. `"std"`: divide the input by its expected standard deviation
            (the papers); `"var"`: by its expected variance (the report's code,
            for reproducing it). Defaults to `"std"`.

    Example:

    >>> block = NFBlock(64, expected_var=1.0, transition=True)
    >>> block(keras.ops.ones((1, 8, 8, 16))).shape
    (1, 8, 8, 64)
    >>> round(block.expected_output_var, 2)
    1.04
    """

    def __init__(self, filters, expected_var=1.0, alpha=0.2, strides=1, transition=False, bottleneck_ratio=0.25,
                 group_width=None, activation="relu", se_ratio=0.0, stochastic_depth_rate=0.0, skip_gain_init=0.0,
                 shortcut_pool=True, use_bias=True, conv_layer=WSConv2D, beta="std", se_activation=None, **kwargs):
        super().__init__(filters, strides=strides, transition=transition, bottleneck_ratio=bottleneck_ratio,
                         group_width=group_width, activation=activation, se_ratio=se_ratio,
                         stochastic_depth_rate=stochastic_depth_rate, shortcut_pool=shortcut_pool,
                         use_bias=use_bias, conv_layer=conv_layer, se_activation=se_activation, **kwargs)
        if not expected_var > 0:
            raise ValueError(f"expected_var must be > 0, got {expected_var!r}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}.")
        self.beta_from = check_beta(beta)
        self.expected_var = float(expected_var)
        self.alpha = float(alpha)
        self.skip_gain_init = float(skip_gain_init)

    @property
    def beta(self):
        """What the block divides its input by: the expected standard deviation (`beta="std"`),
        or the expected variance (`beta="var"`, the report's code)."""
        return math.sqrt(self.expected_var) if self.beta_from == "std" else self.expected_var

    @property
    def expected_output_var(self):
        """The expected variance of the block's output (the tracking rule)."""
        return (1.0 if self.transition else self.expected_var) + self.alpha**2

    def output_var_for(self, input_var):
        """The output variance for input variance `input_var` with the current skip gain.

        The block scales its input by `1 / beta`, `beta**2` being the variance
        expected with every gain at 1, so its branch (and a transition's
        shortcut) sees `v / beta**2`; the output is
        `(v if not transition else v / beta**2) + (alpha * skip_gain)**2 * v / beta**2`.
        """
        gain = float(ops.convert_to_numpy(self.skip_gain))
        scaled = input_var / self.expected_var
        return (scaled if self.transition else input_var) + (self.alpha * gain) ** 2 * scaled

    def _make_activation(self, name):
        return ScaledActivation(self.activation, name=name, dtype=self.dtype_policy)

    def build(self, input_shape):
        super().build(input_shape)
        self.skip_gain = self.add_weight(
            name="skip_gain", shape=(), initializer=keras.initializers.Constant(self.skip_gain_init), trainable=True
        )

    def _scaled_input(self, inputs):
        """`act(x) * gamma / beta`, as an explicit tensor (for inspection and tests)."""
        return self.act0(inputs) * ops.cast(1.0 / self.beta, inputs.dtype)

    def _input_scale(self):
        return self.act0.gamma / self.beta

    def _shortcut(self, inputs, a):
        """The shortcut; `a` is the block's activated input, before `_input_scale`."""
        if not self.transition:
            return inputs
        if self.pool is not None:
            a = self.pool(a)  # linear: pooling then scaling is scaling then pooling
        return scaled_conv(self.shortcut_conv, a, input_scale=self._input_scale())

    def _branch(self, a, output_scale=None, training=None):
        """`f(a * gamma / beta) * output_scale` from the activated input `a` (before its scale).

        Every scalar of the block (each activation's gamma, `1 / beta`, and the
        output scale) is multiplied into the next conv's kernel rather than
        into the feature maps: same function, fewer passes over memory.
        """
        out = scaled_conv(self.conv0, a, input_scale=self._input_scale())
        for act, conv in ((self.act1, self.conv1), (self.act2, self.conv1b)):
            out = scaled_conv(conv, act.unscaled(out, training), input_scale=act.gamma)
        out = scaled_conv(self.conv2, self.act3.unscaled(out, training), input_scale=self.act3.gamma,
                          output_scale=output_scale)
        if self.se is not None:
            out = self.se(out)
        return out

    def residual_branch(self, inputs):
        """Returns `f(act(x) * gamma / beta)`, before skip gain and alpha (inference mode)."""
        return self._branch(self.act0.unscaled(inputs))

    def call(self, inputs, training=None):
        a = self.act0.unscaled(inputs, training)
        shortcut = self._shortcut(inputs, a)
        scale = self.skip_gain * self.alpha
        if self.se is None:  # f is linear in its last conv: scale that conv instead
            out = self.drop_path(self._branch(a, output_scale=scale, training=training), training=training)
        else:  # the SE gate sees f's scale: scale after it
            out = self.drop_path(self._branch(a, training=training), training=training)
            out = out * ops.cast(scale, out.dtype)
        return shortcut + out

    def get_config(self):
        config = super().get_config()
        config.update(expected_var=self.expected_var, alpha=self.alpha, skip_gain_init=self.skip_gain_init,
                      beta=self.beta_from)
        return config

    @classmethod
    def from_config(cls, config):
        if config.pop("norm_layer", None) is not None:
            raise ValueError(legacy_twin_message("NFBlock", "PreActBottleneck"))
        return cls(**config)


@keras.saving.register_keras_serializable(package="nfnet_keras")
class PreActBottleneck(NormLayerMixin, Bottleneck):
    """The BatchNorm twin of `NFBlock`: the same convolutions as a pre-activation ResNet block.

    Each of `NFBlock`'s scaled activations is `norm_layer -> activation` (a
    `NormActivation`), and the block returns `shortcut + f(x)`: no `1 / beta`,
    alpha or skip gain. A transition's shortcut comes from the normalized,
    activated input, as in a pre-activation ResNet.

    Args:
        filters, strides, transition, bottleneck_ratio, group_width, activation,
            se_ratio, stochastic_depth_rate, shortcut_pool, use_bias, conv_layer, se_activation:
            as `NFBlock`'s. `conv_layer` defaults to a plain `keras.layers.Conv2D`.
        norm_layer: class or str. A normalization layer class (or its registered
            name). Defaults to `"BatchNormalization"`.
        norm_config: dict or None. Keyword arguments of `norm_layer` (see
            `NormActivation`). Defaults to `None`.

    Example:

    >>> twin = PreActBottleneck(64, transition=True, use_bias=False)
    >>> twin(keras.ops.ones((1, 8, 8, 16))).shape
    (1, 8, 8, 64)
    """

    def __init__(self, filters, *, norm_layer="BatchNormalization", conv_layer="Conv2D", norm_config=None, **kwargs):
        super().__init__(filters, conv_layer=conv_layer, **kwargs)
        self._set_norm(norm_layer, norm_config)

    def _branch(self, x, training=None):
        out = self.conv0(x)
        for act, conv in ((self.act1, self.conv1), (self.act2, self.conv1b), (self.act3, self.conv2)):
            out = conv(act(out, training=training))
        return out if self.se is None else self.se(out)

    def residual_branch(self, inputs):
        """Returns `f(x)` in inference mode."""
        return self._branch(self.act0(inputs, training=False), training=False)

    def call(self, inputs, training=None):
        a = self.act0(inputs, training=training)
        shortcut = inputs
        if self.transition:
            shortcut = self.shortcut_conv(a if self.pool is None else self.pool(a))
        return shortcut + self.drop_path(self._branch(a, training=training), training=training)
