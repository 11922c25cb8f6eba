"""Layers every network of the package is built from.

Scaled activations and their gamma table, the weight-standardized convolution,
the patch-whitening stem, Squeeze-Excite, stochastic depth, the
normalize-then-activate layer of the BatchNorm twins, and identity (dirac)
kernel initialization. Each name imports its module on first use.
"""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, {
    ".activations": ["ACTIVATIONS", "ScaledActivation"],
    ".gammas": ["GAMMAS", "check_activation"],
    ".initializers": ["PartialDirac", "dirac_mask"],
    ".layer_classes": ["layer_class_name", "resolve_layer_class"],
    ".norm_activation": ["NormActivation", "NormLayerMixin", "check_norm_config"],
    ".squeeze_excite": ["SqueezeExcite"],
    ".stochastic_depth": ["StochasticDepth"],
    ".whitening": ["PatchWhitening", "whitening_filters"],
    ".wsconv": ["WSConv2D", "folds_scales", "scaled_conv"],
})
