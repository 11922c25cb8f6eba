"""`build_model`: a preset (plus overrides) -> a Functional Keras NF-ResNet."""

import keras

from nfnet_keras.activations import ScaledActivation, check_activation
from nfnet_keras.blocks import NFBlock
from nfnet_keras.presets import get_preset
from nfnet_keras.wsconv import WSConv2D


def resolve_config(preset, overrides=None):
    """Returns the preset's config with `overrides` applied and every value checked.

    Raises:
        ValueError: on an unknown preset, an unknown override key, or a bad value;
            the message names the allowed values.
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
    for key in ("stem_widths", "stem_strides", "widths", "depths", "strides"):
        value = config[key]
        if isinstance(value, int):
            value = (value,)
        if not (
            isinstance(value, (tuple, list))
            and value
            and all(isinstance(v, int) and v > 0 for v in value)
        ):
            raise ValueError(f"{key} must be a non-empty sequence of positive ints, got {value!r}.")
        config[key] = tuple(value)
    if len(config["stem_widths"]) != len(config["stem_strides"]):
        raise ValueError("stem_widths and stem_strides must have the same length.")
    if not len(config["widths"]) == len(config["depths"]) == len(config["strides"]):
        raise ValueError("widths, depths and strides must have the same length (one per stage).")
    if any(s not in (1, 2) for s in config["strides"] + config["stem_strides"]):
        raise ValueError("strides and stem_strides must be 1 or 2.")
    check_activation(config["activation"])
    if not config["alpha"] > 0:
        raise ValueError(f"alpha must be > 0, got {config['alpha']!r}.")
    for key in ("se_ratio", "bottleneck_ratio"):
        if not 0 <= config[key] <= 1:
            raise ValueError(f"{key} must be in [0, 1], got {config[key]!r}.")
    for key in ("stochastic_depth_rate", "dropout"):
        if not 0 <= config[key] < 1:
            raise ValueError(f"{key} must be in [0, 1), got {config[key]!r}.")
    return config


def build_model(preset="seed", num_classes=10, input_shape=(32, 32, 3), **overrides):
    """Builds a Normalizer-Free ResNet from a preset.

    The model takes normalised float images (see `nfnet_keras.preprocess`) and
    returns logits. Layers are named `stem_conv1`, `stage2_block3`, ...,
    `classifier`; the classifier is initialised N(0, 0.01).

    Args:
        preset: str. A key of `nfnet_keras.PRESETS`. Defaults to `"seed"`.
        num_classes: int. Number of classes. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)`; height and
            width may be `None`. Defaults to `(32, 32, 3)`.
        **overrides: preset keys to replace, e.g. `depths=(2, 2, 2)`.

    Returns:
        A `keras.Model` named after the preset.

    Example:

    >>> model = build_model("tiny")
    >>> model.output_shape
    (None, 10)
    """
    config = resolve_config(preset, overrides)
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")

    # === Layers and Functional Model ===
    act = config["activation"]
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, (width, stride) in enumerate(zip(config["stem_widths"], config["stem_strides"])):
        if i:
            x = ScaledActivation(act, name=f"stem_act{i}")(x)
        x = WSConv2D(
            width, 3, strides=stride, padding="same", use_bias=config["conv_bias"], name=f"stem_conv{i + 1}"
        )(x)

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
                name=f"stage{stage + 1}_block{j + 1}",
            )
            x = block(x)
            expected_var = block.expected_output_var
            index += 1

    if config["final_conv_multiplier"]:
        x = WSConv2D(
            int(config["widths"][-1] * config["final_conv_multiplier"]),
            1,
            use_bias=config["conv_bias"],
            name="final_conv",
        )(x)
    if config["head_activation"]:
        x = ScaledActivation(act, name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if config["dropout"]:
        x = keras.layers.Dropout(config["dropout"], name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        dtype="float32",  # logits in float32 under a mixed-precision policy
        name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=preset)


def nf_blocks(model):
    """Returns the model's NFBlocks in order."""
    return [layer for layer in model.layers if isinstance(layer, NFBlock)]
