"""Optimizers and optimizer wrappers: adaptive gradient clipping, schedules, parameter groups, Lookahead."""

from nfnet_keras.optimizers.groups import GROUPS, GroupSGD, param_group
from nfnet_keras.optimizers.lookahead import Lookahead

__all__ = ["GROUPS", "GroupSGD", "Lookahead", "param_group"]
