"""Every preset of every network family by name, and the one check of a name and its overrides.

Imports no Keras: the commands check `--preset` and `--override` before loading
the framework. The builders are in `nfnet_keras.models.registry`.
"""

import dataclasses

from nfnet_keras.models.conv_groups.presets import PRESETS as CONV_GROUPS_PRESETS
from nfnet_keras.models.nf_resnet.presets import PRESETS as NF_RESNET_PRESETS

PRESETS = {**NF_RESNET_PRESETS, **CONV_GROUPS_PRESETS}


def check_preset(name):
    """Returns `name` if it is a key of `PRESETS`, else raises a one-line ValueError listing them."""
    if not (isinstance(name, str) and name in PRESETS):
        raise ValueError(f"Unknown preset {name!r}. Use one of: {', '.join(PRESETS)}.")
    return name


def resolve_config(preset, overrides=None):
    """The typed config of `preset` with `overrides` applied, every value checked.

    Args:
        preset: str. A key of `PRESETS`.
        overrides: dict or None. Config fields to replace.

    Returns:
        An `NFResNetConfig` or `ConvGroupsConfig`.

    Raises:
        ValueError: on an unknown preset, an unknown override key, or a bad value;
            the one-line message names the key, the value and what is allowed.
    """
    config = PRESETS[check_preset(preset)]
    overrides = dict(overrides or {})
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown override(s) {', '.join(map(repr, unknown))} for preset {preset!r}. "
            f"Allowed: {', '.join(sorted(fields))}."
        )
    return dataclasses.replace(config, **overrides)
