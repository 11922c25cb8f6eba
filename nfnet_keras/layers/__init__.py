"""Layers every network of the package is built from.

Scaled activations and their gamma table, the weight-standardized convolution,
the patch-whitening stem, Squeeze-Excite, stochastic depth, and the
normalize-then-activate layer of the BatchNorm twins, and identity (dirac) kernel initialization.
"""

from nfnet_keras.layers.activations import ACTIVATIONS, GAMMAS, ScaledActivation, check_activation
from nfnet_keras.layers.initializers import PartialDirac, dirac_mask
from nfnet_keras.layers.layer_classes import layer_class_name, resolve_layer_class
from nfnet_keras.layers.norm_activation import NormActivation
from nfnet_keras.layers.squeeze_excite import SqueezeExcite
from nfnet_keras.layers.stochastic_depth import StochasticDepth
from nfnet_keras.layers.whitening import PatchWhitening, whitening_filters
from nfnet_keras.layers.wsconv import WSConv2D, folds_scales, scaled_conv

__all__ = [
    "ACTIVATIONS",
    "GAMMAS",
    "NormActivation",
    "PartialDirac",
    "PatchWhitening",
    "ScaledActivation",
    "SqueezeExcite",
    "StochasticDepth",
    "WSConv2D",
    "check_activation",
    "dirac_mask",
    "folds_scales",
    "layer_class_name",
    "resolve_layer_class",
    "scaled_conv",
    "whitening_filters",
]
