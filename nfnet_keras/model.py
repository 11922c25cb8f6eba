"""`build_model`: a preset (plus overrides) -> a Functional Keras NF-ResNet."""

import math
import numbers

import keras

from nfnet_keras.activations import GAMMAS, ScaledActivation
from nfnet_keras.blocks import NFBlock, NormActivation, bottleneck_width, resolve_layer_class
from nfnet_keras.presets import architecture, canonical_preset, get_preset
from nfnet_keras.speed import ConvGroup, build_conv_groups_model
from nfnet_keras.wsconv import WSConv2D

_SEQUENCE_KEYS = ("stem_widths", "stem_strides", "widths", "depths", "strides")
_BOOL_KEYS = ("head_activation", "shortcut_pool", "conv_bias")
# Numeric keys: (whether a value is allowed, the allowed values in words).
_NUMBER_KEYS = {
    "alpha": (lambda v: v > 0, "> 0"),
    "bottleneck_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "se_ratio": (lambda v: 0 <= v <= 1, "in [0, 1] (0: no Squeeze-Excite)"),
    "stochastic_depth_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "final_conv_multiplier": (lambda v: v >= 0, ">= 0 (0: no final conv)"),
    "skip_gain_init": (lambda v: v >= 0, ">= 0 (0: SkipInit)"),
}
_CONV_GROUPS_NUMBER_KEYS = {
    "whitening_epsilon": (lambda v: v > 0, "> 0"),
    "logit_scale": (lambda v: v > 0, "> 0"),
    "dropout": _NUMBER_KEYS["dropout"],
}
BETAS = ("std", "var")
# `build_model` arguments that give a network's BatchNorm twin: BatchNorm -> activation where the
# Normalizer-Free network has its scaled activations, plain convolutions without biases.
BATCHNORM_TWIN = dict(conv_layer=keras.layers.Conv2D, norm_layer=keras.layers.BatchNormalization, conv_bias=False)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_scalar_keys(config, bool_keys, number_keys):
    """Checks the activation, the `bool_keys` and the `number_keys` ({key: (allowed, in words)}) of `config`."""
    for key in bool_keys:
        if not isinstance(config[key], bool):
            raise ValueError(f"{key} must be True or False, got {config[key]!r}.")
    activation = config["activation"]
    if not (isinstance(activation, str) and activation in GAMMAS):
        raise ValueError(f"Unknown activation {activation!r}. Use one of: {', '.join(sorted(GAMMAS))}.")
    for key, (allowed, in_words) in number_keys.items():
        if not (_is_number(config[key]) and allowed(config[key])):
            raise ValueError(f"{key} must be a number {in_words}, got {config[key]!r}.")


def _final_conv_width(config):
    """Output channels of the final 1x1 conv (0: none)."""
    return int(config["widths"][-1] * config["final_conv_multiplier"])


