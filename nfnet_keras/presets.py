"""Model variants as plain data. `build_model(preset, **overrides)` reads them.

`PRESETS` maps each canonical name to its keys; `PRESET_ALIASES` maps other
names to canonical ones (`"seed"` -> `"report_resnet"`), and
`canonical_preset(name)` resolves either.

Keys:
    stem_widths / stem_strides: the 3x3 WS convs of the stem (a scaled
        activation between consecutive ones).
    widths / depths / strides: per stage, the output channels, the number of
        NFBlocks, and the stride of the stage's first (transition) block.
    bottleneck_ratio: width of a block's 3x3 convs as a fraction of its output.
    group_width: channels per group of the 3x3 convs (None: ungrouped).
    activation: a key of `nfnet_keras.GAMMAS`.
    alpha: the residual-branch scale.
    se_ratio: Squeeze-Excite hidden ratio (0: none).
    stochastic_depth_rate: drop rate of the last block; it grows linearly
        with the block index from 0.
    final_conv_multiplier: a 1x1 WS conv to `multiplier * widths[-1]` channels
        before the head (0: none).
    head_activation: whether the scaled activation is applied before pooling.
    shortcut_pool: strided transitions average-pool before their 1x1 shortcut
        conv (NFNet) rather than striding the conv (the report's ResNet).
    conv_bias: whether the WS convs have biases (NFNet: yes).
    dropout: dropout rate before the classifier.
    skip_gain_init: the initial value of each block's scalar skip gain
        (0: SkipInit, every residual branch starts switched off).
    beta: what a block divides its input by: "std", the expected standard
        deviation (the papers), or "var", the expected variance (the
        report's code; kept for the experiment that reproduces it).

The `conv_groups` presets (`architecture="conv_groups"`, `nfnet_keras.speed`)
are a different network, the shape of the CIFAR-10 speed runs, with keys:
    whitening_patch / whitening_epsilon: the `PatchWhitening` stem.
    widths: output channels of the three (or more) conv-pool groups.
    activation, conv_bias, dropout: as above.
    logit_scale: the logits are the classifier's output times this.
"""

import copy

_NFNET_F_DROPOUT = (0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5)
# (train, test) image sizes of the paper's NFNet-F variants (2102.06171, Table 6).
NFNET_F_RESOLUTIONS = ((192, 256), (224, 320), (256, 352), (320, 416), (384, 512), (416, 544), (448, 576))

_CIFAR_BASE = dict(
    stem_widths=(16,),
    stem_strides=(1,),
    widths=(64, 128, 256),
    depths=(5, 5, 5),
    strides=(1, 2, 2),
    bottleneck_ratio=0.25,
    group_width=None,
    activation="relu",
    alpha=0.2,
    se_ratio=0.0,
    stochastic_depth_rate=0.0,
    final_conv_multiplier=0,
    head_activation=True,
    shortcut_pool=False,
    conv_bias=True,
    dropout=0.0,
    skip_gain_init=0.0,
    beta="std",
)

PRESETS = {
    # The report's network: stem 3x3 -> 16, three stages of five bottleneck
    # blocks with outputs 64/128/256 and strides 1/2/2, ReLU, no SE.
    "report_resnet": dict(_CIFAR_BASE),
    # A stronger CIFAR net: wider, GELU, Squeeze-Excite, stochastic depth.
    "cifar_wide": dict(
        _CIFAR_BASE,
        stem_widths=(32,),
        widths=(128, 256, 512),
        depths=(3, 4, 3),
        bottleneck_ratio=0.5,
        activation="gelu",
        se_ratio=0.25,
        stochastic_depth_rate=0.1,
        dropout=0.2,
    ),
    # Two one-block stages: for tests and smoke runs, compiles in seconds.
    "tiny": dict(_CIFAR_BASE, stem_widths=(8,), widths=(16, 32), depths=(1, 1), strides=(1, 2)),
    # A tiny net with every optional part: grouped 3x3 convs, SE, stochastic
    # depth, a final conv, dropout. For tests of those paths.
    "tiny_grouped": dict(
        _CIFAR_BASE,
        stem_widths=(8, 16),
        stem_strides=(1, 1),
        widths=(32, 64),
        depths=(1, 2),
        strides=(1, 2),
        bottleneck_ratio=0.5,
        group_width=8,
        activation="gelu",
        se_ratio=0.5,
        stochastic_depth_rate=0.1,
        final_conv_multiplier=2,
        shortcut_pool=True,
        dropout=0.2,
    ),
}

# NFNet-F0 ... F6 (Brock et al. 2021, arXiv 2102.06171): depths (1, 2, 6, 3) x k.
for _k, _dropout in enumerate(_NFNET_F_DROPOUT):
    PRESETS[f"nfnet_f{_k}"] = dict(
        stem_widths=(16, 32, 64, 128),
        stem_strides=(2, 1, 1, 2),
        widths=(256, 512, 1536, 1536),
        depths=tuple(d * (_k + 1) for d in (1, 2, 6, 3)),
        strides=(1, 2, 2, 2),
        bottleneck_ratio=0.5,
        group_width=128,
        activation="gelu",
        alpha=0.2,
        se_ratio=0.5,
        stochastic_depth_rate=0.1,
        final_conv_multiplier=2,
        head_activation=True,
        shortcut_pool=True,
        conv_bias=True,
        dropout=_dropout,
        skip_gain_init=0.0,
        beta="std",
    )


# The CIFAR speed network (nfnet_keras.speed): a 2x2 patch-whitening stem (24 channels),
# three conv-pool groups, no residuals, logits x 1/9. The size of airbench94 (widths 64/256/256)
# and of airbench95 (128/384/384).
_CONV_GROUPS = dict(
    architecture="conv_groups",
    whitening_patch=2,
    whitening_epsilon=5e-4,
    widths=(64, 256, 256),
    activation="gelu",
    conv_bias=True,
    dropout=0.0,
    logit_scale=1 / 9,
)
PRESETS["cifar_speed"] = dict(_CONV_GROUPS)
PRESETS["cifar_speed_wide"] = dict(_CONV_GROUPS, widths=(128, 384, 384))
PRESETS["tiny_speed"] = dict(_CONV_GROUPS, widths=(8, 16, 16))  # for tests


def architecture(config):
    """The network family of a preset config: `"resnet"` (`NFBlock`s) or `"conv_groups"`."""
    return config.get("architecture", "resnet")


# Other names a preset answers to: alias -> canonical name.
PRESET_ALIASES = {"seed": "report_resnet"}


def canonical_preset(name):
    """Returns the canonical name of preset `name` (itself, or what its alias stands for).

    Args:
        name: str. A key of `PRESETS` or of `PRESET_ALIASES`.

    Returns:
        The key of `PRESETS` that `name` names.

    Raises:
        ValueError: if `name` is neither; the message lists the presets and the aliases.

    Example:

    >>> canonical_preset("seed")
    'report_resnet'
    """
    if isinstance(name, str):
        name = PRESET_ALIASES.get(name, name)
        if name in PRESETS:
            return name
    aliases = ", ".join(f"{alias!r} for {target!r}" for alias, target in PRESET_ALIASES.items())
    raise ValueError(
        f"Unknown preset {name!r}. Use one of: {', '.join(PRESETS)} (aliases: {aliases})."
    )


def get_preset(name):
    """Returns a deep copy of preset `name` (an alias gives its canonical preset).

    Raises:
        ValueError: on an unknown name; the message lists the presets and the aliases.
    """
    return copy.deepcopy(PRESETS[canonical_preset(name)])
