"""build_model, presets and count_macs (nfnet_keras/model.py, presets.py, flops.py)."""

import math

import numpy as np
import pytest

import keras
from nfnet_keras import PRESETS, NFBlock, WSConv2D, build_model, count_macs
from nfnet_keras.model import nf_blocks

from conftest import assert_same_weights, keras_roundtrip


def to_np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def seed_model():
    keras.utils.set_random_seed(0)
    return build_model("seed")


# === The seed preset ===


def test_seed_parameter_count(seed_model):
    # The figure we report. Weights only: no optimizer, no non-trainable state.
    assert seed_model.count_params() == 741_641
    assert sum(math.prod(v.shape) for v in seed_model.trainable_weights) == 741_641


def test_seed_block_names_and_variance_schedule(seed_model):
    blocks = nf_blocks(seed_model)
    assert [b.name for b in blocks] == [f"stage{s}_block{j}" for s in (1, 2, 3) for j in range(1, 6)]
    assert [b.transition for b in blocks] == [j == 0 for _ in range(3) for j in range(5)]
    assert [b.strides for b in blocks[::5]] == [1, 2, 2]
    # Input variance of each block: 1 at the first, then +alpha^2 per block;
    # each stage's first block resets its output to 1 + alpha^2.
    expected_in = [1.0, 1.04, 1.08, 1.12, 1.16, 1.2, 1.04, 1.08, 1.12, 1.16, 1.2, 1.04, 1.08, 1.12, 1.16]
    assert [b.expected_var for b in blocks] == pytest.approx(expected_in)
    assert all(b.alpha == 0.2 and b.activation == "relu" and b.se is None for b in blocks)
    assert [b.filters for b in blocks[::5]] == [64, 128, 256] and blocks[0].width == 16
    assert seed_model.get_layer("stem_conv1").filters == 16
    assert seed_model.output_shape == (None, 10)


def test_classifier_init(seed_model):
    classifier = seed_model.get_layer("classifier")
    kernel = to_np(classifier.kernel)
    assert kernel.shape == (256, 10)
    # 2,560 draws of N(0, 0.01): the sample std is within ~1.4% of 0.01 (1 sd).
    assert kernel.std() == pytest.approx(0.01, rel=0.06)
    assert abs(kernel.mean()) < 0.001
    np.testing.assert_array_equal(to_np(classifier.bias), 0.0)


def test_seed_macs(seed_model):
    assert count_macs(seed_model) == 109_234_688  # ~109.23 M multiply-adds per image
    assert count_macs(seed_model) == hand_macs(PRESETS["seed"])


# === MAC counts, by hand ===