def resolve_config(preset, overrides=None):
    """Returns the preset's config with `overrides` applied and every value checked.

    Every key is checked here, once: its type, its range, and what it must
    agree with (one width, depth and stride per stage; a bottleneck width of
    at least 1 and a multiple of `group_width` in every stage).

    Args:
        preset: str. A key of `nfnet_keras.PRESETS` or an alias (`PRESET_ALIASES`).
        overrides: dict or None. Preset keys to replace.

    Returns:
        A dict of every preset key; sequences as tuples.

    Raises:
        ValueError: on an unknown preset, an unknown override key, or a bad value;
            the one-line message names the key, the value and what is allowed.
    """
    config = get_preset(preset)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(
            f"Unknown override(s) {', '.join(map(repr, unknown))} for preset {preset!r}. "
            f"Allowed: {', '.join(sorted(config))}."
        )
    config.update(overrides)
    if architecture(config) == "conv_groups":
        return _resolve_conv_groups(config)

    # === One key at a time ===
    for key in _SEQUENCE_KEYS:
        value = config[key]
        if _is_int(value):
            value = (value,)
        if not (isinstance(value, (tuple, list)) and value and all(_is_int(v) and v > 0 for v in value)):
            raise ValueError(f"{key} must be a non-empty sequence of positive ints, got {config[key]!r}.")
        config[key] = tuple(int(v) for v in value)
    for key in ("strides", "stem_strides"):
        if any(s not in (1, 2) for s in config[key]):
            raise ValueError(f"{key} must be 1 or 2 each, got {config[key]!r}.")
    _check_scalar_keys(config, _BOOL_KEYS, _NUMBER_KEYS)
    if config["beta"] not in BETAS:
        raise ValueError(f"beta must be one of {', '.join(map(repr, BETAS))}, got {config['beta']!r}.")
    group_width = config["group_width"]
    if group_width is not None and not (_is_int(group_width) and group_width > 0):
        raise ValueError(f"group_width must be a positive int or None, got {group_width!r}.")

    # === Keys that must agree ===
    if len(config["stem_widths"]) != len(config["stem_strides"]):
        raise ValueError(
            "stem_widths and stem_strides must have the same length (one per stem conv), got "
            f"stem_widths {config['stem_widths']!r} and stem_strides {config['stem_strides']!r}."
        )
    if not len(config["widths"]) == len(config["depths"]) == len(config["strides"]):
        raise ValueError(
            "widths, depths and strides must have the same length (one per stage), got "
            f"widths {config['widths']!r}, depths {config['depths']!r} and strides {config['strides']!r}."
        )
    ratio = config["bottleneck_ratio"]
    for stage, filters in enumerate(config["widths"], start=1):
        width = bottleneck_width(filters, ratio)
        if width < 1:
            raise ValueError(
                f"bottleneck_ratio {ratio!r} rounds the 3x3 conv width of stage {stage} "
                f"({filters} x {ratio!r}) to {width}; it must give at least 1 channel."
            )
        if group_width is not None and width % group_width:
            raise ValueError(
                f"group_width {group_width!r} does not divide the 3x3 conv width {width} of stage "
                f"{stage} ({filters} x bottleneck_ratio {ratio!r}); use None or a divisor of "
                "every stage's 3x3 conv width."
            )
    if config["final_conv_multiplier"] and _final_conv_width(config) < 1:
        raise ValueError(
            f"final_conv_multiplier {config['final_conv_multiplier']!r} gives the final conv "
            f"{_final_conv_width(config)} channels ({config['widths'][-1]} x "
            f"{config['final_conv_multiplier']!r}); use 0 (no final conv) or a value giving at least 1."
        )
    return config


def _resolve_conv_groups(config):
    value = config["widths"]
    if not (isinstance(value, (tuple, list)) and value and all(_is_int(v) and v > 0 for v in value)):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {value!r}.")
    config["widths"] = tuple(int(v) for v in value)
    if not (_is_int(config["whitening_patch"]) and 1 <= config["whitening_patch"] <= 4):
        raise ValueError(f"whitening_patch must be an int in [1, 4], got {config['whitening_patch']!r}.")
    _check_scalar_keys(config, ("conv_bias",), _CONV_GROUPS_NUMBER_KEYS)
    return config


