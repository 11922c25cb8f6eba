"""build_model, the typed presets and count_macs (nfnet_keras/models: registry, nf_resnet, flops)."""

import dataclasses
import math
import os

import keras
import numpy as np
import pytest

from nfnet_keras import (
    BATCHNORM_TWIN,
    GAMMAS,
    PRESETS,
    NFBlock,
    PreActBottleneck,
    ScaledActivation,
    SqueezeExcite,
    WSConv2D,
    build_model,
    count_macs,
)
from nfnet_keras.layers import NormActivation
from nfnet_keras.models import NFResNetConfig, model_convs, resolve_config
from nfnet_keras.models import signal_blocks as nf_blocks

from conftest import assert_same_weights, keras_roundtrip, run_layer_test


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def preset_values(name):
    """A preset's values as a dict, for the hand counts below."""
    return dataclasses.asdict(PRESETS[name])


@pytest.fixture(scope="module")
def report_model():
    keras.utils.set_random_seed(0)
    return build_model("report_resnet")


# === Parameter counts, by hand ===


def ws_conv_params(kernel_size, in_channels, out_channels, groups=1, bias=True):
    """A WS conv's weights: kernel, bias (if any) and one gain per output channel."""
    kernel = kernel_size * kernel_size * (in_channels // groups) * out_channels
    return kernel + (out_channels if bias else 0) + out_channels


def hand_params(preset, num_classes=10, channels=3):
    """Parameters of the NF network from the preset's numbers alone (no model)."""
    bias, gw, ratio = preset["conv_bias"], preset["group_width"], preset["bottleneck_ratio"]
    total, c = 0, channels
    for width in preset["stem_widths"]:
        total += ws_conv_params(3, c, width, bias=bias)
        c = width
    for filters, depth in zip(preset["widths"], preset["depths"]):
        for j in range(depth):
            width = round(filters * ratio)
            groups = width // gw if gw else 1
            total += ws_conv_params(1, c, width, bias=bias)  # conv0
            total += 2 * ws_conv_params(3, width, width, groups, bias)  # conv1, conv1b
            total += ws_conv_params(1, width, filters, bias=bias)  # conv2
            if j == 0:
                total += ws_conv_params(1, c, filters, bias=bias)  # the shortcut conv
            if preset["se_ratio"]:
                hidden = int(filters * preset["se_ratio"])
                total += 2 * filters * hidden + hidden + filters  # SE: two dense layers
            total += 1  # skip gain
            c = filters
    if preset["final_conv_multiplier"]:
        total += ws_conv_params(1, c, c * preset["final_conv_multiplier"], bias=bias)
        c *= preset["final_conv_multiplier"]
    return total + c * num_classes + num_classes


def test_report_resnet_parameter_count_by_hand(report_model):
    # Stem 3x3 3 -> 16; per stage (filters, 3x3 width): (64, 16), (128, 32),
    # (256, 64); the first block of a stage also has a 1x1 shortcut conv.
    stem = ws_conv_params(3, 3, 16)
    stage1 = (ws_conv_params(1, 16, 16) + 2 * ws_conv_params(3, 16, 16) + ws_conv_params(1, 16, 64)
              + ws_conv_params(1, 16, 64) + 1)
    stage1 += 4 * (ws_conv_params(1, 64, 16) + 2 * ws_conv_params(3, 16, 16) + ws_conv_params(1, 16, 64) + 1)
    stage2 = (ws_conv_params(1, 64, 32) + 2 * ws_conv_params(3, 32, 32) + ws_conv_params(1, 32, 128)
              + ws_conv_params(1, 64, 128) + 1)
    stage2 += 4 * (ws_conv_params(1, 128, 32) + 2 * ws_conv_params(3, 32, 32) + ws_conv_params(1, 32, 128) + 1)
    stage3 = (ws_conv_params(1, 128, 64) + 2 * ws_conv_params(3, 64, 64) + ws_conv_params(1, 64, 256)
              + ws_conv_params(1, 128, 256) + 1)
    stage3 += 4 * (ws_conv_params(1, 256, 64) + 2 * ws_conv_params(3, 64, 64) + ws_conv_params(1, 64, 256) + 1)
    classifier = 256 * 10 + 10
    assert (stem, stage1, stage2, stage3, classifier) == (464, 34_789, 141_765, 562_053, 2_570)
    assert report_model.count_params() == stem + stage1 + stage2 + stage3 + classifier
    assert report_model.count_params() == hand_params(preset_values("report_resnet"))


@pytest.mark.parametrize("preset", ["tiny", "tiny_grouped", "cifar_wide"])
def test_parameter_count_matches_the_hand_formula(preset):
    assert build_model(preset).count_params() == hand_params(preset_values(preset))


# NFNet-F0 ... F6 at 1000 classes, millions of parameters (Brock et al. 2021,
# arXiv 2102.06171, Table 3), as rounded there.
PAPER_NFNET_F_PARAMS_M = (71.5, 132.6, 193.8, 254.9, 316.1, 377.2, 438.4)


@pytest.mark.parametrize("k", range(7))
def test_nfnet_f_preset_parameter_counts_match_the_paper(k):
    # From the preset's numbers by the hand formula, which the built F0 (below)
    # and the CIFAR presets (above) match exactly; the slow test builds F1-F6.
    params = hand_params(preset_values(f"nfnet_f{k}"), num_classes=1000)
    assert abs(params / 1e6 - PAPER_NFNET_F_PARAMS_M[k]) <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize("k", range(1, 7))
def test_built_nfnet_f_parameter_counts_match_the_paper(k):
    model = build_model(f"nfnet_f{k}", num_classes=1000, input_shape=(None, None, 3))
    params = model.count_params()
    del model
    keras.backend.clear_session()
    assert abs(params / 1e6 - PAPER_NFNET_F_PARAMS_M[k]) <= 0.05


# === The report's network ===


def test_report_resnet_parameter_count(report_model):
    # The figure we report. Weights only: no optimizer, no non-trainable state.
    assert report_model.count_params() == 741_641
    assert sum(math.prod(v.shape) for v in report_model.trainable_weights) == 741_641


def test_report_resnet_block_names_and_variance_schedule(report_model):
    blocks = nf_blocks(report_model)
    assert [b.name for b in blocks] == [f"stage{s}_block{j}" for s in (1, 2, 3) for j in range(1, 6)]
    assert [b.transition for b in blocks] == [j == 0 for _ in range(3) for j in range(5)]
    assert [b.strides for b in blocks[::5]] == [1, 2, 2]
    # Input variance of each block: 1 at the first, then +alpha^2 per block;
    # each stage's first block resets its output to 1 + alpha^2.
    expected_in = [1.0, 1.04, 1.08, 1.12, 1.16, 1.2, 1.04, 1.08, 1.12, 1.16, 1.2, 1.04, 1.08, 1.12, 1.16]
    assert [b.expected_var for b in blocks] == pytest.approx(expected_in)
    assert all(b.alpha == 0.2 and b.activation == "relu" and b.se is None for b in blocks)
    assert [b.filters for b in blocks[::5]] == [64, 128, 256] and blocks[0].width == 16
    assert report_model.get_layer("stem_conv1").filters == 16
    assert report_model.output_shape == (None, 10)


def test_classifier_init(report_model):
    classifier = report_model.get_layer("classifier")
    kernel = to_np(classifier.kernel)
    assert kernel.shape == (256, 10)
    # 2,560 draws of N(0, 0.01): the sample std is within ~1.4% of 0.01 (1 sd).
    assert kernel.std() == pytest.approx(0.01, rel=0.06)
    assert abs(kernel.mean()) < 0.001
    np.testing.assert_array_equal(to_np(classifier.bias), 0.0)


def test_report_resnet_macs(report_model):
    assert count_macs(report_model) == 109_234_688  # ~109.23 M multiply-adds per image
    assert count_macs(report_model) == hand_macs(preset_values("report_resnet"))


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
    assert count_macs(build_model("tiny_grouped")) == hand_macs(preset_values("tiny_grouped"))


def test_count_macs_needs_a_fixed_input_size():
    with pytest.raises(ValueError, match="fixed input_shape"):
        count_macs(build_model("tiny", input_shape=(None, None, 3)))


# === Other presets and input sizes ===


def test_nfnet_f0_builds_at_64x64():
    model = build_model("nfnet_f0", num_classes=1000, input_shape=(64, 64, 3))
    assert model.input_shape == (None, 64, 64, 3)
    # NFNet-F0 has 71.5 M parameters (Brock et al. 2021, 2102.06171, Table 3).
    assert model.count_params() == pytest.approx(71.5e6, rel=0.002)
    assert abs(model.count_params() / 1e6 - PAPER_NFNET_F_PARAMS_M[0]) <= 0.05
    assert model.count_params() == hand_params(preset_values("nfnet_f0"), num_classes=1000)
    blocks = nf_blocks(model)
    assert len(blocks) == 12 and blocks[-1].name == "stage4_block3"
    assert blocks[0].groups == 1 and blocks[-1].groups == 6  # group width 128
    assert count_macs(model) == hand_macs(preset_values("nfnet_f0"), size=64, num_classes=1000)
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
    assert str(info.value) == (
        "Unknown preset 'resnet50'. Use one of: report_resnet, cifar_wide, tiny, tiny_grouped, "
        "nfnet_f0, nfnet_f1, nfnet_f2, nfnet_f3, nfnet_f4, nfnet_f5, nfnet_f6, cifar_speed, cifar_speed_wide, "
        "cifar_speed_wider, tiny_speed."
    )


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
    assert PRESETS["tiny"].depths == (1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].depths = (2, 2)


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
def live_report_features():
    """The report's model with skip gains 1 (residual branches on), returning (pooled features, logits)."""
    keras.utils.set_random_seed(2)
    model = build_model("report_resnet")
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
def test_predictions_do_not_depend_on_the_batch(live_report_features, training):
    features, logits = _assert_batch_independent(live_report_features, training)
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
    # parameters than `report_resnet`, one bias vector per WS conv.
    model = build_model("tiny_grouped", conv_bias=False)
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, WSConv2D)]
    assert convs and all(not conv.use_bias for conv in convs)
    assert build_model("report_resnet", conv_bias=False).count_params() == 737_257
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    reloaded = keras_roundtrip(model, tmp_path)
    np.testing.assert_allclose(reloaded(x), model(x), atol=1e-6)


