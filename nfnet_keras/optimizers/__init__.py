"""Optimizers and optimizer wrappers: adaptive gradient clipping, schedules, parameter groups."""
