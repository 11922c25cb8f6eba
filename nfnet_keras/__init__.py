"""nfnet-keras: Normalizer-Free ResNets (NFNets) for Keras 3.

`import nfnet_keras` loads Keras quietly (TensorFlow's C++ start-up lines are
kept out of the terminal; `NFNET_VERBOSE=1` shows them) and registers every
layer, block, schedule and optimizer of the package with Keras, so that
`keras.saving.load_model` finds them in a `.keras` file. The package's own
commands (`nfnet-fit`, `python -m nfnet_keras.fit`, ...) skip that: they parse
and check their flags first, answering `--help` and bad input without loading
the framework, and call `load_framework()` when they need it. Either way the
public names below import their module on first use.
"""

import importlib

from nfnet_keras import lazy
from nfnet_keras.console import import_backend_quietly, started_as_command

__version__ = "0.2.0"

__getattr__, __dir__, __all__ = lazy.attach(
    __name__,
    {
        ".agc": ["clip_gradient", "unitwise_norm", "with_agc"],
        ".contract": ["CLASS_NAMES"],
        ".data": ["preprocess"],
        ".layers": ["GAMMAS", "PartialDirac", "PatchWhitening", "ScaledActivation", "SqueezeExcite",
                    "StochasticDepth", "WSConv2D"],
        ".models": ["BATCHNORM_TWIN", "PRESETS", "ConvGroup", "NFBlock", "NormConvGroup", "PreActBottleneck",
                    "SignalBlock", "adapt_model", "build_model", "count_macs", "data_initialize", "dirac_initialize",
                    "signal_propagation"],
    },
    submodules=("layers", "models", "optimizers", "tensorboard", "tuner"),
)
__all__ += ["load_framework"]

# The modules that register Keras objects (layers, blocks, initializers, schedules, optimizers): importing
# them makes every class a `.keras` file of this package can name known to Keras' deserialization.
KERAS_OBJECT_MODULES = ("nfnet_keras.models.registry", "nfnet_keras.models.initialization",
                        "nfnet_keras.optimization")


def load_framework():
    """Imports Keras quietly and registers every Keras object of the package (see the module docstring)."""
    import_backend_quietly()
    for module in KERAS_OBJECT_MODULES:
        importlib.import_module(module)


if not started_as_command():
    load_framework()