# === Preset names ===


def test_presets_are_typed_configs_checked_when_made():
    assert all(isinstance(PRESETS[name], NFResNetConfig) for name in ("report_resnet", "tiny", "nfnet_f6"))
    assert PRESETS["report_resnet"] == NFResNetConfig()  # the report's network is the family's default
    with pytest.raises(ValueError) as info:
        NFResNetConfig(widths=(16,), depths=(1, 1), strides=(1, 2))
    assert str(info.value).startswith("widths, depths and strides must have the same length")
    with pytest.raises(ValueError, match="Unknown preset 'seed'"):  # the report's network is `report_resnet`
        build_model("seed")


def test_model_name_argument():
    assert build_model("tiny", name="my_net").name == "my_net"


# === Every preset key checked in resolve_config ===

_ACTIVATIONS = ", ".join(sorted(GAMMAS))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(group_width=0), "group_width must be a positive int or None, got 0."),
        (dict(group_width=2.0), "group_width must be a positive int or None, got 2.0."),
        (dict(group_width=True), "group_width must be a positive int or None, got True."),
        (dict(group_width=3), "group_width 3 does not divide the 3x3 conv width 4 of stage 1 (16 x "
                              "bottleneck_ratio 0.25); use None or a divisor of every stage's 3x3 conv width."),
        (dict(widths=(16, 24), group_width=4), "group_width 4 does not divide the 3x3 conv width 6 of stage 2 "
                                              "(24 x bottleneck_ratio 0.25); use None or a divisor of every "
                                              "stage's 3x3 conv width."),
        (dict(final_conv_multiplier=-1), "final_conv_multiplier must be a number >= 0 (0: no final conv), got -1."),
        (dict(final_conv_multiplier="2"), "final_conv_multiplier must be a number >= 0 (0: no final conv), got '2'."),
        (dict(final_conv_multiplier=0.01), "final_conv_multiplier 0.01 gives the final conv 0 channels (32 x 0.01); "
                                           "use 0 (no final conv) or a value giving at least 1."),
        (dict(bottleneck_ratio=0.01), "bottleneck_ratio 0.01 rounds the 3x3 conv width of stage 1 (16 x 0.01) to 0; "
                                      "it must give at least 1 channel."),
        (dict(bottleneck_ratio=0), "bottleneck_ratio must be a number in (0, 1], got 0."),
        (dict(bottleneck_ratio=1.5), "bottleneck_ratio must be a number in (0, 1], got 1.5."),
        (dict(conv_bias="yes"), "conv_bias must be True or False, got 'yes'."),
        (dict(shortcut_pool=1), "shortcut_pool must be True or False, got 1."),
        (dict(head_activation=None), "head_activation must be True or False, got None."),
        (dict(alpha="0.2"), "alpha must be a number > 0, got '0.2'."),
        (dict(alpha=0.0), "alpha must be a number > 0, got 0.0."),
        (dict(alpha=True), "alpha must be a number > 0, got True."),
        (dict(alpha=float("nan")), "alpha must be a number > 0, got nan."),
        (dict(se_ratio=-0.1), "se_ratio must be a number in [0, 1] (0: no Squeeze-Excite), got -0.1."),
        (dict(stochastic_depth_rate=1.0), "stochastic_depth_rate must be a number in [0, 1), got 1.0."),
        (dict(dropout="0.1"), "dropout must be a number in [0, 1), got '0.1'."),
        (dict(activation="rleu"), f"Unknown activation 'rleu'. Use one of: {_ACTIVATIONS}."),
        (dict(activation=3), f"Unknown activation 3. Use one of: {_ACTIVATIONS}."),
        (dict(widths=(16, 0)), "widths must be a non-empty sequence of positive ints, got (16, 0)."),
        (dict(widths=()), "widths must be a non-empty sequence of positive ints, got ()."),
        (dict(depths=(1, 1.5)), "depths must be a non-empty sequence of positive ints, got (1, 1.5)."),
        (dict(depths=(True, 1)), "depths must be a non-empty sequence of positive ints, got (True, 1)."),
        (dict(stem_widths="8"), "stem_widths must be a non-empty sequence of positive ints, got '8'."),
        (dict(strides=(1, 3)), "strides must be 1 or 2 each, got (1, 3)."),
        (dict(stem_strides=(4,)), "stem_strides must be 1 or 2 each, got (4,)."),
        (dict(widths=(16,)), "widths, depths and strides must have the same length (one per stage), got "
                             "widths (16,), depths (1, 1) and strides (1, 2)."),
        (dict(stem_widths=(8, 8)), "stem_widths and stem_strides must have the same length (one per stem conv), "
                                   "got stem_widths (8, 8) and stem_strides (1,)."),
    ],
    ids=lambda v: ",".join(f"{k}={x!r}" for k, x in v.items()) if isinstance(v, dict) else "message",
)
def test_resolve_config_names_the_bad_key_value_and_allowed(overrides, message):
    with pytest.raises(ValueError) as info:
        resolve_config("tiny", overrides)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        build_model("tiny", **overrides)
    assert str(info.value) == message


