"""Optimizers and optimizer wrappers: adaptive gradient clipping, schedules, parameter groups."""

from nfnet_keras.optimizers.groups import GROUPS, GroupSGD, param_group

__all__ = ["GROUPS", "GroupSGD", "param_group"]
