"""Transfer learning: backbones, per-stage feature maps, new heads, frozen stages, and `nfnet-fit --init-from`."""

import json
import os

import keras
import numpy as np
import pytest

from nfnet_keras import exits, fit
from nfnet_keras.config import TrainConfig
from nfnet_keras.models import BATCHNORM_TWIN, build_model, resolve_config, transfer

TWIN = {"nf": {}, "bn": BATCHNORM_TWIN}
# (preset, norm): the three kinds of body, NF-ResNet (with and without a final conv), its BatchNorm twin, the
# speed network.
NETWORKS = [("tiny", "nf"), ("tiny", "bn"), ("tiny_grouped", "nf"), ("tiny_speed", "nf"), ("tiny_speed", "bn")]
# The per-stage maps of each body on 32 x 32 images: the NF-ResNets' stem and blocks keep 32 x 32 until a stride-2
# stage, and "final" is the map the head pools (tiny_grouped's final 1x1 conv doubles the channels); the speed
# network's 2 x 2 whitening patches give 31 x 31, each group max-pools by 2.
FEATURE_SHAPES = {
    "tiny": {"stem": (None, 32, 32, 8), "stage1": (None, 32, 32, 16), "stage2": (None, 16, 16, 32),
             "final": (None, 16, 16, 32)},
    "tiny_grouped": {"stem": (None, 32, 32, 16), "stage1": (None, 32, 32, 32), "stage2": (None, 16, 16, 64),
                     "final": (None, 16, 16, 128)},
    "tiny_speed": {"stem": (None, 31, 31, 24), "stage1": (None, 15, 15, 8), "stage2": (None, 7, 7, 16),
                   "stage3": (None, 3, 3, 16)},
}
# The last feature map, before the global pooling: tiny_grouped's final 1x1 conv doubles the channels.
BODY_SHAPES = {"tiny": (None, 16, 16, 32), "tiny_grouped": (None, 16, 16, 128), "tiny_speed": (None, 3, 3, 16)}


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _randomize(model, seed=0):
    """Gives every weight of `model` random values (not its initial ones), so that a copy can be told apart."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(0.0, 0.1, variable.shape).astype("float32") + (1.0 if "variance" in
                                                                                   variable.path else 0.0))
    return model


def _by_path(model, skip=()):
    return {v.path: _np(v).copy() for layer in model.layers if layer.name not in skip for v in layer.weights}


@pytest.fixture(scope="module")
def models():
    """The full model of each of `NETWORKS`, built once."""
    return {(preset, norm): build_model(preset, **TWIN[norm]) for preset, norm in NETWORKS}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).normal(0.0, 1.0, (4, 32, 32, 3)).astype("float32")


# === Backbones and feature maps ===


@pytest.mark.parametrize("preset, norm", NETWORKS)
def test_include_top_false_gives_pooled_features_or_the_last_map(preset, norm):
    channels = BODY_SHAPES[preset][-1]
    assert build_model(preset, include_top=False, **TWIN[norm]).output_shape == (None, channels)
    assert build_model(preset, include_top=False, pooling="max", **TWIN[norm]).output_shape == (None, channels)
    assert build_model(preset, include_top=False, pooling=None, **TWIN[norm]).output_shape == BODY_SHAPES[preset]


def test_a_bad_pooling_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^pooling must be one of 'avg', 'max' or None, got 'mean'\.$"):
        build_model("tiny", include_top=False, pooling="mean")


@pytest.mark.parametrize("preset, norm", NETWORKS)
def test_feature_maps_are_named_by_stage_with_their_shapes(preset, norm, models):
    extractor = transfer.feature_extractor(models[preset, norm])
    assert {name: tuple(t.shape) for name, t in extractor.output.items()} == FEATURE_SHAPES[preset]
    # The names the commands check --freeze against, from the config alone, are the model's.
    assert resolve_config(preset).stage_names == list(transfer.stage_layers(models[preset, norm]))


def test_the_head_reads_the_last_stage_and_the_backbone_shares_the_weights(models, images):
    model = models["tiny", "nf"]
    maps = transfer.feature_extractor(model)(images)
    assert list(maps) == ["stem", "stage1", "stage2", "final"]
    # tiny's body ends with final_act on the last stage's map; the head averages it and classifies.
    np.testing.assert_array_equal(_np(maps["final"]), _np(model.get_layer("final_act")(maps["stage2"])))
    pooled = _np(transfer.backbone(model)(images))
    np.testing.assert_allclose(pooled, _np(keras.ops.mean(maps["final"], axis=(1, 2))), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_np(model(images)), _np(model.get_layer("classifier")(pooled)), rtol=0, atol=1e-6)


def test_include_top_false_with_weights_copies_the_body_of_a_file_with_any_head(tmp_path):
    source = _randomize(build_model("tiny", num_classes=1000))
    path = tmp_path / "tiny_1000.keras"
    source.save(path)
    features = build_model("tiny", include_top=False, weights=path)
    expected, copied = _by_path(source, skip=("classifier",)), _by_path(features)
    assert sorted(copied) == sorted(expected)
    for key, value in copied.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


# === New heads ===


@pytest.mark.parametrize("preset, norm", [("tiny_grouped", "nf"), ("tiny_speed", "bn")])
def test_with_new_head_keeps_every_body_weight_and_has_the_new_classes(preset, norm, images, tmp_path):
    model = _randomize(build_model(preset, **TWIN[norm]))
    new = transfer.with_new_head(model, 3)
    assert new.output_shape == (None, 3) and _np(new(images)).shape == (4, 3)
    head = [layer.name for layer in transfer.head_layers(model)]
    assert [layer.name for layer in transfer.head_layers(new)] == head  # dropout, logit_scale rebuilt as they were
    body, new_body = _by_path(model, skip=head), _by_path(new, skip=head)
    assert sorted(new_body) == sorted(body)
    for key, value in body.items():
        np.testing.assert_array_equal(new_body[key], value, err_msg=key)
    old_classifier, classifier = model.get_layer("classifier"), new.get_layer("classifier")
    assert classifier is not old_classifier and classifier.kernel.shape == (old_classifier.kernel.shape[0], 3)
    assert classifier.get_config()["kernel_initializer"] == old_classifier.get_config()["kernel_initializer"]
    # Saved and reloaded, the new model computes the same logits.
    new.save(tmp_path / "new.keras")
    np.testing.assert_allclose(_np(keras.saving.load_model(tmp_path / "new.keras")(images)), _np(new(images)),
                               rtol=0, atol=1e-6)


def test_with_new_head_refuses_a_backbone():
    with pytest.raises(ValueError, match=r"^Model 'tiny' has no 'classifier' layer after a 'pool' layer"):
        transfer.with_new_head(build_model("tiny", include_top=False), 3)


# === Freezing ===


def test_freeze_stops_exactly_those_layers_and_a_step_leaves_them_bitwise_unchanged(images):
    model = build_model("tiny", **BATCHNORM_TWIN)  # BatchNorm: frozen moving statistics must not move either
    assert transfer.freeze(model, ["stem", "stage1"]) == ["stem_conv1", "stage1_block1"]
    assert {layer.name for layer in model.layers if not layer.trainable} == {"stem_conv1", "stage1_block1"}
    before = _by_path(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.fit(images, np.arange(4), batch_size=4, epochs=1, verbose=0)
    after = _by_path(model)
    for key, value in before.items():
        frozen = key.split("/")[0] in ("stem_conv1", "stage1_block1")
        assert np.array_equal(after[key], value) == frozen, key


def test_freeze_names_the_valid_stages_of_a_wrong_one(models):
    with pytest.raises(ValueError) as info:
        transfer.freeze(models["tiny_speed", "nf"], "stem,stage4")
    assert str(info.value) == ("cannot freeze stages of 'tiny_speed': unknown stage(s) 'stage4'; the stages of this "
                               "network are stem, stage1, stage2, stage3 (comma-separated, e.g. stem,stage1).")


@pytest.mark.parametrize("values, message", [
    (dict(freeze="stem,stage3"), "--freeze: unknown stage(s) 'stage3'; the stages of this network are stem, stage1, "
                                 "stage2, final (comma-separated, e.g. stem,stage1)."),
    (dict(preset="tiny_speed", freeze="final"), "--freeze: unknown stage(s) 'final'; the stages of this network are "
                                                "stem, stage1, stage2, stage3 (comma-separated, e.g. stem,stage1)."),
    (dict(preset="tiny_speed", freeze="stem", whitening_bias_epochs=3),
     "--freeze stem keeps the whitening stem's bias fixed from the start; drop --whitening-bias-epochs or stem "
     "from --freeze."),
    (dict(init_from="weights.h5"), "--init-from takes a .keras model file (a run's model.keras, nfnet-convert's "
                                   "output), got 'weights.h5'."),
])
def test_transfer_flags_are_checked_with_the_config(values, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{"preset": "tiny", **values}).validate()
    assert str(info.value) == message


# === Copying weights ===


def test_copy_weights_copies_the_head_only_with_the_same_classes():
    source = _randomize(build_model("tiny"))
    same, other = build_model("tiny"), build_model("tiny", num_classes=4)
    fresh_head = _np(other.get_layer("classifier").kernel).copy()
    assert transfer.copy_weights(same, source) is True
    assert transfer.copy_weights(other, source) is False
    np.testing.assert_array_equal(_np(same.get_layer("classifier").kernel), _np(source.get_layer("classifier").kernel))
    np.testing.assert_array_equal(_np(other.get_layer("classifier").kernel), fresh_head)
    np.testing.assert_array_equal(_np(other.get_layer("stage2_block1").weights[1]),
                                  _np(source.get_layer("stage2_block1").weights[1]))


def test_copy_weights_refuses_another_network_and_copies_nothing():
    target = build_model("tiny")
    before = _by_path(target)
    with pytest.raises(transfer.WeightsMismatch) as info:
        transfer.copy_weights(target, _randomize(build_model("tiny", **BATCHNORM_TWIN)))
    # The twin's convolutions have no biases, its blocks no skip gains, and BatchNorms where tiny has none.
    assert str(info.value) == ("the weights are not those of the network 'tiny': the source lacks stem_conv1/bias "
                               "(and 59 more difference(s)).")
    assert all(np.array_equal(value, before[key]) for key, value in _by_path(target).items())


# === nfnet-fit --init-from and --freeze ===

FIT = ["--preset", "tiny", "--epochs", "1", "--train-limit", "256", "--val-size", "64", "--test-limit", "64",
       "--batch-size", "64", "--quiet", "--no-export"]


@pytest.fixture(scope="module")
def init_run(tmp_path_factory, synthetic_cifar_dir):
    """A 1-epoch run of `tiny` from a 3-class `tiny` file, stem frozen; the model's weights when `fit` starts."""
    from nfnet_keras import training

    base = tmp_path_factory.mktemp("init_from")
    source = _randomize(build_model("tiny", num_classes=3), seed=2)
    source_path = base / "source.keras"
    source.save(source_path)
    started = {}
    original = training.fit_model

    def recording_fit_model(model, *args, **kwargs):
        started.update(_by_path(model))
        return original(model, *args, **kwargs)

    run_dir = base / "run"
    argv = [*FIT, "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir), "--init-from", str(source_path),
            "--freeze", "stem"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "fit_model", recording_fit_model)
        assert fit.main(argv) == 0
    return dict(source=_by_path(source), source_path=source_path, started=started, run_dir=run_dir, argv=argv)


