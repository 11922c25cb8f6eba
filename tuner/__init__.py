"""The report's hyperparameter study (lr x batch size) on KerasTuner: `python -m tuner.grid`."""

from tuner.hypermodel import NFNetHyperModel
from tuner.oracle import NFNetGridSearch, ResumableGridSearchOracle, is_diverged

__all__ = ["NFNetGridSearch", "NFNetHyperModel", "ResumableGridSearchOracle", "is_diverged"]
