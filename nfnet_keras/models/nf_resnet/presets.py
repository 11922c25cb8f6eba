"""The NF-ResNet family's presets: a typed config, validated once, and the named variants as data.

The family's rules live here, each checked in one place that the blocks call
too. Imports no Keras: a command checks its flags before loading the framework.
"""

import dataclasses

from nfnet_keras.layers.gammas import check_activation
from nfnet_keras.models import config_checks as checks
from nfnet_keras.models import stages

# What an NFBlock divides its input by: the expected standard deviation (the papers) or the
# expected variance (the report's code, kept to reproduce it).
BETAS = ("std", "var")


def bottleneck_width(filters, bottleneck_ratio):
    """The channels of a block's 3x3 convs: `filters * bottleneck_ratio`, rounded."""
    return int(round(filters * bottleneck_ratio))


def check_bottleneck(filters, bottleneck_ratio, group_width, where=""):
    """Checks that a bottleneck's 3x3 width is >= 1 and a multiple of `group_width`; returns it.

    The one check of this rule: the blocks and the presets both call it.

    Args:
        filters: int. The block's output channels.
        bottleneck_ratio: float. The 3x3 width as a fraction of `filters`.
        group_width: int or None. Channels per group of the 3x3 convs.
        where: str. What the message names (e.g. `" of stage 2"`).

    Raises:
        ValueError: one line naming the width, the ratio and the group width.
    """
    width = bottleneck_width(filters, bottleneck_ratio)
    if width < 1:
        raise ValueError(
            f"bottleneck_ratio {bottleneck_ratio!r} rounds the 3x3 conv width{where} "
            f"({filters} x {bottleneck_ratio!r}) to {width}; it must give at least 1 channel."
        )
    if group_width is not None and width % group_width:
        raise ValueError(
            f"group_width {group_width!r} does not divide the 3x3 conv width {width}{where} "
            f"({filters} x bottleneck_ratio {bottleneck_ratio!r}); use None or a divisor of "
            + ("every stage's 3x3 conv width." if where else f"{width}.")
        )
    return width


def check_beta(beta):
    """Checks an NFBlock's `beta` (a key of `BETAS`); returns it."""
    if beta not in BETAS:
        raise ValueError(f"beta must be one of {', '.join(map(repr, BETAS))}, got {beta!r}.")
    return beta


@dataclasses.dataclass(frozen=True)
class NFResNetConfig:
    """An NF-ResNet: a stem of 3x3 convs, stages of bottleneck blocks, a pooled linear head.

    Every value is checked when the config is made (and when `replace` makes
    another), each rule in one place.

    Attributes:
        stem_widths / stem_strides: the 3x3 WS convs of the stem (a scaled
            activation between consecutive ones).
        widths / depths / strides: per stage, the output channels, the number of
            blocks, and the stride of the stage's first (transition) block.
        bottleneck_ratio: width of a block's 3x3 convs as a fraction of its output.
        group_width: channels per group of the 3x3 convs (None: ungrouped).
        activation: a key of `nfnet_keras.GAMMAS`.
        alpha: the residual-branch scale.
        se_ratio: Squeeze-Excite hidden ratio (0: none).
        se_activation: the Squeeze-Excite's hidden activation, a key of
            `nfnet_keras.GAMMAS` (None: `activation`). NFNet-F: "relu", as
            DeepMind's and timm's plain ReLU (its gamma is a reparametrization
            the converter folds into the excite kernel).
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
    """

    stem_widths: tuple = (16,)
    stem_strides: tuple = (1,)
    widths: tuple = (64, 128, 256)
    depths: tuple = (5, 5, 5)
    strides: tuple = (1, 2, 2)
    bottleneck_ratio: float = 0.25
    group_width: int | None = None
    activation: str = "relu"
    alpha: float = 0.2
    se_ratio: float = 0.0
    se_activation: str | None = None
    stochastic_depth_rate: float = 0.0
    final_conv_multiplier: float = 0
    head_activation: bool = True
    shortcut_pool: bool = False
    conv_bias: bool = True
    dropout: float = 0.0
    skip_gain_init: float = 0.0
    beta: str = "std"

    def __post_init__(self):
        set_ = lambda key, value: object.__setattr__(self, key, value)
        # === One key at a time ===
        for key in ("stem_widths", "stem_strides", "widths", "depths", "strides"):
            set_(key, checks.positive_ints(key, getattr(self, key)))
        for key in ("strides", "stem_strides"):
            checks.positive_ints(key, getattr(self, key), allowed=(1, 2))
        for key in ("head_activation", "shortcut_pool", "conv_bias"):
            checks.boolean(key, getattr(self, key))
        check_activation(self.activation)
        if self.se_activation is not None:
            check_activation(self.se_activation)
        checks.number("alpha", self.alpha, lambda v: v > 0, "> 0")
        checks.number("bottleneck_ratio", self.bottleneck_ratio, lambda v: 0 < v <= 1, "in (0, 1]")
        checks.number("se_ratio", self.se_ratio, lambda v: 0 <= v <= 1, "in [0, 1] (0: no Squeeze-Excite)")
        checks.number("stochastic_depth_rate", self.stochastic_depth_rate, lambda v: 0 <= v < 1, "in [0, 1)")
        checks.number("dropout", self.dropout, lambda v: 0 <= v < 1, "in [0, 1)")
        checks.number("final_conv_multiplier", self.final_conv_multiplier, lambda v: v >= 0,
                      ">= 0 (0: no final conv)")
        checks.number("skip_gain_init", self.skip_gain_init, lambda v: v >= 0, ">= 0 (0: SkipInit)")
        check_beta(self.beta)
        if self.group_width is not None and not (checks.is_int(self.group_width) and self.group_width > 0):
            raise ValueError(f"group_width must be a positive int or None, got {self.group_width!r}.")

        # === Keys that must agree ===
        if len(self.stem_widths) != len(self.stem_strides):
            raise ValueError(
                "stem_widths and stem_strides must have the same length (one per stem conv), got "
                f"stem_widths {self.stem_widths!r} and stem_strides {self.stem_strides!r}."
            )
        if not len(self.widths) == len(self.depths) == len(self.strides):
            raise ValueError(
                "widths, depths and strides must have the same length (one per stage), got "
                f"widths {self.widths!r}, depths {self.depths!r} and strides {self.strides!r}."
            )
        for stage, filters in enumerate(self.widths, start=1):
            check_bottleneck(filters, self.bottleneck_ratio, self.group_width, where=f" of stage {stage}")
        if self.final_conv_multiplier and self.final_conv_width < 1:
            raise ValueError(
                f"final_conv_multiplier {self.final_conv_multiplier!r} gives the final conv "
                f"{self.final_conv_width} channels ({self.widths[-1]} x {self.final_conv_multiplier!r}); "
                "use 0 (no final conv) or a value giving at least 1."
            )

    @property
    def final_conv_width(self):
        """Output channels of the final 1x1 conv (0: none)."""
        return int(self.widths[-1] * self.final_conv_multiplier)

    @property
    def stage_names(self):
        """`stem`, `stage1` ... `stage{N}`, and `final` where the body has a final conv or activation."""
        return stages.names(len(self.widths), final=bool(self.final_conv_multiplier or self.head_activation))


