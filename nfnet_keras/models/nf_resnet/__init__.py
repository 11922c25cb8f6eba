"""The NF-ResNet family: NFBlock and its BatchNorm twin, the backbone builder, the typed presets (NFNet-F0...F6)."""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, {
    ".blocks": ["NFBlock", "PreActBottleneck"],
    ".presets": ["PRESETS", "NFResNetConfig"],
})