def build_model(
    preset="report_resnet",
    num_classes=10,
    input_shape=(32, 32, 3),
    *,
    conv_layer=WSConv2D,
    norm_layer=None,
    name=None,
    **overrides,
):
    """Builds a Normalizer-Free ResNet from a preset.

    The model takes normalised float images (see `nfnet_keras.preprocess`) and
    returns logits. Layers are named `stem_conv1`, `stage2_block3`, ...,
    `classifier`; the classifier is initialised N(0, 0.01).

    The layer classes it is made of are arguments, so that a twin of the same
    network is one argument away: `conv_layer=keras.layers.Conv2D` gives the
    network without weight standardization, and
    `norm_layer=keras.layers.BatchNormalization` (with `conv_layer=keras.layers.Conv2D`,
    `conv_bias=False`) the BatchNorm pre-activation ResNet of the same
    convolutions: each scaled activation becomes `BatchNorm -> activation`
    (`NormActivation`), and the blocks have no alpha, `1 / beta` or skip gain.

    Args:
        preset: str. A key of `nfnet_keras.PRESETS`, or an alias of one
            (`PRESET_ALIASES`, e.g. `"seed"`). Defaults to `"report_resnet"`.
        num_classes: int. Number of classes. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)`; height and
            width may be `None`. Defaults to `(32, 32, 3)`.
        conv_layer: class or str. A `keras.layers.Conv2D` subclass (or its
            registered name) for every convolution. Defaults to `WSConv2D`.
        norm_layer: class, str or None. `None` for the Normalizer-Free network;
            a normalization layer class (or its registered name) for the
            normalized twin. Defaults to `None`.
        name: str or None. The model's name. Defaults to the canonical preset name.
        **overrides: preset keys to replace, e.g. `depths=(2, 2, 2)`.

    Returns:
        A `keras.Model`.

    Example:

    >>> model = build_model("tiny")
    >>> model.output_shape
    (None, 10)
    >>> bn_twin = build_model("tiny", conv_layer=keras.layers.Conv2D,
    ...                       norm_layer=keras.layers.BatchNormalization, conv_bias=False)
    """
    preset = canonical_preset(preset)
    config = resolve_config(preset, overrides)
    if not (_is_int(num_classes) and num_classes > 0):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
    conv_layer = resolve_layer_class(conv_layer, keras.layers.Conv2D, "conv_layer")
    if norm_layer is not None:
        norm_layer = resolve_layer_class(norm_layer, keras.layers.Layer, "norm_layer")

    if architecture(config) == "conv_groups":
        return build_conv_groups_model(config, num_classes, input_shape, conv_layer, norm_layer,
                                       preset if name is None else name)

    # === Layers ===
    act = config["activation"]

    def activation(layer_name):
        if norm_layer is None:
            return ScaledActivation(act, name=layer_name)
        return NormActivation(norm_layer, act, name=layer_name)

    def conv(filters, kernel_size, layer_name, **kwargs):
        return conv_layer(
            filters, kernel_size, use_bias=config["conv_bias"], kernel_initializer="he_normal",
            name=layer_name, **kwargs,
        )

    # === Functional Model ===
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, (width, stride) in enumerate(zip(config["stem_widths"], config["stem_strides"])):
        if i:
            x = activation(f"stem_act{i}")(x)
        x = conv(width, 3, f"stem_conv{i + 1}", strides=stride, padding="same")(x)

    expected_var = 1.0  # the stem's output has unit variance for unit-variance input
    total_blocks = sum(config["depths"])
    index = 0
    for stage, (width, depth, stride) in enumerate(
        zip(config["widths"], config["depths"], config["strides"])
    ):
        for j in range(depth):
            block = NFBlock(
                width,
                expected_var=expected_var,
                alpha=config["alpha"],
                strides=stride if j == 0 else 1,
                transition=j == 0,
                bottleneck_ratio=config["bottleneck_ratio"],
                group_width=config["group_width"],
                activation=act,
                se_ratio=config["se_ratio"],
                stochastic_depth_rate=config["stochastic_depth_rate"] * index / total_blocks,
                shortcut_pool=config["shortcut_pool"],
                use_bias=config["conv_bias"],
                skip_gain_init=config["skip_gain_init"],
                beta=config["beta"],
                conv_layer=conv_layer,
                norm_layer=norm_layer,
                name=f"stage{stage + 1}_block{j + 1}",
            )
            x = block(x)
            expected_var = block.expected_output_var
            index += 1

    if config["final_conv_multiplier"]:
        x = conv(_final_conv_width(config), 1, "final_conv")(x)
    if config["head_activation"]:
        x = activation("final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if config["dropout"]:
        x = keras.layers.Dropout(config["dropout"], name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        dtype="float32",  # logits in float32 under a mixed-precision policy
        name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=preset if name is None else name)


def nf_blocks(model):
    """Returns the model's blocks in order: its NFBlocks, or the ConvGroups of a speed network."""
    return [layer for layer in model.layers if isinstance(layer, (NFBlock, ConvGroup))]


def adapt_model(model, images):
    """Adapts every layer of `model` that has an `adapt` method (the whitening stem) to `images`.

    Args:
        model: keras.Model.
        images: float array `(n, h, w, c)` of preprocessed training images.

    Returns:
        The names of the layers adapted.
    """
    adapted = []
    for layer in model.layers:
        if callable(getattr(layer, "adapt", None)):
            layer.adapt(images)
            adapted.append(layer.name)
    return adapted


def model_convs(model):
    """Returns every convolution of the model in order, those inside its NFBlocks included."""
    convs = []
    for layer in model.layers:
        if isinstance(layer, (NFBlock, ConvGroup)):
            convs += layer.conv_sublayers()
        elif isinstance(layer, keras.layers.Conv2D):
            convs.append(layer)
    return convs
