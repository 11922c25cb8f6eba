"""The Normalizer-Free residual block and its optional parts.

`x_out = shortcut + alpha * skip_gain * f(act(x) * gamma / beta)`
(Brock et al. 2021, arXiv 2101.08692 and 2102.06171).
"""

import inspect
import math

import keras
from keras import ops

from nfnet_keras.activations import ACTIVATIONS, ScaledActivation, check_activation
from nfnet_keras.flops import conv_macs
from nfnet_keras.wsconv import WSConv2D


def resolve_layer_class(layer, base, arg):
    """Returns the layer class that `layer` names, checked to subclass `base`.

    Args:
        layer: a class, or its registered name (`keras.saving.get_registered_name`,
            e.g. `"nfnet_keras>WSConv2D"`, or a Keras layer's class name such as
            `"Conv2D"` or `"BatchNormalization"`).
        base: the `keras.layers` class `layer` must subclass.
        arg: str. The argument's name, for the error message.

    Raises:
        ValueError: if `layer` names no class, or one that does not subclass `base`.
    """
    cls = layer
    if isinstance(layer, str):
        cls = keras.saving.get_registered_object(layer, module_objects=vars(keras.layers))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(
            f"{arg} must be a keras.layers.{base.__name__} subclass or its registered name, "
            f"got {layer!r}."
        )
    return cls


def layer_class_name(cls, arg):
    """Returns the name `resolve_layer_class` turns back into `cls` (for `get_config`).

    Raises:
        ValueError: if `cls` is not registered (`keras.saving.register_keras_serializable`)
            and is not a Keras layer, so that a saved model could not find it again.
    """
    name = keras.saving.get_registered_name(cls)
    found = keras.saving.get_registered_object(name, module_objects=vars(keras.layers))
    if found is not cls:
        raise ValueError(
            f"{arg} {cls.__qualname__} cannot be serialized: register it with "
            "`keras.saving.register_keras_serializable` or use a Keras layer."
        )
    return name


def bottleneck_width(filters, bottleneck_ratio):
    """The channels of a block's 3x3 convs: `filters * bottleneck_ratio`, rounded."""
    return int(round(filters * bottleneck_ratio))