def test_resolve_config_returns_tuples_and_accepts_lists():
    config = resolve_config("report_resnet", {"widths": [32, 64, 128], "depths": [2, 2, 2]})
    assert config.widths == (32, 64, 128) and config.depths == (2, 2, 2)
    assert resolve_config("tiny", {"widths": 16, "depths": 1, "strides": 1}).widths == (16,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(conv_layer=keras.layers.Dense), "conv_layer must be a keras.layers.Conv2D subclass or its registered "
                                              "name, got <class 'keras.src.layers.core.dense.Dense'>."),
        (dict(conv_layer="NoSuchConv"), "conv_layer must be a keras.layers.Conv2D subclass or its registered name, "
                                        "got 'NoSuchConv'."),
        (dict(norm_layer="batchnorm"), "norm_layer must be a keras.layers.Layer subclass or its registered name, "
                                       "got 'batchnorm'."),
        (dict(num_classes=True), "num_classes must be a positive int, got True."),
    ],
)
def test_bad_layer_classes_raise(kwargs, message):
    with pytest.raises(ValueError) as info:
        build_model("tiny", **kwargs)
    assert str(info.value) == message


# === The head, and cifar_wide as built ===


def _features_and_head(model, last_block):
    """(the last block's output, the classifier's kernel and bias) of `model` on a batch."""
    for block in nf_blocks(model):
        block.skip_gain.assign(1.0)
    x = np.random.default_rng(6).standard_normal((3, 32, 32, 3)).astype("float32")
    features = to_np(keras.Model(model.input, model.get_layer(last_block).output)(x)).astype("float64")
    classifier = model.get_layer("classifier")
    return x, features, to_np(classifier.kernel).astype("float64"), to_np(classifier.bias).astype("float64")


