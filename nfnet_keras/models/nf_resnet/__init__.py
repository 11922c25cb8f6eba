"""The NF-ResNet family: NFBlock and its BatchNorm twin, the backbone builder, the typed presets (NFNet-F0...F6)."""

from nfnet_keras.models.nf_resnet.blocks import NFBlock, PreActBottleneck
from nfnet_keras.models.nf_resnet.presets import PRESETS, NFResNetConfig

__all__ = ["NFBlock", "NFResNetConfig", "PRESETS", "PreActBottleneck"]
