"""The Normalizer-Free residual block and its optional parts.

`x_out = shortcut + alpha * skip_gain * f(act(x) * gamma / beta)`
(Brock et al. 2021, arXiv 2101.08692 and 2102.06171).
"""

import math

import keras
from keras import ops

from nfnet_keras.activations import ScaledActivation, check_activation
from nfnet_keras.wsconv import WSConv2D


@keras.saving.register_keras_serializable(package="nfnet_keras")
class SqueezeExcite(keras.layers.Layer):
    """Squeeze-and-Excite channel gating (Hu et al. 2018), as used in NFNets.

    Returns `2 * sigmoid(mlp(mean_hw(x))) * x`: the factor 2 keeps the signal's
    variance at initialisation, where the gates sit near 0.5.

    Args:
        ratio: float. Hidden width as a fraction of the channels. Defaults to `0.5`.
        activation: str. Hidden activation, a key of `GAMMAS`. Defaults to `"relu"`.
    """

    def __init__(self, ratio=0.5, activation="relu", **kwargs):
        super().__init__(**kwargs)
        if not 0 < ratio <= 1:
            raise ValueError(f"SqueezeExcite ratio must be in (0, 1], got {ratio!r}.")
        self.ratio = ratio
        self.activation = check_activation(activation)

    def build(self, input_shape):
        channels = tuple(input_shape)[-1]
        hidden = max(1, int(channels * self.ratio))
        self.squeeze = keras.layers.Dense(hidden, name="squeeze")
        self.act = ScaledActivation(self.activation, name="act")
        self.excite = keras.layers.Dense(channels, name="excite")
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def call(self, inputs):
        s = ops.mean(inputs, axis=(1, 2))
        s = self.excite(self.act(self.squeeze(s)))
        gate = ops.sigmoid(s)[:, None, None, :]
        return 2.0 * gate * inputs

    def get_config(self):
        config = super().get_config()
        config.update(ratio=self.ratio, activation=self.activation)
        return config


