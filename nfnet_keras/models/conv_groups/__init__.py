"""The CIFAR speed network: ConvGroup and its BatchNorm twin, the builder, the typed presets."""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, {
    ".conv_group": ["ConvGroup", "NormConvGroup"],
    ".presets": ["PRESETS", "ConvGroupsConfig"],
})
