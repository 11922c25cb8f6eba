"""nfnet-keras: Normalizer-Free ResNets (NFNets) for Keras 3."""

# ruff: noqa: E402  (the quiet start-up must come before the imports that load the backend)

from nfnet_keras.console import import_backend_quietly

# TensorFlow's C++ start-up lines bury the output of the command-line tools:
# they are kept out of the terminal during the import (NFNET_VERBOSE=1 shows them).
import_backend_quietly()

# isort: split

from nfnet_keras import optimizers  # noqa: F401  (registers the optimizers a compiled .keras file names)
from nfnet_keras.agc import clip_gradient, unitwise_norm, with_agc
from nfnet_keras.contract import CLASS_NAMES
from nfnet_keras.layers import (
    GAMMAS,
    PartialDirac,
    PatchWhitening,
    ScaledActivation,
    SqueezeExcite,
    StochasticDepth,
    WSConv2D,
)
from nfnet_keras.models import (
    BATCHNORM_TWIN,
    PRESETS,
    ConvGroup,
    NFBlock,
    NormConvGroup,
    PreActBottleneck,
    SignalBlock,
    adapt_model,
    build_model,
    count_macs,
    dirac_initialize,
    signal_propagation,
)

__version__ = "0.2.0"


def __getattr__(name):
    # `preprocess` lives in the TensorFlow data pipeline: imported on first use, so that
    # `import nfnet_keras` loads no TensorFlow under the JAX and PyTorch backends.
    if name == "preprocess":
        from nfnet_keras.data import preprocess

        return preprocess
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BATCHNORM_TWIN",
    "CLASS_NAMES",
    "ConvGroup",
    "GAMMAS",
    "PRESETS",
    "NFBlock",
    "NormConvGroup",
    "PartialDirac",
    "PatchWhitening",
    "PreActBottleneck",
    "ScaledActivation",
    "SignalBlock",
    "SqueezeExcite",
    "StochasticDepth",
    "WSConv2D",
    "adapt_model",
    "build_model",
    "clip_gradient",
    "count_macs",
    "dirac_initialize",
    "preprocess",
    "signal_propagation",
    "unitwise_norm",
    "with_agc",
]