def test_head_activation_false_pools_the_last_block_output():
    keras.utils.set_random_seed(7)
    with_act = build_model("tiny")
    keras.utils.set_random_seed(7)
    without = build_model("tiny", head_activation=False)
    assert isinstance(with_act.get_layer("final_act"), ScaledActivation)
    assert "final_act" not in [layer.name for layer in without.layers]
    assert len(without.layers) == len(with_act.layers) - 1
    assert_same_weights(with_act, without)  # the head activation has no weights
    x, features, kernel, bias = _features_and_head(without, "stage2_block1")
    _, same_features, _, _ = _features_and_head(with_act, "stage2_block1")
    np.testing.assert_allclose(features, same_features, rtol=1e-6, atol=1e-6)
    assert (features < 0).any()  # so the activation matters
    expected_without = features.mean(axis=(1, 2)) @ kernel + bias
    expected_with = (np.maximum(features, 0) * GAMMAS["relu"]).mean(axis=(1, 2)) @ kernel + bias
    np.testing.assert_allclose(to_np(without(x)), expected_without, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(to_np(with_act(x)), expected_with, rtol=1e-4, atol=1e-6)
    assert np.abs(expected_with - expected_without).max() > 1e-3


def test_cifar_wide_as_built():
    model = build_model("cifar_wide")
    assert [layer.name for layer in model.layers if isinstance(layer, WSConv2D)] == ["stem_conv1"]
    assert model.get_layer("stem_conv1").filters == 32
    blocks = nf_blocks(model)
    assert [b.name for b in blocks] == [f"stage{s}_block{j}" for s, d in ((1, 3), (2, 4), (3, 3))
                                        for j in range(1, d + 1)]
    assert [b.filters for b in blocks] == [128] * 3 + [256] * 4 + [512] * 3
    assert [b.width for b in blocks] == [64] * 3 + [128] * 4 + [256] * 3  # bottleneck ratio 0.5
    assert [b.strides for b in blocks] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1]
    assert all(b.groups == 1 and b.activation == "gelu" and b.act1.activation == "gelu" for b in blocks)
    # Squeeze-Excite in every block, hidden width a quarter of the block's output.
    assert all(isinstance(b.se, SqueezeExcite) and b.se.activation == "gelu" for b in blocks)
    assert [b.se.squeeze.units for b in blocks] == [32] * 3 + [64] * 4 + [128] * 3
    # Stochastic depth from 0 to 0.1 x 9/10 over the ten blocks.
    assert [b.drop_path.rate for b in blocks] == pytest.approx([0.1 * i / 10 for i in range(10)])
    assert model.get_layer("dropout").rate == 0.2
    assert model.get_layer("final_act").activation == "gelu"
    assert "final_conv" not in [layer.name for layer in model.layers]
    assert model.get_layer("stage3_block3").output.shape == (None, 8, 8, 512)
    assert model.get_layer("classifier").kernel.shape == (512, 10)
    assert model.count_params() == hand_params(preset_values("cifar_wide"))