def hand_macs(preset, size=32, channels=3, num_classes=10):
    """Multiply-adds from the preset's numbers alone (no model), 'same' padding."""
    macs, hw, c = 0, size, channels
    for width, stride in zip(preset["stem_widths"], preset["stem_strides"]):
        hw = -(-hw // stride)
        macs += hw * hw * 9 * c * width
        c = width
    gw = preset["group_width"]
    for filters, depth, stride in zip(preset["widths"], preset["depths"], preset["strides"]):
        for j in range(depth):
            s = stride if j == 0 else 1
            width = round(filters * preset["bottleneck_ratio"])
            groups = width // gw if gw else 1
            out = -(-hw // s)
            macs += hw * hw * c * width  # conv0, 1x1 at the input resolution
            macs += 2 * out * out * 9 * (width // groups) * width  # conv1 (strided), conv1b
            macs += out * out * width * filters  # conv2
            macs += 2 * filters * int(filters * preset["se_ratio"])  # SE's two dense layers
            if j == 0:
                macs += out * out * c * filters  # the shortcut's 1x1 conv, after the pool
            hw, c = out, filters
    if preset["final_conv_multiplier"]:
        macs += hw * hw * c * c * preset["final_conv_multiplier"]
        c *= preset["final_conv_multiplier"]
    return macs + c * num_classes


def test_tiny_macs_by_hand():
    # tiny: stem 3x3 3->8 at 32x32; stage1 block (8->16, width 4, stride 1);
    # stage2 block (16->32, width 8, stride 2); classifier 32->10.
    stem = 32 * 32 * 9 * 3 * 8  # 221,184
    stage1 = 32 * 32 * (8 * 4 + 2 * 9 * 4 * 4 + 4 * 16 + 8 * 16)  # 393,216
    stage2 = 32 * 32 * 16 * 8 + 16 * 16 * (2 * 9 * 8 * 8 + 8 * 32 + 16 * 32)  # 753,664
    classifier = 32 * 10
    assert count_macs(build_model("tiny")) == stem + stage1 + stage2 + classifier == 1_368_384


def test_tiny_grouped_macs_match_hand_count():
    assert count_macs(build_model("tiny_grouped")) == hand_macs(PRESETS["tiny_grouped"])


def test_count_macs_needs_a_fixed_input_size():
    with pytest.raises(ValueError, match="fixed input_shape"):
        count_macs(build_model("tiny", input_shape=(None, None, 3)))


# === Other presets and input sizes ===


def test_nfnet_f0_builds_at_64x64():
    model = build_model("nfnet_f0", num_classes=1000, input_shape=(64, 64, 3))
    assert model.input_shape == (None, 64, 64, 3)
    # NFNet-F0 has 71.5 M parameters (Brock et al. 2021, 2102.06171, Table 3).
    assert model.count_params() == pytest.approx(71.5e6, rel=0.002)
    blocks = nf_blocks(model)
    assert len(blocks) == 12 and blocks[-1].name == "stage4_block3"
    assert blocks[0].groups == 1 and blocks[-1].groups == 6  # group width 128
    assert count_macs(model) == hand_macs(PRESETS["nfnet_f0"], size=64, num_classes=1000)
    out = to_np(model(np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype("float32")))
    assert out.shape == (1, 1000) and np.isfinite(out).all()


def test_variable_input_size_and_overrides():
    model = build_model("tiny", num_classes=3, input_shape=(None, None, 3), depths=(2, 1), widths=(8, 16))
    assert [b.name for b in nf_blocks(model)] == ["stage1_block1", "stage1_block2", "stage2_block1"]
    for size in (24, 40):
        assert model(np.zeros((2, size, size, 3), "float32")).shape == (2, 3)


def test_tiny_grouped_stochastic_depth_rates_grow_linearly():
    blocks = nf_blocks(build_model("tiny_grouped"))
    assert [b.stochastic_depth_rate for b in blocks] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3])
    assert all(b.se is not None and b.groups == b.width // 8 for b in blocks)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="Unknown preset 'resnet50'") as info:
        build_model("resnet50")
    for name in ("seed", "tiny", "tiny_grouped", "cifar_wide", "nfnet_f0", "nfnet_f6"):
        assert name in str(info.value)


def test_unknown_override_names_the_allowed_keys():
    with pytest.raises(ValueError, match="Unknown override.*'depth'") as info:
        build_model("tiny", depth=(1, 1))
    assert "depths" in str(info.value) and "widths" in str(info.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(depths=(0, 1)), "depths"),
        (dict(widths=(16,)), "one per stage"),
        (dict(strides=(1, 3)), "strides"),
        (dict(activation="rleu"), "Unknown activation"),
        (dict(alpha=0.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(se_ratio=2.0), "se_ratio"),
        (dict(num_classes=0), "num_classes"),
        (dict(input_shape=(32, 32)), "input_shape"),
    ],
)
def test_bad_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model("tiny", **overrides)


def test_overrides_do_not_modify_the_presets():
    # Overrides act on a copy: the preset table itself is not modified.
    build_model("tiny", depths=(2, 2))
    assert PRESETS["tiny"]["depths"] == (1, 1)


# === The .keras round trip of a trained model ===


@pytest.fixture(scope="module", params=["tiny", "tiny_grouped"])
def trained(request):
    """(model after 4 training steps, its initial weights by path, a batch) for a tiny preset.

    Adam, not SGD: with skip gains starting at 0 and a N(0, 0.01) classifier the
    residual branches' gradients are ~1e-9 for the first steps, and an SGD step
    on a gain of 1 that small is lost to float32 rounding; Adam's steps are ~lr.
    """
    keras.utils.set_random_seed(0)
    model = build_model(request.param)
    initial = {v.path: to_np(v).copy() for v in model.weights}
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 steps
    return model, initial, x


def test_training_moves_gains_and_skip_gains(trained):
    model, initial, _ = trained
    convs = [v for v in model.weights if v.path.endswith("/gain")]
    skips = [v for v in model.weights if v.path.endswith("/skip_gain")]
    # Every WS conv: the stem, each block's five (four in the branch and the
    # shortcut), and tiny_grouped's final conv.
    assert len(convs) == sum(isinstance(layer, WSConv2D) for layer in model.layers) + sum(
        len([w for w in b.weights if w.path.endswith("/gain")]) for b in nf_blocks(model)
    )
    assert len(skips) == len(nf_blocks(model))
    for v in skips:
        assert float(to_np(v)) != 0.0, v.path
    for v in convs:
        assert not np.array_equal(to_np(v), initial[v.path]), f"{v.path} did not move"
        assert np.abs(to_np(v) - 1.0).max() > 1e-6, v.path


def test_keras_roundtrip_of_trained_model(trained, tmp_path):
    model, _, x = trained
    loaded = keras_roundtrip(model, tmp_path)
    assert loaded.name == model.name and len(loaded.layers) == len(model.layers)
    assert_same_weights(model, loaded)
    np.testing.assert_allclose(
        loaded.predict(x, batch_size=16, verbose=0), model.predict(x, batch_size=16, verbose=0), atol=1e-6
    )
    assert [b.expected_var for b in nf_blocks(loaded)] == [b.expected_var for b in nf_blocks(model)]
    # The optimizer came back with its state.
    assert type(loaded.optimizer) is type(model.optimizer)
    assert int(to_np(loaded.optimizer.iterations)) == int(to_np(model.optimizer.iterations)) == 4


# === Batch independence (what BatchNorm breaks) ===


@pytest.fixture(scope="module")
def live_seed_features():
    """The seed model with skip gains 1 (residual branches on), returning (pooled features, logits)."""
    keras.utils.set_random_seed(2)
    model = build_model("seed")
    for block in nf_blocks(model):
        block.skip_gain.assign(1.0)
    return keras.Model(model.input, [model.get_layer("pool").output, model.output])


def _assert_batch_independent(model, training):
    rng = np.random.default_rng(3)
    image = rng.standard_normal((1, 32, 32, 3)).astype("float32")
    batch = rng.standard_normal((12, 32, 32, 3)).astype("float32")
    batch[7] = image[0]
    alone = [to_np(t) for t in model(image, training=training)]
    inside = [to_np(t) for t in model(batch, training=training)]
    for a, b in zip(alone, inside):
        np.testing.assert_allclose(b[7], a[0], rtol=0, atol=1e-5)
    # Another batch around it (twice the size) changes nothing either.
    other = rng.standard_normal((24, 32, 32, 3)).astype("float32") * 3.0 + 1.0
    other[0] = image[0]
    for a, b in zip(alone, [to_np(t) for t in model(other, training=training)]):
        np.testing.assert_allclose(b[0], a[0], rtol=0, atol=1e-5)
    return alone


@pytest.mark.parametrize("training", [False, True])
def test_predictions_do_not_depend_on_the_batch(live_seed_features, training):
    features, logits = _assert_batch_independent(live_seed_features, training)
    assert np.abs(features).mean() > 0.01  # a non-trivial signal was compared


def test_batch_independence_check_catches_batchnorm():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    bn_model = keras.Model(inputs, [x, keras.layers.Dense(2)(x)])
    with pytest.raises(AssertionError):
        _assert_batch_independent(bn_model, training=True)


# === Training on real CIFAR-10 ===


@pytest.mark.slow
def test_tiny_learns_on_real_cifar10(cifar_dir):
    from nfnet_keras.data import load_cifar10, make_dataset, preprocess

    (x_train, y_train), _ = load_cifar10(cifar_dir)
    x, y = x_train[:1536], y_train[:1536]
    keras.utils.set_random_seed(0)
    model = build_model("tiny")
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    probe_x, probe_y = preprocess(x[:512]), y[:512]
    before = model.evaluate(probe_x, probe_y, batch_size=256, verbose=0)
    assert before == pytest.approx(math.log(10), abs=0.02)  # small classifier init: uniform
    # 48 steps; the dataset shuffles itself (shuffle=False only silences a Keras warning).
    model.fit(make_dataset(x, y, 32, training=True, seed=0), epochs=1, shuffle=False, verbose=0)
    after = model.evaluate(probe_x, probe_y, batch_size=256, verbose=0)
    # Measured 2.30 -> 2.07..2.15 over three seeds.
    assert after < before - 0.08, (before, after)


def test_conv_bias_false_drops_every_conv_bias_and_round_trips(tmp_path):
    # The benchmarks' fastest float32 variant (README, Benchmarks): 4,384 fewer
    # parameters than `seed`, one bias vector per WS conv.
    model = build_model("tiny_grouped", conv_bias=False)
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, WSConv2D)]
    assert convs and all(not conv.use_bias for conv in convs)
    assert build_model("seed", conv_bias=False).count_params() == 737_257
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    reloaded = keras_roundtrip(model, tmp_path)
    np.testing.assert_allclose(reloaded(x), model(x), atol=1e-6)
