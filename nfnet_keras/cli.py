"""Command-line flags of the `TrainConfig` fields, shared by `nfnet-fit` and `nfnet-grid`, made from the fields.

Each field of `nfnet_keras.config.TrainConfig` declares its help, group,
choices and commands once (`config.option`); `add_config_flags` turns them
into the flags, and `flags_markdown` into the flags table of docs/training.md
(`python -m nfnet_keras.cli` prints it).
"""

import argparse
import ast

from nfnet_keras.config import FIELD_KINDS, FIELDS, OPTIONAL_FIELDS, flag_name
from nfnet_keras.models.presets import PRESETS

# The sections of --help and of the docs table, in order.
GROUPS = ("model", "optimisation", "data", "runtime", "output")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless its help already tells the default, or it has none to tell."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text.lower() or nothing or action.default == [] or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def parse_override(text):
    """`KEY=VALUE` -> (key, value); the value is a Python literal or else a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override takes KEY=VALUE (e.g. depths=(2,2,2)), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string, e.g. activation=gelu


def _help(field):
    return field.metadata["help"].format(presets=", ".join(PRESETS))


def add_field_flag(group, field, default, help=None):
    """Adds the flag of one `TrainConfig` field to `group`, its kind, choices and default from the field."""
    kind, meta = FIELD_KINDS[field.name], field.metadata
    kwargs = dict(default=default, help=help or _help(field))
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if kind is dict:  # overrides: one --override KEY=VALUE per key
        group.add_argument(flag_name(field.name), dest="override", type=parse_override, action="append",
                           **{**kwargs, "default": []})
    elif kind is bool:  # --x / --no-x; an optional one (--jit) stays None unless given
        group.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, **kwargs)
    elif meta["choices"] is not None:
        group.add_argument(flag_name(field.name), choices=meta["choices"], **kwargs)
    else:
        group.add_argument(flag_name(field.name), type=kind, **kwargs)


def add_config_flags(parser, command, defaults=None, helps=None):
    """Adds the flags of every `TrainConfig` field of `command` ("fit" or "grid"), in their groups.

    Args:
        parser: argparse.ArgumentParser.
        command: str. Fields whose `commands` hold it get a flag.
        defaults: TrainConfig or None. The flags' defaults (the command's own,
            e.g. the grid's constant schedule). Defaults to `TrainConfig()`.
        helps: dict or None. Help texts that differ for this command, by field.

    Returns:
        {group name: argparse group}, for the command's own flags.
    """
    from nfnet_keras.config import TrainConfig

    defaults, helps = defaults or TrainConfig(), helps or {}
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for field in FIELDS:
        if command in field.metadata["commands"]:
            add_field_flag(groups[field.metadata["group"]], field, getattr(defaults, field.name), helps.get(field.name))
    return groups


def flags_markdown(command="fit"):
    """The flags table of docs/training.md: one row per flag of `command`, by group."""
    from nfnet_keras.config import TrainConfig

    defaults = TrainConfig()
    rows = ["| flag | default | what it sets |", "|---|---|---|"]
    for group in GROUPS:
        for field in FIELDS:
            meta = field.metadata
            if meta["group"] != group or command not in meta["commands"]:
                continue
            flag = flag_name(field.name)
            if FIELD_KINDS[field.name] is bool:
                flag += f"`, `--no-{field.name.replace('_', '-')}"
            elif meta["choices"]:
                flag += " {" + ",".join(meta["choices"]) + "}"
            elif meta["metavar"]:
                flag += f" {meta['metavar']}"
            default = getattr(defaults, field.name)
            default = "unset" if default is None and field.name in OPTIONAL_FIELDS else f"`{default}`"
            text = _help(field).replace("%%", "%").replace("|", "\\|")
            rows.append(f"| {group}: `{flag}` | {default if field.name != 'overrides' else '(none)'} | {text} |")
    return "\n".join(rows)


def config_values(args):
    """The `TrainConfig` fields among the parsed flags (overrides as a dict)."""
    from nfnet_keras.config import CONFIG_FIELDS

    values = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS and k != "overrides"}
    values["overrides"] = dict(getattr(args, "override", []))
    return values


if __name__ == "__main__":
    print(flags_markdown())
