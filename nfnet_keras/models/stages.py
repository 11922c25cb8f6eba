"""The stages of a network by name, and the one check of a list of them. Imports no Keras.

Every network of the package names its layers by where they sit: the stem's
start with `stem_`, stage k's (NF-ResNet blocks, conv-pool groups) with
`stage{k}_`, numbered from 1, and an NF-ResNet's layers between its last stage
and its head (the final 1x1 conv, the activation before pooling) with
`final_`. The stage names are then `stem`, `stage1`, ..., `stage{N}` and,
where the body has them, `final`; each network config lists its own
(`stage_names`), and the commands check `--freeze` against them before
loading the framework.
"""

STEM, FINAL = "stem", "final"


def names(num_stages, final=False):
    """`["stem", "stage1", ..., "stage{num_stages}"]`, then `"final"` if `final`."""
    return [STEM] + [f"stage{k}" for k in range(1, num_stages + 1)] + ([FINAL] if final else [])


def stage_of(layer_name):
    """The stage a top-level layer belongs to by its name (`"stage2_block1"` -> `"stage2"`), or None."""
    prefix, sep, _ = layer_name.partition("_")
    if sep and (prefix in (STEM, FINAL) or (prefix.startswith("stage") and prefix[5:].isdigit())):
        return prefix
    return None


def parse_stages(stages):
    """A comma-separated string (`"stem,stage1"`) or a sequence of names -> a list of names, in order, once each."""
    if isinstance(stages, str):
        stages = stages.split(",")
    return list(dict.fromkeys(name.strip() for name in stages))


def check_stages(stages, valid, what):
    """Returns `parse_stages(stages)` if each is in `valid`; else a one-line ValueError naming the valid ones.

    Args:
        stages: str or sequence of str. The stage names asked for.
        valid: sequence of str. The network's stage names (its config's `stage_names`).
        what: str. What is being checked, for the message (e.g. `"--freeze"`).
    """
    asked = parse_stages(stages)
    unknown = [name for name in asked if name not in valid]
    if unknown or not asked:
        shown = ", ".join(repr(name) for name in unknown) or "nothing"
        raise ValueError(f"{what}: unknown stage(s) {shown}; the stages of this network are "
                         f"{', '.join(valid)} (comma-separated, e.g. {valid[0]},{valid[1]}).")
    return asked