_CIFAR = NFResNetConfig()

PRESETS = {
    # The report's network: stem 3x3 -> 16, three stages of five bottleneck
    # blocks with outputs 64/128/256 and strides 1/2/2, ReLU, no SE.
    "report_resnet": _CIFAR,
    # A stronger CIFAR net: wider, GELU, Squeeze-Excite, stochastic depth.
    "cifar_wide": dataclasses.replace(
        _CIFAR, stem_widths=(32,), widths=(128, 256, 512), depths=(3, 4, 3), bottleneck_ratio=0.5,
        activation="gelu", se_ratio=0.25, stochastic_depth_rate=0.1, dropout=0.2,
    ),
    # Two one-block stages: for tests and smoke runs, compiles in seconds.
    "tiny": dataclasses.replace(_CIFAR, stem_widths=(8,), widths=(16, 32), depths=(1, 1), strides=(1, 2)),
    # A tiny net with every optional part: grouped 3x3 convs, SE, stochastic
    # depth, a final conv, dropout. For tests of those paths.
    "tiny_grouped": dataclasses.replace(
        _CIFAR, stem_widths=(8, 16), stem_strides=(1, 1), widths=(32, 64), depths=(1, 2), strides=(1, 2),
        bottleneck_ratio=0.5, group_width=8, activation="gelu", se_ratio=0.5, stochastic_depth_rate=0.1,
        final_conv_multiplier=2, shortcut_pool=True, dropout=0.2,
    ),
}

# NFNet-F0 ... F6 (Brock et al. 2021, arXiv 2102.06171): depths (1, 2, 6, 3) x k, dropout 0.2 ... 0.5.
# The function of timm's dm_nfnet_f0 ... f6 (DeepMind's weights): the exact (erf) GELU, a plain-ReLU
# Squeeze-Excite; `nfnet_keras.models.nf_resnet.convert` maps their state dicts (docs/model.md,
# "NFNet-F parity with DeepMind's models", lists every difference and how it is resolved).
for _k, _dropout in enumerate((0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5)):
    PRESETS[f"nfnet_f{_k}"] = NFResNetConfig(
        stem_widths=(16, 32, 64, 128), stem_strides=(2, 1, 1, 2), widths=(256, 512, 1536, 1536),
        depths=tuple(d * (_k + 1) for d in (1, 2, 6, 3)), strides=(1, 2, 2, 2), bottleneck_ratio=0.5,
        group_width=128, activation="gelu_exact", alpha=0.2, se_ratio=0.5, se_activation="relu",
        stochastic_depth_rate=0.1,
        final_conv_multiplier=2, head_activation=True, shortcut_pool=True, conv_bias=True, dropout=_dropout,
        skip_gain_init=0.0, beta="std",
    )
