"""Checks of preset values, shared by the typed presets of every network family.

Each returns the checked (normalised) value or raises a one-line `ValueError`
naming the key, the value and what is allowed.
"""

import math
import numbers


def is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_ints(key, value, allowed=None):
    """A non-empty sequence of positive ints (an int alone is a sequence of one) -> a tuple.

    `allowed` (a tuple of ints, or None) restricts each value.
    """
    given = value
    if is_int(value):
        value = (value,)
    if not (isinstance(value, (tuple, list)) and value and all(is_int(v) and v > 0 for v in value)):
        raise ValueError(f"{key} must be a non-empty sequence of positive ints, got {given!r}.")
    value = tuple(int(v) for v in value)
    if allowed is not None and any(v not in allowed for v in value):
        raise ValueError(f"{key} must be {' or '.join(map(str, allowed))} each, got {value!r}.")
    return value


def boolean(key, value):
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}.")
    return value


def number(key, value, allowed, in_words):
    """A finite real number for which `allowed(value)` holds; `in_words` says which."""
    if not (is_number(value) and allowed(value)):
        raise ValueError(f"{key} must be a number {in_words}, got {value!r}.")
    return value

