"""The CIFAR speed network: ConvGroup and its BatchNorm twin, the builder, the typed presets."""

from nfnet_keras.models.conv_groups.conv_group import ConvGroup, NormConvGroup
from nfnet_keras.models.conv_groups.presets import PRESETS, ConvGroupsConfig

__all__ = ["ConvGroup", "ConvGroupsConfig", "NormConvGroup", "PRESETS"]