@keras.saving.register_keras_serializable(package="nfnet_keras")
class StochasticDepth(keras.layers.Layer):
    """Drops a whole residual branch per example while training (Huang et al. 2016).

    Kept branches are scaled by `1 / (1 - rate)`; at inference it is the identity.

    Args:
        rate: float in [0, 1). Probability of dropping the branch. Defaults to `0`.
        seed: int or None. Seed of the drop mask.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"StochasticDepth rate must be in [0, 1), got {rate!r}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        mask = ops.floor(keep + noise)
        return inputs * mask / keep

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="nfnet_keras")
class NFBlock(keras.layers.Layer):
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
    by ~4, so the restart holds for natural images there, not for white noise.) Any other block's shortcut is `x` and
    its output's expected variance is `expected_var + alpha**2`: read it from
    `expected_output_var` and pass it on to the next block.

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
            `filters`. Defaults to `0.25`.
        group_width: int or None. Channels per group of the 3x3 convs; `None`
            for ordinary (ungrouped) convs. Defaults to `None`.
        activation: str. A key of `GAMMAS`. Defaults to `"relu"`.
        se_ratio: float. Squeeze-Excite hidden ratio; `0` disables it. Defaults to `0`.
        stochastic_depth_rate: float in [0, 1). Defaults to `0`.
        skip_gain_init: float. Initial value of `skip_gain`. Defaults to `0`.
        shortcut_pool: bool. In a strided transition, average-pool before the
            1x1 shortcut conv (NFNet) instead of striding the conv (ResNet).
            Defaults to `True`.
        use_bias: bool. Whether the WS convs have biases (NFNet: yes).
            Defaults to `True`.

    Example:

    >>> block = NFBlock(64, expected_var=1.0, transition=True)
    >>> block(keras.ops.ones((1, 8, 8, 16))).shape
    (1, 8, 8, 64)
    >>> round(block.expected_output_var, 2)
    1.04
    """

    def __init__(
        self,
        filters,
        expected_var=1.0,
        alpha=0.2,
        strides=1,
        transition=False,
        bottleneck_ratio=0.25,
        group_width=None,
        activation="relu",
        se_ratio=0.0,
        stochastic_depth_rate=0.0,
        skip_gain_init=0.0,
        shortcut_pool=True,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not expected_var > 0:
            raise ValueError(f"expected_var must be > 0, got {expected_var!r}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}.")
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides!r}.")
        if strides != 1 and not transition:
            raise ValueError("A strided NFBlock must be a transition block (transition=True).")
        if not 0 <= se_ratio <= 1:
            raise ValueError(f"se_ratio must be in [0, 1], got {se_ratio!r}.")
        self.filters = int(filters)
        self.expected_var = float(expected_var)
        self.alpha = float(alpha)
        self.strides = int(strides)
        self.transition = bool(transition)
        self.bottleneck_ratio = float(bottleneck_ratio)
        self.group_width = None if group_width is None else int(group_width)
        self.activation = check_activation(activation)
        self.se_ratio = float(se_ratio)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.skip_gain_init = float(skip_gain_init)
        self.shortcut_pool = bool(shortcut_pool)
        self.use_bias = bool(use_bias)
        self.width = max(1, int(round(self.filters * self.bottleneck_ratio)))
        if self.group_width is not None and self.width % self.group_width:
            raise ValueError(
                f"Bottleneck width {self.width} (filters {self.filters} x ratio "
                f"{self.bottleneck_ratio}) is not a multiple of group_width "
                f"{self.group_width}."
            )
        self.groups = 1 if self.group_width is None else self.width // self.group_width

    @property
    def beta(self):
        """The expected standard deviation of the block's input."""
        return math.sqrt(self.expected_var)

    @property
    def expected_output_var(self):
        """The expected variance of the block's output (the tracking rule)."""
        return (1.0 if self.transition else self.expected_var) + self.alpha**2

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        in_channels = input_shape[-1]
        if not self.transition and in_channels != self.filters:
            raise ValueError(
                f"NFBlock {self.name!r} maps {in_channels} to {self.filters} channels "
                "and so needs transition=True (a projection shortcut)."
            )
        act = lambda name: ScaledActivation(self.activation, name=name)
        self.act0 = act("act0")
        self.conv0 = WSConv2D(self.width, 1, use_bias=self.use_bias, name="conv0")
        self.act1 = act("act1")
        self.conv1 = WSConv2D(
            self.width, 3, strides=self.strides, padding="same", groups=self.groups,
            use_bias=self.use_bias, name="conv1",
        )
        self.act2 = act("act2")
        self.conv1b = WSConv2D(
            self.width, 3, padding="same", groups=self.groups, use_bias=self.use_bias, name="conv1b"
        )
        self.act3 = act("act3")
        self.conv2 = WSConv2D(self.filters, 1, use_bias=self.use_bias, name="conv2")
        h, w = input_shape[1], input_shape[2]
        out_hw = lambda n: None if n is None else -(-n // self.strides)
        inner_shape = (input_shape[0], out_hw(h), out_hw(w), self.width)
        self.conv0.build(input_shape)
        self.conv1.build(input_shape[:3] + (self.width,))
        self.conv1b.build(inner_shape)
        self.conv2.build(inner_shape)
        self.se = None
        if self.se_ratio > 0:
            self.se = SqueezeExcite(self.se_ratio, self.activation, name="se")
            self.se.build(inner_shape[:3] + (self.filters,))
        self.drop_path = StochasticDepth(self.stochastic_depth_rate, name="drop_path")
        self.pool = None
        self.shortcut_conv = None
        if self.transition:
            conv_strides = 1
            if self.strides > 1 and self.shortcut_pool:
                self.pool = keras.layers.AveragePooling2D(
                    self.strides, self.strides, padding="same", name="shortcut_pool"
                )
            else:
                conv_strides = self.strides
            self.shortcut_conv = WSConv2D(
                self.filters, 1, strides=conv_strides, use_bias=self.use_bias, name="shortcut_conv"
            )
            self.shortcut_conv.build(
                (inner_shape if self.pool is not None else input_shape)[:3] + (in_channels,)
            )
        self.skip_gain = self.add_weight(
            name="skip_gain",
            shape=(),
            initializer=keras.initializers.Constant(self.skip_gain_init),
            trainable=True,
        )

    def _scaled_input(self, inputs):
        """`act(x) * gamma / beta`, as an explicit tensor (for inspection and tests)."""
        return self.act0(inputs) * ops.cast(1.0 / self.beta, inputs.dtype)

    def _input_scale(self):
        return self.act0.gamma / self.beta

    def _shortcut(self, inputs, a):
        """The shortcut; `a` is the block's unscaled input activation."""
        if not self.transition:
            return inputs
        if self.pool is not None:
            a = self.pool(a)  # linear: pooling then scaling is scaling then pooling
        return self.shortcut_conv(a, input_scale=self._input_scale())

    def _branch(self, a, output_scale=None):
        """`f(a * gamma / beta) * output_scale` from the unscaled activation `a`.

        Every scalar of the block (each activation's gamma, `1 / beta`, and the
        output scale) is multiplied into the next conv's kernel rather than
        into the feature maps: same function, fewer passes over memory.
        """
        gamma = self.act1.gamma
        out = self.conv0(a, input_scale=self._input_scale())
        out = self.conv1(self.act1.unscaled(out), input_scale=gamma)
        out = self.conv1b(self.act2.unscaled(out), input_scale=gamma)
        out = self.conv2(self.act3.unscaled(out), input_scale=gamma, output_scale=output_scale)
        if self.se is not None:
            out = self.se(out)
        return out

    def residual_branch(self, inputs):
        """Returns `f(act(x) * gamma / beta)`, before skip gain and alpha (inference mode)."""
        return self._branch(self.act0.unscaled(inputs))

    def call(self, inputs, training=None):
        a = self.act0.unscaled(inputs)
        shortcut = self._shortcut(inputs, a)
        scale = self.skip_gain * self.alpha
        if self.se is None:  # f is linear in its last conv: scale that conv instead
            out = self._branch(a, output_scale=scale)
            out = self.drop_path(out, training=training)
        else:  # the SE gate sees f's scale: scale after it
            out = self.drop_path(self._branch(a), training=training)
            out = out * ops.cast(scale, out.dtype)
        return shortcut + out

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        hw = [None if n is None else -(-n // self.strides) for n in input_shape[1:3]]
        return (input_shape[0], *hw, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            expected_var=self.expected_var,
            alpha=self.alpha,
            strides=self.strides,
            transition=self.transition,
            bottleneck_ratio=self.bottleneck_ratio,
            group_width=self.group_width,
            activation=self.activation,
            se_ratio=self.se_ratio,
            stochastic_depth_rate=self.stochastic_depth_rate,
            skip_gain_init=self.skip_gain_init,
            shortcut_pool=self.shortcut_pool,
            use_bias=self.use_bias,
        )
        return config
