"""The report's hyperparameter study (lr x batch size) on KerasTuner: `python -m nfnet_keras.tuner.grid`."""

from nfnet_keras.tuner.hypermodel import NFNetHyperModel
from nfnet_keras.tuner.oracle import NFNetGridSearch, ResumableGridSearchOracle, is_diverged

__all__ = ["NFNetGridSearch", "NFNetHyperModel", "ResumableGridSearchOracle", "is_diverged"]
