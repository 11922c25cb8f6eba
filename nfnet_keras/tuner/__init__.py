"""The report's hyperparameter study (lr x batch size) on KerasTuner: `python -m nfnet_keras.tuner.grid`."""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, {
    ".hypermodel": ["NFNetHyperModel"],
    ".oracle": ["NFNetGridSearch", "ResumableGridSearchOracle", "is_diverged"],
})
