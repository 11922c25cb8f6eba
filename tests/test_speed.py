"""The CIFAR speed network and its recipe: the whitening stem, the conv-pool groups, the triangle
schedule, the translate-flip augmentation, test-time augmentation, EMA and the BatchNorm twin."""

import dataclasses
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import nfnet_keras as nk
from nfnet_keras import evaluate, fit, network
from nfnet_keras.config import RECIPES, TrainConfig
from nfnet_keras.data import make_augmenter
from nfnet_keras.inference import TTA_POLICY_VIEWS, TTA_VIEWS, with_tta
from nfnet_keras.layers import PatchWhitening, whitening_filters
from nfnet_keras.models import ConvGroup, NormConvGroup, model_convs
from nfnet_keras.models.batchnorm_stats import batchnorm_layers
from nfnet_keras.optimization import Triangle, make_schedule

from conftest import StopTraining, WeightsAt, keras_roundtrip, run_layer_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def correlated_images(n=64, size=12, seed=0):
    """Smooth random images: neighbouring pixels and channels are correlated, as in photographs."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, size + 1, size + 1, 1)).astype("float32")
    smooth = (base[:, 1:, 1:] + base[:, :-1, 1:] + base[:, 1:, :-1] + base[:, :-1, :-1]) / 2
    return (smooth + 0.3 * rng.normal(size=(n, size, size, 3))).astype("float32")


# === PatchWhitening ===


def test_whitening_filters_are_scaled_eigenvectors_of_the_patch_second_moment():
    images = correlated_images()
    eigenvalues, kernel = whitening_filters(images, patch_size=2, epsilon=1e-3)
    # The second moment of every 2x2 patch, by an explicit loop (row, column, channel order).
    patches = [images[n, i:i + 2, j:j + 2, :].reshape(-1) for n in range(len(images))
               for i in range(images.shape[1] - 1) for j in range(images.shape[2] - 1)]
    moment = np.mean([np.outer(p, p) for p in patches], axis=0)
    np.testing.assert_allclose(eigenvalues, np.sort(np.linalg.eigvalsh(moment))[::-1], rtol=1e-4)
    filters = kernel.reshape(12, 24)
    np.testing.assert_allclose(filters[:, 12:], -filters[:, :12])  # each direction with both signs
    # Each filter's response has second moment lambda / (lambda + eps) over the patches.
    responses = np.stack(patches) @ filters[:, :12]
    np.testing.assert_allclose((responses**2).mean(0), eigenvalues / (eigenvalues + 1e-3), rtol=1e-3)
    # ... and the responses are uncorrelated (whitened).
    cross = responses.T @ responses / len(responses)
    np.testing.assert_allclose(cross - np.diag(np.diag(cross)), 0, atol=1e-3)


def test_patch_whitening_layer_adapts_saves_and_exports_its_filters(tmp_path):
    images = correlated_images(size=32)
    layer = PatchWhitening(2)
    before = np.asarray(layer(images[:4]))
    np.testing.assert_allclose(before[..., :12].reshape(4, 31, 31, 2, 2, 3)[:, :, :, 0, 0, :],
                               images[:4, :31, :31, :], rtol=1e-6)  # unadapted: the identity on patch pixels
    layer.adapt(images)
    out = np.asarray(layer(images))
    assert out.shape == (64, 31, 31, 24)
    assert np.all(np.abs((out**2).mean((0, 1, 2)) - 1) < 0.05)  # unit second moment per channel
    # An iterable of batches (e.g. tf.data) adapts to the same filters as the array.
    other = PatchWhitening(2)
    other.adapt(tf.data.Dataset.from_tensor_slices(images).batch(10))
    np.testing.assert_allclose(np.asarray(other.kernel), np.asarray(layer.kernel), rtol=1e-5, atol=1e-6)
    # The adapted filters travel with the model.
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, layer(inputs))
    loaded = keras_roundtrip(model, tmp_path)
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].kernel), np.asarray(layer.kernel))
    np.testing.assert_allclose(np.asarray(loaded(images[:4])), out[:4], rtol=1e-6, atol=1e-6)


def test_patch_whitening_layer_contract(tmp_path):
    # The filters are fixed: only the bias trains.
    layer = run_layer_test(PatchWhitening, dict(patch_size=2, epsilon=1e-3), (2, 6, 6, 3), tmp_path,
                           expected_output_shape=(2, 5, 5, 24))
    assert [w.name for w in layer.trainable_weights] == ["bias"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=0), "patch_size must be an int >= 1"),
    (dict(epsilon=0.0), "epsilon must be > 0"),
])
def test_patch_whitening_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchWhitening(**kwargs)


def test_adapt_rejects_images_of_the_wrong_shape():
    layer = PatchWhitening(2)
    layer.build((None, 8, 8, 3))
    with pytest.raises(ValueError, match=r"adapt needs images of shape \(n, height, width, 3\)"):
        layer.adapt(np.zeros((4, 8, 8, 1), "float32"))


# === ConvGroup and the cifar_speed presets ===


@pytest.mark.parametrize("norm_layer", [None, "BatchNormalization"])
def test_conv_group_contract(norm_layer, tmp_path):
    kwargs = dict(filters=4, activation="gelu")
    if norm_layer:
        kwargs.update(conv_layer="Conv2D", use_bias=False, norm_layer=norm_layer)
    run_layer_test(NormConvGroup if norm_layer else ConvGroup, kwargs, (2, 8, 8, 3), tmp_path,
                   expected_output_shape=(2, 4, 4, 4))


def test_conv_group_keeps_unit_gaussian_signal_near_unit_variance():
    keras.utils.set_random_seed(0)
    group = ConvGroup(256, "gelu")
    x = np.random.default_rng(0).standard_normal((32, 16, 16, 256)).astype("float32")
    y = np.asarray(group(x))
    # Weight standardization and gamma keep the scale; the max-pool raises it by about a third.
    assert 1.1 < y.var(axis=(0, 1, 2)).mean() < 1.6
    plain = ConvGroup(256, "gelu", pool_size=1)
    assert 0.8 < np.asarray(plain(x)).var(axis=(0, 1, 2)).mean() < 1.25


def speed_params(widths, num_classes=10, bn=False):
    """Parameters of the speed network, counted by hand."""
    params = 2 * 2 * 3 * 24 + 24 + 12  # whitening kernel (fixed), bias, eigenvalues (recorded)
    c = 24
    for w in widths:
        for cin in (c, w):
            params += 9 * cin * w
            # BatchNorm: gamma, beta, moving mean and variance (no conv bias); WSConv2D: gain and bias.
            params += 4 * w if bn else 2 * w
        c = w
    return params + c * num_classes


def speed_macs(widths, num_classes=10):
    size, c = 31, 24
    macs = 31 * 31 * 2 * 2 * 3 * 24
    for w in widths:
        macs += size * size * 9 * c * w
        size //= 2
        macs += size * size * 9 * w * w
        c = w
    return macs + c * num_classes


@pytest.fixture(scope="module")
def speed_models():
    return {"nf": nk.build_model("cifar_speed"), "bn": nk.build_model("cifar_speed", **nk.BATCHNORM_TWIN)}


def test_cifar_speed_has_airbench94_size_and_its_twin_the_same_convs(speed_models):
    nf, bn = speed_models["nf"], speed_models["bn"]
    assert nf.count_params() == speed_params((64, 256, 256))
    assert bn.count_params() == speed_params((64, 256, 256), bn=True)
    assert 1.9e6 < nf.count_params() < 2.1e6  # airbench94: about 2.0 M
    assert nk.count_macs(nf) == nk.count_macs(bn) == speed_macs((64, 256, 256))
    assert 0.23e9 < 2 * nk.count_macs(nf) < 0.25e9  # about 0.24 GFLOP per image
    assert nf.output_shape == (None, 10)
    assert [type(layer).__name__ for layer in nk.models.model_convs(bn)] == ["Conv2D"] * 6
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in nf._flatten_layers())


def test_cifar_speed_logits_are_the_classifier_times_one_ninth(speed_models):
    model = speed_models["nf"]
    features = keras.Model(model.inputs, model.get_layer("classifier").output)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(features(x)) / 9, rtol=1e-6)


def test_signal_propagation_tracks_the_groups(speed_models):
    x = np.random.default_rng(0).standard_normal((16, 32, 32, 3)).astype("float32")
    rows = nk.signal_propagation(speed_models["nf"], x)
    assert [r["block"] for r in rows] == ["stage1_group", "stage2_group", "stage3_group"]
    variances = [r["avg_var"] for r in rows]
    assert all(r["expected_var"] == 1.0 for r in rows)
    assert 1.0 < variances[0] < variances[1] < variances[2] < 4.0  # each max-pool raises it by ~1.3-1.5x


@pytest.mark.parametrize("override, message", [
    (dict(whitening_patch=0), "whitening_patch must be an int in"),
    (dict(logit_scale=0), "logit_scale must be a number > 0"),
    (dict(widths=()), "widths must be a non-empty sequence"),
    (dict(depths=(1, 1)), "Unknown override"),
])
def test_cifar_speed_rejects_bad_keys(override, message):
    with pytest.raises(ValueError, match=message):
        nk.build_model("tiny_speed", **override)


def test_adapt_model_adapts_the_stem_only(speed_models):
    model = nk.build_model("tiny_speed")
    assert nk.adapt_model(model, correlated_images(8, 32)) == ["stem_whitening"]
    assert nk.adapt_model(nk.build_model("tiny"), correlated_images(8, 32)) == []


# === The recipe ===


def test_triangle_schedule_values():
    schedule = Triangle(1.0, 100)
    values = [float(schedule(step)) for step in (0, 23, 100)]
    assert values == pytest.approx([0.2, 1.0, 0.07])
    assert float(schedule(11.5)) == pytest.approx(0.6)  # halfway up
    assert float(schedule(23 + 77 / 2)) == pytest.approx((1 + 0.07) / 2)  # halfway down
    config = TrainConfig(epochs=10, lr=0.4, schedule="triangle").validate()
    assert float(make_schedule(config, 49)(0)) == pytest.approx(0.08)
    assert Triangle.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_speed_recipe_sets_its_defaults_and_flags_win():
    config, _ = fit.parse_config(["--recipe", "speed", "--no-export"])
    assert (config.preset, config.epochs, config.batch_size, config.schedule) == ("cifar_speed_wider", 10, 128,
                                                                                 "triangle")
    assert nk.PRESETS[config.preset].widths == (192, 512, 512)
    assert (config.lr, config.weight_decay, config.momentum, config.agc) == (0.2, 5e-3, 0.9, 0.04)
    assert (config.label_smoothing, config.augment, config.tta, config.norm) == (0.2, "translate_altflip",
                                                                                 "flip_translate", "none")
    assert (config.optimizer, config.kernel_lr, config.kernel_momentum) == ("muon", 0.12, 0.6)
    assert config.ema == RECIPES["speed"]["ema"] > 0 and config.nesterov
    config, _ = fit.parse_config(["--recipe", "speed", "--norm", "batch", "--ema", "0", "--no-export"])
    assert config.norm == "batch" and config.ema == 0.0


def test_speed_twin_recipe_is_exactly_the_measured_twin_and_builds_it():
    twin, _ = fit.parse_config(["--recipe", "speed_twin", "--no-export"])
    spelled, _ = fit.parse_config(["--recipe", "speed", "--preset", "cifar_speed", "--norm", "batch",
                                   "--bn-momentum", "0.4", "--bn-epsilon",
                                   "1e-12", "--gain-lr-mult", "0", "--ema", "0", "--conv-init", "dirac",
                                   "--bias-lr-mult", "64", "--batch-size", "512", "--lr", "0.4", "--kernel-lr",
                                   "0.24", "--no-export"])
    assert twin.to_dict() | {"recipe": None} == spelled.to_dict() | {"recipe": None}
    assert twin.recipe == "speed_twin" and RECIPES["speed"]["ema"] > 0  # the NF recipe keeps its EMA
    assert twin.preset == "cifar_speed"  # airbench94's network, where the twin was measured
    model = network.build_for(dataclasses.replace(twin, preset="tiny_speed"), 10, (32, 32, 3))
    batchnorms = batchnorm_layers(model)
    assert batchnorms and all((b.momentum, b.epsilon) == (0.4, 1e-12) for b in batchnorms)
    convs = [conv for conv in model_convs(model) if not hasattr(conv, "adapt")]  # dirac: all but the stem
    assert convs and all(np.asarray(conv.kernel)[1, 1, 0, 0] == 1.0 for conv in convs)


def test_translate_flip_moves_each_image_by_at_most_two_pixels():
    images = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype("float32")
    out = np.asarray(make_augmenter("translate_flip", seed=1)(tf.constant(images)))
    moved = 0
    for x, y in zip(images, out):
        candidates = [np.roll(np.roll(v, dy, 0), dx, 1) for v in (x, x[:, ::-1])
                      for dy in range(-2, 3) for dx in range(-2, 3)]
        # Compare the interior (away from the reflected border).
        found = [np.allclose(c[2:-2, 2:-2], y[2:-2, 2:-2]) for c in candidates]
        assert any(found)
        moved += not found[12]  # candidate 12: the image itself
    assert moved > 32  # most images moved or mirrored


# === Test-time augmentation ===


def test_translate_views_move_by_one_pixel_with_reflected_borders():
    x = np.arange(2 * 4 * 4 * 1).reshape(2, 4, 4, 1).astype("uint8")
    down_right = TTA_VIEWS["translate(+1,+1)"](x)
    np.testing.assert_array_equal(down_right[:, 1:, 1:], x[:, :-1, :-1])
    np.testing.assert_array_equal(down_right[:, 0, 1:], x[:, 1, :-1])  # reflected row
    up_left = TTA_VIEWS["translate(-1,-1)"](x)
    np.testing.assert_array_equal(up_left[:, :-1, :-1], x[:, 1:, 1:])
    np.testing.assert_array_equal(TTA_VIEWS["mirror"](x), x[:, :, ::-1])


def test_tta_averages_the_views_of_its_policy():
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype="uint8")
    seen = []

    def predict(images):
        seen.append(images.copy())
        return images.reshape(len(images), -1)[:, :10].astype("float64")

    out = with_tta(predict, "flip_translate")(x)
    assert len(seen) == 6 == len(TTA_POLICY_VIEWS["flip_translate"])
    expected = np.mean([predict(TTA_VIEWS[v](x)) for v in TTA_POLICY_VIEWS["flip_translate"]], axis=0)
    np.testing.assert_allclose(out, expected)
    assert with_tta(predict, "none") is predict
    with pytest.raises(ValueError, match="Unknown test-time augmentation 'rot'"):
        with_tta(predict, "rot")


# === End to end: fit with the recipe, its BatchNorm twin, EMA, resume, evaluate ===

SPEED = ["--recipe", "speed", "--preset", "tiny_speed", "--batch-size", "64", "--val-size", "128",
         "--precision", "float32", "--quiet", "--no-export"]


def run_fit(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory, synthetic_cifar_dir):
    run_dir = tmp_path_factory.mktemp("speed") / "run"
    result = run_fit([*SPEED, "--epochs", "2", "--train-limit", "256", "--run-dir", str(run_dir),
                      "--data-dir", synthetic_cifar_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_speed_fit_adapts_the_stem_reports_tta_and_ends_with_the_average(speed_run):
    import json

    run_dir, result = speed_run
    assert "Adapted stem_whitening to 256 training images." in result.stdout
    with open(run_dir / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["tta"] == "flip_translate" and metrics["tta_views"] == list(TTA_POLICY_VIEWS["flip_translate"])
    line = "flip_translate test-time augmentation (6 views: identity, mirror, translate(-1,-1)"
    assert line in result.stdout and f"{metrics['test_accuracy_tta']:.4f}" in result.stdout
    # The signal-propagation profile (TensorBoard's plot) follows the three groups.
    assert [row["block"] for row in metrics["signal_propagation"]["start"]] == [
        "stage1_group", "stage2_group", "stage3_group"]
    model = keras.saving.load_model(run_dir / "model.keras", compile=True)
    stem = model.get_layer("stem_whitening")
    assert np.asarray(stem.eigenvalues)[0] > 2 * np.asarray(stem.eigenvalues)[-1]  # adapted, not the identity
    # The saved model holds the optimizers' moving average of the weights (Muon's for the conv kernels,
    # SGD's for the rest).
    pairs = [(variable, average) for optimizer in model.optimizer.optimizers
             for variable, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)]
    assert len(pairs) == len(model.trainable_variables)
    for variable, average in pairs:
        np.testing.assert_allclose(np.asarray(variable), np.asarray(average), rtol=1e-6, atol=1e-7)


def test_evaluate_with_flip_translate_tta(speed_run, synthetic_cifar_dir, capsys, tmp_path):
    run_dir, _ = speed_run
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(run_dir / "model.keras"), "--data-dir", synthetic_cifar_dir,
                          "--tta", "flip_translate", "--json", str(out)]) == 0
    assert "test-time augmentation: flip_translate" in capsys.readouterr().out
    import json

    with open(out) as f:
        assert json.load(f)["tta_views"] == list(TTA_POLICY_VIEWS["flip_translate"])


def test_a_resumed_ema_run_continues_from_the_raw_weights_and_the_same_average(tmp_path):
    """The checkpoint is written before the average is swapped in: the raw weights resume as weights."""
    from nfnet_keras import training
    from nfnet_keras.callbacks import EpochCheckpoint

    config = TrainConfig(preset="tiny_speed", epochs=2, batch_size=32, lr=0.05, ema=0.5, schedule="constant",
                         precision="float32").validate()
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 64))
    ds = tf.data.Dataset.from_tensor_slices(data).batch(32)

    def compiled():
        keras.utils.set_random_seed(0)
        return training.compile_model(training.build_for(config), config, steps_per_epoch=2)

    before = WeightsAt(stop=True)
    with pytest.raises(StopTraining):
        training.fit_model(compiled(), config, ds, ds, callbacks=[before, EpochCheckpoint(str(tmp_path))], verbose=0)
    # the average differs from the weights
    assert any(not np.allclose(r, a) for r, a in zip(before.trainable, before.averages, strict=True))

    after = WeightsAt(at_epoch_end=False)
    training.fit_model(compiled(), config, ds, ds, callbacks=[after, EpochCheckpoint(str(tmp_path))], verbose=0)
    for saved, restored in zip((before.weights, before.averages), (after.weights, after.averages), strict=True):
        assert len(saved) == len(restored) > 0
        for x, y in zip(saved, restored, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_batchnorm_twin_trains_through_the_same_command(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "bn"
    result = run_fit([*SPEED, "--norm", "batch", "--epochs", "1", "--train-limit", "128", "--run-dir", str(run_dir),
                      "--data-dir", synthetic_cifar_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 6  # two per group
    assert all(type(conv) is keras.layers.Conv2D for conv in nk.models.model_convs(model))


def test_speed_runs_benchmark_summarises_finished_runs(tmp_path, capsys):
    import json

    from benchmarks import speed_runs

    def write_run(name, norm, seed, val, seconds, test, tta):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        metrics = dict(config=dict(TrainConfig(norm=norm, seed=seed).to_dict()), history=dict(val_accuracy=val),
                       seconds_per_epoch=seconds, epochs_completed=len(val), test_accuracy=test,
                       test_accuracy_flip_tta=test + 0.002, tta="flip_translate", test_accuracy_tta=tta,
                       diverged=False)
        (folder / "metrics.json").write_text(json.dumps(metrics))

    write_run("nf_seed0", "none", 0, [0.90, 0.941, 0.945], [10.0, 20.0, 30.0], 0.939, 0.944)
    write_run("nf_seed1", "none", 1, [0.90, 0.93, 0.939], [10.0, 20.0, 30.0], 0.935, 0.940)
    write_run("bn_seed0", "batch", 0, [0.95, 0.95, 0.95], [11.0, 11.0, 11.0], 0.95, 0.951)
    out = tmp_path / "results" / "speed"  # created by the benchmark
    code = speed_runs.main(["--seeds", "0,1", "--bn-seeds", "0", "--runs-dir", str(tmp_path / "runs"),
                            "--out-dir", str(out), "--collect-only", "--tag", "t"])
    assert code == 0
    payload = json.loads((out / "speed_recipe_t.json").read_text())
    rows = {r["run"]: r for r in payload["runs"]}
    assert (rows["nf_seed0"]["first_epoch_at_threshold"], rows["nf_seed0"]["seconds_to_threshold"]) == (2, 30.0)
    assert rows["nf_seed1"]["first_epoch_at_threshold"] is None
    # 940 of 1,000 validation images, as Keras logs it (float32), reaches a threshold of 0.94
    logged = float(np.float32(940 / 1000))
    assert logged < 0.94 and speed_runs.first_reached({"val_accuracy": [0.93, logged]}, [5.0, 6.0], 0.94) == (2, 11.0)
    assert rows["bn_seed0"]["train_seconds"] == 33.0
    assert payload["summary"]["nf_test_accuracy_tta_mean"] == pytest.approx(0.942)
    assert payload["summary"]["bn_test_accuracy_mean"] == pytest.approx(0.95)
    assert payload["summary"]["nf_test_accuracy_flip_tta_mean"] == pytest.approx(0.939)
    assert sorted(p.name for p in out.iterdir()) == [
        "speed_recipe_t.json", "speed_recipe_t_bn_seed0_metrics.json", "speed_recipe_t_nf_seed0_metrics.json",
        "speed_recipe_t_nf_seed1_metrics.json"]
    assert "nf_seed1" in capsys.readouterr().out


def test_speed_runs_row_flags_come_before_the_extra_flags(tmp_path, monkeypatch):
    from benchmarks import speed_jax, speed_runs

    commands = []
    monkeypatch.setattr(speed_runs.subprocess, "call", lambda command, cwd: commands.append(command) or 3)
    code = speed_runs.main(["--seeds", "4", "--bn-seeds", "", "--runs-dir", str(tmp_path / "runs"),
                            "--out-dir", str(tmp_path / "out"), "--row", "wider_b128", "--", "--jit"])
    assert code == 1  # the fit's failure is reported, not hidden
    [command] = commands
    tail = command[command.index("--quiet") + 1:]
    assert tail == [*speed_jax.ROWS["wider_b128"], "--jit"]
    assert tail[:2] == ["--preset", "cifar_speed_wider"]
    assert command[command.index("--seed") + 1] == "4" and command[command.index("--norm") + 1] == "none"