def _folds_scales(conv_class):
    """Whether `conv_class.call` takes `input_scale` and `output_scale` (as `WSConv2D` does)."""
    params = inspect.signature(conv_class.call).parameters
    return "input_scale" in params and "output_scale" in params


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
        policy = self.dtype_policy  # sublayers compute in the layer's own policy
        self.squeeze = keras.layers.Dense(hidden, name="squeeze", dtype=policy)
        self.act = ScaledActivation(self.activation, name="act", dtype=policy)
        self.excite = keras.layers.Dense(channels, name="excite", dtype=policy)
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def call(self, inputs):
        s = ops.mean(inputs, axis=(1, 2))
        s = self.excite(self.act(self.squeeze(s)))
        gate = ops.sigmoid(s)[:, None, None, :]
        return 2.0 * gate * inputs

    def macs(self, input_shape):
        """Multiply-adds of the two dense layers on one `(height, width, channels)` input.

        Returns:
            `(macs, output_shape)`; the output shape is the input shape.
        """
        if not self.built:
            raise ValueError(f"SqueezeExcite {self.name!r} must be built before counting its MACs.")
        return 2 * tuple(input_shape)[-1] * self.squeeze.units, tuple(input_shape)

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
class NormActivation(keras.layers.Layer):
    """A normalization layer followed by the plain activation (no gamma).

    The pre-activation of a normalized network, used where a Normalizer-Free
    network has its scaled activation when `build_model` or `NFBlock` is given
    a `norm_layer`.

    Args:
        norm_layer: class or str. A `keras.layers.Layer` subclass built with a
            `name` only, e.g. `keras.layers.BatchNormalization`, or its registered
            name. Defaults to `"BatchNormalization"`.
        activation: str. A key of `nfnet_keras.GAMMAS`. Defaults to `"relu"`.

    Example:

    >>> layer = NormActivation(keras.layers.BatchNormalization, "relu")
    >>> layer(keras.ops.ones((2, 4, 4, 8))).shape
    (2, 4, 4, 8)
    """

    def __init__(self, norm_layer="BatchNormalization", activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.norm_layer = resolve_layer_class(norm_layer, keras.layers.Layer, "norm_layer")
        self.activation = check_activation(activation)
        self._fn = ACTIVATIONS[self.activation]

    def build(self, input_shape):
        self.norm = self.norm_layer(name="norm")
        self.norm.build(tuple(input_shape))

    def call(self, inputs, training=None):
        return self._fn(self.norm(inputs, training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            norm_layer=layer_class_name(self.norm_layer, "norm_layer"), activation=self.activation
        )
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

    The convolutions are `conv_layer`s (`WSConv2D` by default, as DeepMind's
    `which_conv`). The block's scalars (`gamma`, `1 / beta`, `alpha * skip_gain`)
    are folded into the kernels of a conv layer whose `call` takes
    `input_scale` and `output_scale` (as `WSConv2D`'s does), and multiply the
    feature maps for any other (e.g. a plain `keras.layers.Conv2D`).

    With a `norm_layer` the block is the normalized twin of the same network:
    each scaled activation becomes `norm_layer -> activation` (a
    `NormActivation`), and the block returns `shortcut + f(h)`, with no
    `1 / beta`, alpha or skip gain (`expected_var`, `alpha` and
    `skip_gain_init` are then unused).

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
        beta: str. `"std"`: divide the input by its expected standard deviation
            (the papers); `"var"`: by its expected variance (the report's code,
            for reproducing it). Defaults to `"std"`.
        shortcut_pool: bool. In a strided transition, average-pool before the
            1x1 shortcut conv (NFNet) instead of striding the conv (ResNet).
            Defaults to `True`.
        use_bias: bool. Whether the convs have biases (NFNet: yes).
            Defaults to `True`.
        conv_layer: class or str. A `keras.layers.Conv2D` subclass, or its
            registered name, for every conv of the block. Defaults to `WSConv2D`.
        norm_layer: class, str or None. `None` for the Normalizer-Free block;
            else a normalization layer class (e.g.
            `keras.layers.BatchNormalization`) or its registered name, for the
            normalized twin. Defaults to `None`.

    Example:

    >>> block = NFBlock(64, expected_var=1.0, transition=True)
    >>> block(keras.ops.ones((1, 8, 8, 16))).shape
    (1, 8, 8, 64)
    >>> round(block.expected_output_var, 2)
    1.04
    >>> twin = NFBlock(64, transition=True, conv_layer=keras.layers.Conv2D,
    ...                norm_layer=keras.layers.BatchNormalization, use_bias=False)
    >>> twin(keras.ops.ones((1, 8, 8, 16))).shape
    (1, 8, 8, 64)
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
        conv_layer=WSConv2D,
        norm_layer=None,
        beta="std",
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
        if beta not in ("std", "var"):
            raise ValueError(f"beta must be 'std' or 'var', got {beta!r}.")
        self.beta_from = beta
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
        self.conv_layer = resolve_layer_class(conv_layer, keras.layers.Conv2D, "conv_layer")
        self.norm_layer = (
            None if norm_layer is None
            else resolve_layer_class(norm_layer, keras.layers.Layer, "norm_layer")
        )
        self.width = bottleneck_width(self.filters, self.bottleneck_ratio)
        if self.width < 1:
            raise ValueError(
                f"Bottleneck width {self.filters} x ratio {self.bottleneck_ratio} rounds to "
                f"{self.width}; it must be at least 1."
            )
        if self.group_width is not None and self.width % self.group_width:
            raise ValueError(
                f"Bottleneck width {self.width} (filters {self.filters} x ratio "
                f"{self.bottleneck_ratio}) is not a multiple of group_width "
                f"{self.group_width}."
            )
        self.groups = 1 if self.group_width is None else self.width // self.group_width
        self._fold = _folds_scales(self.conv_layer)

    @property
    def beta(self):
        """What the block divides its input by: the expected standard deviation (`beta="std"`),
        or the expected variance (`beta="var"`, the report's code)."""
        return math.sqrt(self.expected_var) if self.beta_from == "std" else self.expected_var

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
        policy = self.dtype_policy  # sublayers compute in the block's own policy
        if self.norm_layer is None:
            act = lambda name: ScaledActivation(self.activation, name=name, dtype=policy)
        else:
            act = lambda name: NormActivation(self.norm_layer, self.activation, name=name, dtype=policy)
        conv = lambda filters, kernel_size, name, **kwargs: self.conv_layer(
            filters, kernel_size, use_bias=self.use_bias, kernel_initializer="he_normal",
            name=name, dtype=policy, **kwargs,
        )
        self.act0 = act("act0")
        self.conv0 = conv(self.width, 1, "conv0")
        self.act1 = act("act1")
        self.conv1 = conv(
            self.width, 3, "conv1", strides=self.strides, padding="same", groups=self.groups
        )
        self.act2 = act("act2")
        self.conv1b = conv(self.width, 3, "conv1b", padding="same", groups=self.groups)
        self.act3 = act("act3")
        self.conv2 = conv(self.filters, 1, "conv2")
        h, w = input_shape[1], input_shape[2]
        out_hw = lambda n: None if n is None else -(-n // self.strides)
        inner_shape = (input_shape[0], out_hw(h), out_hw(w), self.width)
        if self.norm_layer is not None:
            self.act0.build(input_shape)
            self.act1.build(input_shape[:3] + (self.width,))
            self.act2.build(inner_shape)
            self.act3.build(inner_shape)
        self.conv0.build(input_shape)
        self.conv1.build(input_shape[:3] + (self.width,))
        self.conv1b.build(inner_shape)
        self.conv2.build(inner_shape)
        self.se = None
        if self.se_ratio > 0:
            self.se = SqueezeExcite(self.se_ratio, self.activation, name="se", dtype=policy)
            self.se.build(inner_shape[:3] + (self.filters,))
        self.drop_path = StochasticDepth(self.stochastic_depth_rate, name="drop_path", dtype=policy)
        self.pool = None
        self.shortcut_conv = None
        if self.transition:
            conv_strides = 1
            if self.strides > 1 and self.shortcut_pool:
                self.pool = keras.layers.AveragePooling2D(
                    self.strides, self.strides, padding="same", name="shortcut_pool", dtype=policy
                )
            else:
                conv_strides = self.strides
            self.shortcut_conv = conv(self.filters, 1, "shortcut_conv", strides=conv_strides)
            self.shortcut_conv.build(
                (inner_shape if self.pool is not None else input_shape)[:3] + (in_channels,)
            )
        self.skip_gain = None
        if self.norm_layer is None:
            self.skip_gain = self.add_weight(
                name="skip_gain",
                shape=(),
                initializer=keras.initializers.Constant(self.skip_gain_init),
                trainable=True,
            )

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

        Args:
            input_shape: tuple of 3 ints. `(height, width, channels)`, no batch axis.

        Returns:
            `(macs, output_shape)`, the output shape as `(height, width, filters)`.

        Raises:
            ValueError: if the block is not built.
        """
        if not self.built:
            raise ValueError(f"NFBlock {self.name!r} must be built before counting its MACs.")
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

    def _conv(self, conv, inputs, input_scale=None, output_scale=None):
        """`conv(inputs * input_scale) * output_scale`, the scales folded where the conv can."""
        if self._fold:
            return conv(inputs, input_scale=input_scale, output_scale=output_scale)
        if input_scale is not None:
            inputs = inputs * ops.cast(input_scale, inputs.dtype)
        outputs = conv(inputs)
        if output_scale is not None:
            outputs = outputs * ops.cast(output_scale, outputs.dtype)
        return outputs

    def _activate(self, act, inputs, training=None):
        """(activation without its scale, the scale still to apply: gamma, or None)."""
        if self.norm_layer is None:
            return act.unscaled(inputs), act.gamma
        return act(inputs, training=training), None

    def _scaled_input(self, inputs):
        """`act(x) * gamma / beta`, as an explicit tensor (for inspection and tests)."""
        if self.norm_layer is not None:
            return self.act0(inputs)
        return self.act0(inputs) * ops.cast(1.0 / self.beta, inputs.dtype)

    def _input_scale(self):
        return None if self.norm_layer is not None else self.act0.gamma / self.beta

    def _shortcut(self, inputs, a):
        """The shortcut; `a` is the block's activated input, before `_input_scale`."""
        if not self.transition:
            return inputs
        if self.pool is not None:
            a = self.pool(a)  # linear: pooling then scaling is scaling then pooling
        return self._conv(self.shortcut_conv, a, input_scale=self._input_scale())

    def _branch(self, a, output_scale=None, training=None):
        """`f(a * gamma / beta) * output_scale` from the activated input `a` (before its scale).

        Every scalar of the block (each activation's gamma, `1 / beta`, and the
        output scale) is multiplied into the next conv's kernel rather than
        into the feature maps: same function, fewer passes over memory.
        """
        out = self._conv(self.conv0, a, input_scale=self._input_scale())
        for act, conv in ((self.act1, self.conv1), (self.act2, self.conv1b)):
            out, scale = self._activate(act, out, training)
            out = self._conv(conv, out, input_scale=scale)
        out, scale = self._activate(self.act3, out, training)
        out = self._conv(self.conv2, out, input_scale=scale, output_scale=output_scale)
        if self.se is not None:
            out = self.se(out)
        return out

    def residual_branch(self, inputs):
        """Returns `f(act(x) * gamma / beta)`, before skip gain and alpha (inference mode)."""
        return self._branch(self._activate(self.act0, inputs, training=False)[0], training=False)

    def call(self, inputs, training=None):
        a, _ = self._activate(self.act0, inputs, training)
        shortcut = self._shortcut(inputs, a)
        if self.norm_layer is not None:  # the normalized twin: no alpha, no skip gain
            out = self.drop_path(self._branch(a, training=training), training=training)
            return shortcut + out
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
            beta=self.beta_from,
            conv_layer=layer_class_name(self.conv_layer, "conv_layer"),
            norm_layer=(
                None if self.norm_layer is None else layer_class_name(self.norm_layer, "norm_layer")
            ),
        )
        return config
