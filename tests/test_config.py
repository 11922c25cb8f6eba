"""One list per concept: each training-config field drives its flag, its HParams column and its docs row."""

import os

import pytest

from nfnet_keras import cli, fit
from nfnet_keras.config import FIELDS, RECIPES, TrainConfig, flag_name
from nfnet_keras.tensorboard import hparams as tb_hparams
from nfnet_keras.tuner import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(parser):
    return {option for action in parser._actions for option in action.option_strings}


def test_every_field_is_declared_with_its_flag_group_and_column():
    fit_flags, grid_flags = _flags(fit.build_parser()), _flags(grid.build_parser())
    for field in FIELDS:
        meta = field.metadata
        assert meta.get("group") in cli.GROUPS, f"{field.name}: declare it with config.option(..., group=...)"
        assert meta["help"], field.name
        if field.name == "recipe":  # set by fit's --recipe, which also brings the recipe's defaults
            assert "--recipe" in fit_flags and "--recipe" not in grid_flags
            continue
        assert (flag_name(field.name) in fit_flags) == ("fit" in meta["commands"]), field.name
        assert (flag_name(field.name) in grid_flags) == ("grid" in meta["commands"]), field.name


def test_the_docs_flags_table_is_the_declaration():
    with open(os.path.join(ROOT, "docs", "training.md")) as f:
        docs = f.read()
    table = cli.flags_markdown()
    assert table in docs, "docs/training.md's flags table is stale: paste in `python -m nfnet_keras.cli`"
    for field in FIELDS:
        if "fit" in field.metadata["commands"]:
            assert f"`{flag_name(field.name)}" in table


def test_hparams_tell_the_twin_the_ema_the_tta_and_the_recipe_apart():
    columns = {name: (kind, values) for name, kind, values, *_ in tb_hparams.FIT_HPARAMS}
    assert {"norm", "ema", "tta", "recipe", "conv_init", "optimizer"} <= set(columns)
    assert columns["norm"] == (str, ("none", "batch")) and columns["recipe"] == (str, tuple(RECIPES))
    shown = [name for name, _, _, is_shown, _ in tb_hparams.FIT_HPARAMS if is_shown]
    assert shown == ["preset", "norm", "epochs", "batch_size", "lr"]
    config, _ = fit.parse_config(["--recipe", "speed", "--norm", "batch", "--no-export"])
    values = tb_hparams.fit_hparams(config)
    assert (values["recipe"], values["norm"], values["ema"], values["tta"]) == ("speed", "batch", 0.98,
                                                                                 "flip_translate")


def test_the_recipe_names_the_run_but_is_not_its_identity():
    by_recipe, _ = fit.parse_config(["--recipe", "fast", "--no-export"])
    spelled = dict(RECIPES["fast"])
    overrides = spelled.pop("overrides")
    by_flags = TrainConfig(**spelled, overrides=overrides).validate()
    assert by_recipe.recipe == "fast" and by_flags.recipe == "report"
    assert by_recipe.identity() == by_flags.identity()


@pytest.mark.parametrize("argv, message", [
    (["--augment", "seed"], "invalid choice: 'seed'"),
    (["--preset", "seed"], "Unknown preset 'seed'"),
    (["--warmup-epochs", "2", "--schedule", "step"], "--warmup-epochs is the cosine schedule's warm-up; --schedule "
                                                     "step has none of it"),
])
def test_removed_aliases_and_ignored_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        fit.parse_config(argv + ["--no-export"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_tta_policies_are_declared_once_and_every_view_is_implemented():
    from nfnet_keras.config import TTA_POLICIES, TTA_POLICY_WEIGHTS, TTA_VIEW_NAMES
    from nfnet_keras.inference import TTA_POLICY_VIEWS, TTA_VIEWS

    assert tuple(TTA_VIEWS) == TTA_VIEW_NAMES
    assert TTA_POLICIES == tuple(TTA_POLICY_WEIGHTS) == tuple(TTA_POLICY_VIEWS)
    for policy, pairs in TTA_POLICY_WEIGHTS.items():
        assert sum(weight for _, weight in pairs) == pytest.approx(1.0), policy
        assert {view for view, _ in pairs} <= set(TTA_VIEWS), policy