@pytest.mark.slow
def test_init_from_starts_from_the_file_with_a_fresh_head_and_keeps_the_frozen_stem(init_run):
    source, started = init_run["source"], init_run["started"]
    body = [key for key in source if not key.startswith("classifier/")]
    assert sorted(body) == sorted(key for key in started if not key.startswith("classifier/"))
    for key in body:  # every body weight, the first layer's included, is the file's when training starts
        np.testing.assert_array_equal(started[key], source[key], err_msg=key)
    assert started["classifier/kernel"].shape == (32, 10) and source["classifier/kernel"].shape == (32, 3)
    trained = _by_path(keras.saving.load_model(init_run["run_dir"] / "model.keras"))
    np.testing.assert_array_equal(trained["stem_conv1/kernel"], source["stem_conv1/kernel"])  # frozen
    assert not np.array_equal(trained["stage1_block1/conv0/kernel"], source["stage1_block1/conv0/kernel"])
    with open(init_run["run_dir"] / "config.json") as f:
        recorded = json.load(f)["config"]
    assert recorded["init_from"] == str(init_run["source_path"]) and recorded["freeze"] == "stem"


@pytest.mark.slow
def test_a_resumed_run_restores_its_checkpoint_and_does_not_read_init_from(init_run, capsys):
    run_dir, source_path = init_run["run_dir"], init_run["source_path"]
    trained = _by_path(keras.saving.load_model(run_dir / "model.keras"))
    os.remove(run_dir / "metrics.json")  # as after a crash between the last checkpoint and the results
    os.rename(source_path, source_path.with_suffix(".moved"))  # resuming must not need the file
    try:
        assert fit.main(init_run["argv"]) == 0
    finally:
        os.rename(source_path.with_suffix(".moved"), source_path)
    assert (f"Resuming: the checkpoint restores the weights; --init-from {source_path} is not read."
            in capsys.readouterr().out)
    resumed = _by_path(keras.saving.load_model(run_dir / "model.keras"))
    for key, value in trained.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


@pytest.mark.slow
def test_init_from_a_file_of_another_network_exits_2_in_one_line_writing_nothing(tmp_path, synthetic_cifar_dir,
                                                                                  capsys):
    path = tmp_path / "wider.keras"
    build_model("tiny", widths=(16, 64)).save(path)
    run_dir = tmp_path / "run"
    code = fit.main([*FIT, "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir), "--init-from", str(path)])
    assert code == exits.BAD_INPUT == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --init-from {path} is not a model of --preset tiny: stage2_block1/conv0/kernel is (1, 1, 16, 16) in "
        "the source, (1, 1, 16, 8) here (and 14 more difference(s)); give a .keras model of that network.")
    assert not run_dir.exists()
