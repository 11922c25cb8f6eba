"""The stages of a network by name, and the one check of a list of them. Imports no Keras.

Every network of the package names its layers by where they sit: the stem's
start with `stem_`, stage k's (NF-ResNet blocks, conv-pool groups) with
`stage{k}_`, numbered from 1. The stage names are then `stem`, `stage1`, ...,
`stage{N}`, with one stage per entry of the config's `widths`; the commands
check `--freeze` against them before loading the framework.
"""

STEM = "stem"


def stage_names(config):
    """`["stem", "stage1", ..., "stage{N}"]` of a network config (`NFResNetConfig`, `ConvGroupsConfig`)."""
    return [STEM] + [f"stage{k}" for k in range(1, len(config.widths) + 1)]


def stage_of(layer_name):
    """The stage a top-level layer belongs to by its name (`"stage2_block1"` -> `"stage2"`), or None."""
    prefix, sep, _ = layer_name.partition("_")
    if sep and (prefix == STEM or (prefix.startswith("stage") and prefix[5:].isdigit())):
        return prefix
    return None


def parse_stages(stages):
    """A comma-separated string (`"stem,stage1"`) or a sequence of names -> a list of names, in order, once each."""
    if isinstance(stages, str):
        stages = stages.split(",")
    names = [name.strip() for name in stages]
    return list(dict.fromkeys(names))


def check_stages(stages, valid, what):
    """Returns `parse_stages(stages)` if each is in `valid`; else a one-line ValueError naming the valid ones.

    Args:
        stages: str or sequence of str. The stage names asked for.
        valid: sequence of str. The network's stage names (`stage_names`).
        what: str. What is being checked, for the message (e.g. `"--freeze"`).
    """
    names = parse_stages(stages)
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        shown = ", ".join(repr(name) for name in unknown) or "nothing"
        raise ValueError(f"{what}: unknown stage(s) {shown}; the stages of this network are "
                         f"{', '.join(valid)} (comma-separated, e.g. {valid[0]},{valid[1]}).")
    return names
