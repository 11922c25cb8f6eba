"""The speed network's presets: a typed config, validated once, and the named variants as data. Imports no Keras."""

import dataclasses

from nfnet_keras.layers.gammas import check_activation
from nfnet_keras.models import config_checks as checks
from nfnet_keras.models import stages


@dataclasses.dataclass(frozen=True)
class ConvGroupsConfig:
    """The CIFAR speed network: a patch-whitening stem, conv-pool groups, a max-pooled linear head.

    Every value is checked when the config is made (and when `dataclasses.replace`
    makes another).

    Attributes:
        whitening_patch / whitening_epsilon: the `PatchWhitening` stem.
        widths: output channels of the conv-pool groups.
        activation: a key of `nfnet_keras.GAMMAS`.
        conv_bias: whether the convs have biases.
        center_filters: whether the WS convs subtract each filter's mean; False:
            unit-norm filters only (`WSConv2D(center=False)`). The network
            without normalization only.
        dropout: dropout rate before the classifier.
        logit_scale: the logits are the classifier's output times this.
    """

    whitening_patch: int = 2
    whitening_epsilon: float = 5e-4
    widths: tuple = (64, 256, 256)
    activation: str = "gelu"
    conv_bias: bool = True
    center_filters: bool = True
    dropout: float = 0.0
    logit_scale: float = 1 / 9

    def __post_init__(self):
        object.__setattr__(self, "widths", checks.positive_ints("widths", self.widths))
        if not (checks.is_int(self.whitening_patch) and 1 <= self.whitening_patch <= 4):
            raise ValueError(f"whitening_patch must be an int in [1, 4], got {self.whitening_patch!r}.")
        checks.boolean("conv_bias", self.conv_bias)
        checks.boolean("center_filters", self.center_filters)
        check_activation(self.activation)
        checks.number("whitening_epsilon", self.whitening_epsilon, lambda v: v > 0, "> 0")
        checks.number("logit_scale", self.logit_scale, lambda v: v > 0, "> 0")
        checks.number("dropout", self.dropout, lambda v: 0 <= v < 1, "in [0, 1)")

    @property
    def stage_names(self):
        """`stem` (the whitening and its activation), then `stage1` ... `stage{N}`, one per conv-pool group."""
        return stages.names(len(self.widths))


# The shape of airbench94 (widths 64/256/256) and of airbench95 (128/384/384), without normalization:
# a 2x2 patch-whitening stem (24 channels), three conv-pool groups, no residuals, logits x 1/9.
# `cifar_speed_wider` (192/512/512, 8.3 M weights) is `--recipe speed`'s network.
PRESETS = {
    "cifar_speed": ConvGroupsConfig(),
    "cifar_speed_wide": ConvGroupsConfig(widths=(128, 384, 384)),
    "cifar_speed_wider": ConvGroupsConfig(widths=(192, 512, 512)),
    "tiny_speed": ConvGroupsConfig(widths=(8, 16, 16)),  # for tests
}