# === Swappable layers: the twins ===


def _twin_params(preset, num_classes=10, channels=3):
    """Parameters of the BatchNorm twin: bias- and gain-free kernels, 4 per BatchNorm channel."""
    gw, ratio = preset["group_width"], preset["bottleneck_ratio"]
    total, c = 0, channels
    for i, width in enumerate(preset["stem_widths"]):
        total += (4 * c if i else 0) + 9 * c * width  # BN + act between stem convs
        c = width
    for filters, depth in zip(preset["widths"], preset["depths"]):
        for j in range(depth):
            width = round(filters * ratio)
            groups = width // gw if gw else 1
            total += 4 * (c + 3 * width)  # the four BatchNorms
            total += c * width + 2 * 9 * (width // groups) * width + width * filters
            total += c * filters if j == 0 else 0
            if preset["se_ratio"]:
                hidden = int(filters * preset["se_ratio"])
                total += 2 * filters * hidden + hidden + filters
            c = filters
    if preset["final_conv_multiplier"]:
        total += c * c * preset["final_conv_multiplier"]
        c *= preset["final_conv_multiplier"]
    return total + 4 * c * preset["head_activation"] + c * num_classes + num_classes


def _bn_twin(preset, **kwargs):
    return build_model(preset, **BATCHNORM_TWIN, **kwargs)


@pytest.mark.parametrize("preset", ["tiny", "tiny_grouped", "report_resnet"])
def test_conv_and_norm_layers_build_the_twins(preset):
    nf = build_model(preset)
    plain = build_model(preset, conv_layer=keras.layers.Conv2D)
    bn = _bn_twin(preset)
    shapes = [(tuple(c.kernel.shape), c.strides, c.groups) for c in model_convs(nf)]
    for twin in (plain, bn):
        convs = model_convs(twin)
        assert all(type(conv) is keras.layers.Conv2D for conv in convs)
        assert [(tuple(c.kernel.shape), c.strides, c.groups) for c in convs] == shapes
        assert not any(isinstance(layer, WSConv2D) for layer in twin._flatten_layers())
        assert count_macs(twin) == count_macs(nf)
    # Without WS: every conv loses its gain, nothing else changes.
    assert plain.count_params() == hand_params(preset_values(preset)) - sum(shape[0][-1] for shape in shapes)
    assert all(block.skip_gain is not None for block in nf_blocks(plain))
    # The BatchNorm twin: BN -> act where NF has its scaled activations, no skip gains.
    assert bn.count_params() == _twin_params(preset_values(preset))
    norms = [layer for layer in bn._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 4 * len(nf_blocks(bn)) + 1 + len(PRESETS[preset].stem_widths) - 1
    # The only scaled activations left are the Squeeze-Excites' hidden ones.
    scaled = [layer for layer in bn._flatten_layers() if isinstance(layer, ScaledActivation)]
    assert len(scaled) == sum(block.se is not None for block in nf_blocks(bn))
    assert isinstance(bn.get_layer("final_act"), NormActivation)
    assert all(block.skip_gain is None for block in nf_blocks(bn))
    assert all(not conv.use_bias for conv in model_convs(bn))


def test_report_resnet_twin_parameter_counts():
    # The figures of benchmarks/results/bn_baseline.json.
    assert _bn_twin("report_resnet").count_params() == 748_602
    assert build_model("report_resnet", conv_layer=keras.layers.Conv2D).count_params() == 737_257


def test_uncentred_filters_reach_every_conv_of_the_speed_network_and_not_its_twin():
    model = build_model("tiny_speed", center_filters=False)
    convs = model_convs(model)
    assert len(convs) == 6 and all(isinstance(c, WSConv2D) and c.center is False for c in convs)
    assert all(c.center for c in model_convs(build_model("tiny_speed")))
    with pytest.raises(ValueError, match=r"normalized twin \(--norm batch, norm_layer\) has plain convs"):
        build_model("tiny_speed", center_filters=False, **BATCHNORM_TWIN)


def test_plain_conv_twin_computes_the_nf_function_with_standardized_kernels():
    # The scales a plain Conv2D cannot fold are applied to the feature maps:
    # given WSConv2D's standardized kernels, the twin is the same function.
    keras.utils.set_random_seed(8)
    nf = build_model("tiny_grouped")
    for i, block in enumerate(nf_blocks(nf)):
        block.skip_gain.assign(0.5 + i)
    plain = build_model("tiny_grouped", conv_layer=keras.layers.Conv2D)
    nf_weights = {v.path: v for v in nf.weights}
    for v in plain.weights:
        v.assign(nf_weights[v.path])
    for ws, conv in zip(model_convs(nf), model_convs(plain)):
        conv.kernel.assign(ws.standardized_kernel())
    x = np.random.default_rng(9).standard_normal((2, 32, 32, 3)).astype("float32")
    expected = to_np(nf(x))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(to_np(plain(x)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("twin", ["plain_conv", "bn"])
def test_keras_roundtrip_with_other_layer_classes(twin, tmp_path):
    keras.utils.set_random_seed(10)
    if twin == "bn":
        model = _bn_twin("tiny_grouped")
    else:
        model = build_model("tiny_grouped", conv_layer=keras.layers.Conv2D)
    x = np.random.default_rng(11).standard_normal((4, 32, 32, 3)).astype("float32")
    rng = np.random.default_rng(12)
    for v in model.trainable_weights:  # "trained": nothing at its initial value
        v.assign(to_np(v) + rng.normal(0, 0.1, v.shape).astype("float32"))
    model(x, training=True)  # moves the BatchNorms' statistics
    block = nf_blocks(model)[0]
    config = block.get_config()
    assert config["conv_layer"] == "Conv2D"
    assert type(block) is (PreActBottleneck if twin == "bn" else NFBlock)
    assert config.get("norm_layer") == ("BatchNormalization" if twin == "bn" else None)
    reloaded = keras_roundtrip(model, tmp_path)
    assert_same_weights(model, reloaded)
    assert all(type(conv) is keras.layers.Conv2D for conv in model_convs(reloaded))
    np.testing.assert_array_equal(to_np(reloaded(x)), to_np(model(x)))


@pytest.mark.parametrize(
    "kwargs, output_shape",
    [
        (dict(filters=8, conv_layer=keras.layers.Conv2D, se_ratio=0.5, skip_gain_init=0.5), (2, 6, 6, 8)),
        (dict(filters=16, strides=2, transition=True, conv_layer="Conv2D", use_bias=False,
              norm_layer=keras.layers.BatchNormalization), (2, 3, 3, 16)),
    ],
    ids=["plain_conv", "bn_twin"],
)
def test_nfblock_with_other_layer_classes_layer_harness(kwargs, output_shape, tmp_path):
    cls = PreActBottleneck if "norm_layer" in kwargs else NFBlock
    block = run_layer_test(cls, kwargs, (2, 6, 6, 8), tmp_path, expected_output_shape=output_shape)
    assert all(type(conv) is keras.layers.Conv2D for conv in block.conv_sublayers())


def test_norm_activation_layer_harness(tmp_path):
    layer = run_layer_test(NormActivation, dict(norm_layer="BatchNormalization", activation="gelu"),
                           (2, 3, 3, 4), tmp_path, expected_output_shape=(2, 3, 3, 4))
    assert isinstance(layer.norm, keras.layers.BatchNormalization)


def test_norm_config_sets_the_moving_statistics_by_hand():
    layer = NormActivation("BatchNormalization", "relu", dict(momentum=0.4, epsilon=1e-5))
    x = np.random.default_rng(13).normal(2.0, 3.0, (4, 3, 3, 5)).astype("float32")
    layer(x, training=True)  # one update: stat = 0.4 * stat + 0.6 * batch statistic
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(to_np(layer.norm.moving_mean), 0.6 * mean, rtol=1e-5)
    np.testing.assert_allclose(to_np(layer.norm.moving_variance), 0.4 + 0.6 * var, rtol=1e-5)
    expected = np.maximum((x - 0.6 * mean) / np.sqrt(0.4 + 0.6 * var + 1e-5), 0.0)
    np.testing.assert_allclose(to_np(layer(x, training=False)), expected, rtol=1e-5, atol=1e-6)
    assert NormActivation.from_config(layer.get_config()).norm_config == dict(momentum=0.4, epsilon=1e-5)
    assert "norm_config" not in NormActivation("BatchNormalization").get_config()  # as saved before


@pytest.mark.parametrize("preset", ["tiny_grouped", "tiny_speed"])
def test_norm_config_reaches_every_batchnorm_of_the_twin_and_is_saved_with_it(preset, tmp_path):
    keras.utils.set_random_seed(14)
    model = _bn_twin(preset, norm_config=dict(momentum=0.4, epsilon=1e-5))
    x = np.random.default_rng(15).standard_normal((4, 32, 32, 3)).astype("float32")
    model(x, training=True)
    reloaded = keras_roundtrip(model, tmp_path)
    for m in (model, reloaded):
        norms = [layer for layer in m._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all((n.momentum, n.epsilon) == (0.4, 1e-5) for n in norms), preset
    assert_same_weights(model, reloaded)
    np.testing.assert_array_equal(to_np(reloaded(x)), to_np(model(x)))


def test_norm_config_needs_a_norm_layer_and_a_dict():
    with pytest.raises(ValueError, match=r"norm_config \{'momentum': 0.4\} needs a norm_layer"):
        build_model("tiny", norm_config={"momentum": 0.4})
    with pytest.raises(ValueError, match="norm_config must be a dict of the norm layer's keyword arguments"):
        build_model("tiny", **BATCHNORM_TWIN, norm_config=0.4)
    with pytest.raises(ValueError, match="norm_config cannot set the norm layer's name"):
        NormActivation("BatchNormalization", norm_config={"name": "bn"})


def test_the_twins_batchnorm_flags_reach_its_layers():
    from nfnet_keras.config import TrainConfig
    from nfnet_keras.training import build_for

    model = build_for(TrainConfig(preset="tiny_speed", norm="batch", bn_momentum=0.4, bn_epsilon=1e-5).validate())
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all((n.momentum, n.epsilon) == (0.4, 1e-5) for n in norms)
    default = build_for(TrainConfig(preset="tiny_speed", norm="batch").validate())
    assert {(n.momentum, n.epsilon) for n in default._flatten_layers()
            if isinstance(n, keras.layers.BatchNormalization)} == {(0.99, 1e-3)}


def test_block_configs_name_their_layer_classes():
    block = PreActBottleneck(8, conv_layer="Conv2D", norm_layer=keras.layers.BatchNormalization)
    config = block.get_config()
    assert (config["conv_layer"], config["norm_layer"]) == ("Conv2D", "BatchNormalization")
    assert PreActBottleneck.from_config(config).norm_layer is keras.layers.BatchNormalization
    assert NFBlock(8, conv_layer="Conv2D").get_config()["conv_layer"] == "Conv2D"
    assert "norm_layer" not in NFBlock(8).get_config()
    assert NFBlock(8).get_config()["conv_layer"] == "nfnet_keras>WSConv2D"
    assert NFBlock.from_config(NFBlock(8).get_config()).conv_layer is WSConv2D


def test_unregistered_conv_layer_cannot_be_serialized():
    class LocalConv(keras.layers.Conv2D):
        pass

    model = build_model("tiny", conv_layer=LocalConv)
    with pytest.raises(ValueError) as info:
        nf_blocks(model)[0].get_config()
    assert str(info.value) == (
        "conv_layer test_unregistered_conv_layer_cannot_be_serialized.<locals>.LocalConv cannot be "
        "serialized: register it with `keras.saving.register_keras_serializable` or use a Keras layer."
    )


# === Block MACs ===


def test_block_macs_by_hand():
    # 8x8x8 in, 16 out, 3x3 width 8 in 2 groups, stride 2, SE hidden 8, pooled shortcut.
    block = NFBlock(16, strides=2, transition=True, bottleneck_ratio=0.5, group_width=4, se_ratio=0.5)
    block.build((None, 8, 8, 8))
    conv0 = 8 * 8 * 8 * 8
    conv1 = conv1b = 4 * 4 * 9 * 4 * 8
    conv2 = 4 * 4 * 8 * 16
    se = 2 * 16 * 8
    shortcut = 4 * 4 * 8 * 16
    assert block.macs((8, 8, 8)) == (conv0 + conv1 + conv1b + conv2 + se + shortcut, (4, 4, 16))
    assert block.macs((8, 8, 8))[0] == 17_664
    strided = NFBlock(16, strides=2, transition=True, bottleneck_ratio=0.5, group_width=4, shortcut_pool=False)
    strided.build((None, 7, 7, 8))  # a 1x1 conv of stride 2 on 7x7: 4x4 out
    assert strided.macs((7, 7, 8)) == (7 * 7 * 8 * 8 + 2 * 4 * 4 * 9 * 4 * 8 + 2 * 4 * 4 * 8 * 16, (4, 4, 16))
    with pytest.raises(ValueError, match="must be built before counting its MACs"):
        NFBlock(8).macs((4, 4, 8))


def test_skip_gain_init_and_beta_keys_reach_every_block():
    """The keys behind the report's lr-0.1 experiment: SkipInit off, beta = Var(x) as in the report's code."""
    plain = build_model("tiny")
    varied = build_model("tiny", skip_gain_init=1.0, beta="var")
    blocks = [layer for layer in varied.layers if isinstance(layer, NFBlock)]
    assert blocks and all(float(b.skip_gain.numpy()) == 1.0 for b in blocks)
    assert all(float(b.skip_gain.numpy()) == 0.0 for b in plain.layers if isinstance(b, NFBlock))
    for block in blocks:
        assert block.beta == pytest.approx(block.expected_var)  # not its square root
    assert all(b.get_config()["beta"] == "var" for b in blocks)
    with pytest.raises(ValueError, match=r"^beta must be one of 'std', 'var', got 'mean'\.$"):
        build_model("tiny", beta="mean")
    with pytest.raises(ValueError, match=r"^skip_gain_init must be a number >= 0 \(0: SkipInit\), got -1\.$"):
        build_model("tiny", skip_gain_init=-1)


def test_beta_var_divides_by_the_variance():
    Block = NFBlock
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    std = Block(16, expected_var=1.44, skip_gain_init=1.0)
    var = Block.from_config({**std.get_config(), "beta": "var"})
    std(x), var(x)
    var.set_weights(std.get_weights())
    assert std.beta == pytest.approx(1.2) and var.beta == pytest.approx(1.44)
    # act(x) * gamma / 1.44 = (act(x) * gamma / 1.2) / 1.2
    np.testing.assert_allclose(np.asarray(var._scaled_input(x)), np.asarray(std._scaled_input(x)) / 1.2, rtol=1e-5)


# === .keras files written by nfnet-keras 0.1 (tests/data/v0_1/make_files.py) ===

V0_1 = os.path.join(os.path.dirname(__file__), "data", "v0_1")


@pytest.mark.parametrize("name", ["tiny_grouped_nf", "tiny_speed_nf"])
def test_normalizer_free_models_saved_by_0_1_load_with_the_same_logits(name):
    model = keras.saving.load_model(os.path.join(V0_1, f"{name}.keras"))
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype("float32")
    # The stored logits come from another CPU, whose kernels round float32 differently (~1e-6); a weight
    # loaded into the wrong place moves them by ~1e-1.
    np.testing.assert_allclose(to_np(model(x, training=False)), np.load(os.path.join(V0_1, f"{name}.npy")),
                               rtol=1e-4, atol=1e-5)


def test_a_batchnorm_twin_saved_by_0_1_names_the_version():
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(os.path.join(V0_1, "tiny_speed_bn.keras"))
    assert str(info.value) == (
        "This .keras file was written by nfnet-keras 0.1: its BatchNorm twin's blocks are ConvGroups with a "
        "norm_layer, which are NormConvGroups since nfnet-keras 0.2. Load it with nfnet-keras 0.1, or rebuild the "
        "twin (build_model(preset, **BATCHNORM_TWIN), or nfnet-fit --norm batch) and train it again."
    )
