"""NFBlock and its BatchNorm twin (nfnet_keras/models/nf_resnet/blocks.py), SqueezeExcite, StochasticDepth
and NormActivation (nfnet_keras/layers)."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from nfnet_keras import GAMMAS, NFBlock, PreActBottleneck, SqueezeExcite, StochasticDepth

from conftest import assert_same_weights, keras_roundtrip, run_layer_test, value_and_grad


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def np_ws_1x1(conv, x):
    """A 1x1 WSConv2D computed by hand: standardized kernel, plus bias."""
    k = to_np(conv.kernel).astype("float64")[0, 0]  # (in, out)
    k = (k - k.mean(0)) / np.sqrt(np.maximum(k.shape[0] * k.var(0), conv.eps))
    return x @ (k * to_np(conv.gain)) + to_np(conv.bias)


# === The layer harness ===


@pytest.mark.parametrize(
    "kwargs, output_shape",
    [
        (dict(filters=8, expected_var=1.04, skip_gain_init=0.5), (2, 6, 6, 8)),
        (dict(filters=16, strides=2, transition=True), (2, 3, 3, 16)),
        (dict(filters=8, se_ratio=0.5, activation="silu", skip_gain_init=0.5), (2, 6, 6, 8)),
        (dict(filters=16, transition=True, bottleneck_ratio=0.5, group_width=4, skip_gain_init=0.5),
         (2, 6, 6, 16)),
        (dict(filters=16, strides=2, transition=True, conv_layer="Conv2D", norm_layer="BatchNormalization",
              use_bias=False), (2, 3, 3, 16)),
    ],
    ids=["plain", "transition", "se", "grouped", "bn_twin"],
)
def test_nfblock_layer_harness(kwargs, output_shape, tmp_path):
    cls = PreActBottleneck if "norm_layer" in kwargs else NFBlock
    block = run_layer_test(cls, kwargs, (2, 6, 6, 8), tmp_path, expected_output_shape=output_shape)
    assert (block.se is not None) == ("se_ratio" in kwargs)
    assert block.groups == (2 if "group_width" in kwargs else 1)


def test_squeeze_excite_layer_harness(tmp_path):
    se = run_layer_test(SqueezeExcite, dict(ratio=0.25, activation="silu"), (2, 3, 3, 8), tmp_path,
                        expected_output_shape=(2, 3, 3, 8))
    assert se.squeeze.units == 2 and se.excite.units == 8


def test_stochastic_depth_layer_harness(tmp_path):
    run_layer_test(StochasticDepth, dict(rate=0.2, seed=3), (2, 3, 3, 2), tmp_path,
                   expected_output_shape=(2, 3, 3, 2))


# === Variance tracking ===


@pytest.mark.parametrize(
    "transition, expected_var, alpha, out_var",
    [
        (True, 1.0, 0.2, 1.04),
        (True, 1.36, 0.2, 1.04),  # a transition resets the count: 1 + alpha^2
        (False, 1.04, 0.2, 1.08),  # otherwise expected_var + alpha^2
        (False, 1.36, 0.5, 1.61),
    ],
)
def test_expected_output_var_rule(transition, expected_var, alpha, out_var):
    filters = 8
    block = NFBlock(filters, expected_var=expected_var, alpha=alpha, transition=transition)
    assert block.expected_output_var == pytest.approx(out_var)
    assert block.beta == pytest.approx(math.sqrt(expected_var))  # the std, not the variance


def test_chained_blocks_track_one_plus_k_alpha_squared():
    var, seen = 1.0, []
    for j in range(5):
        block = NFBlock(16, expected_var=var, transition=j == 0)
        seen.append(block.beta**2)
        var = block.expected_output_var
    assert seen == pytest.approx([1.0, 1.04, 1.08, 1.12, 1.16])
    assert var == pytest.approx(1.2)


# === SkipInit ===


def test_skip_gain_is_a_scalar_initialised_to_zero():
    block = NFBlock(8)
    block.build((None, 4, 4, 8))
    skip = [v for v in block.weights if v.path.endswith("skip_gain")]
    assert len(skip) == 1 and skip[0] is block.skip_gain
    assert skip[0].name == "skip_gain" and skip[0].shape == () and skip[0].trainable
    assert float(to_np(skip[0])) == 0.0


def test_non_transition_block_is_identity_at_init():
    x = gaussian((3, 5, 5, 8)) * 3.0
    block = NFBlock(8, expected_var=1.2)
    np.testing.assert_array_equal(to_np(block(x)), x)
    np.testing.assert_array_equal(to_np(block(x, training=True)), x)
    # ... though its residual branch is not zero.
    assert np.abs(to_np(block.residual_branch(x))).max() > 0.1


@pytest.mark.parametrize("strides", [1, 2])
def test_transition_block_is_its_shortcut_at_init(strides):
    # The shortcut comes from the scaled activation h = relu(x) * gamma / beta
    # (2x2 average pool when strided), through a 1x1 WS conv.
    expected_var = 1.44
    x = gaussian((2, 6, 6, 4), seed=strides)
    block = NFBlock(8, expected_var=expected_var, strides=strides, transition=True)
    out = to_np(block(x))
    h = np.maximum(x, 0).astype("float64") * GAMMAS["relu"] / math.sqrt(expected_var)
    if strides == 2:
        h = h.reshape(2, 3, 2, 3, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(out, np_ws_1x1(block.shortcut_conv, h), rtol=1e-4, atol=1e-5)


def test_output_is_shortcut_plus_alpha_skip_gain_branch():
    x = gaussian((2, 4, 4, 8))
    block = NFBlock(8, alpha=0.3, skip_gain_init=0.7)
    out = to_np(block(x))
    np.testing.assert_allclose(out, x + 0.3 * 0.7 * to_np(block.residual_branch(x)), rtol=1e-5, atol=1e-6)
    assert float(to_np(block.skip_gain)) == pytest.approx(0.7)


# === Shapes and validation ===


@pytest.mark.parametrize("hw, out_hw", [(8, 4), (7, 4)])
def test_strided_transition_shape(hw, out_hw):
    block = NFBlock(16, strides=2, transition=True, skip_gain_init=1.0)
    out = block(gaussian((2, hw, hw, 8)))
    assert tuple(out.shape) == (2, out_hw, out_hw, 16)
    assert block.compute_output_shape((None, hw, hw, 8)) == (None, out_hw, out_hw, 16)
    assert block.width == 4 and block.conv1.strides == (2, 2)


def test_non_transition_with_channel_change_raises():
    with pytest.raises(ValueError, match="transition=True"):
        NFBlock(16)(gaussian((1, 4, 4, 8)))


def test_strided_non_transition_raises():
    with pytest.raises(ValueError, match="transition"):
        NFBlock(8, strides=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expected_var=0.0), "expected_var"),
        (dict(alpha=0.0), "alpha"),
        (dict(strides=3, transition=True), "strides"),
        (dict(activation="rleu"), "Unknown activation"),
        (dict(se_ratio=1.5), "se_ratio"),
        (dict(group_width=3), "group_width"),  # width 4 is not a multiple of 3
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NFBlock(16, **kwargs)


def test_grouped_block_uses_groups_in_the_3x3_convs():
    block = NFBlock(32, bottleneck_ratio=0.5, group_width=4, transition=True)
    block.build((None, 4, 4, 8))
    assert block.groups == 4 and block.conv1.groups == 4 and block.conv1b.groups == 4
    assert block.conv0.groups == 1 and block.conv2.groups == 1
    assert block.conv1.kernel.shape == (3, 3, 4, 16)


# === Stochastic depth ===


def test_stochastic_depth_drops_whole_examples_in_training_only():
    rate, alpha = 0.5, 0.2
    keras.utils.set_random_seed(0)
    block = NFBlock(8, alpha=alpha, stochastic_depth_rate=rate, skip_gain_init=1.0)
    x = gaussian((64, 4, 4, 8))
    block.build(x.shape)
    branch = to_np(block.residual_branch(x)).astype("float64")
    # Inference: the identity (no drop, no rescale).
    np.testing.assert_allclose(to_np(block(x)), x + alpha * branch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(block(x, training=False)), x + alpha * branch, rtol=1e-5, atol=1e-6)
    # Training: each example keeps its whole branch (scaled by 1 / (1 - rate)) or loses it.
    residual = to_np(block(x, training=True)).astype("float64") - x
    dropped = np.all(residual == 0.0, axis=(1, 2, 3))
    assert 12 <= dropped.sum() <= 52  # Binomial(64, 0.5): mean 32, sd 4
    np.testing.assert_allclose(
        residual[~dropped], alpha * branch[~dropped] / (1 - rate), rtol=1e-4, atol=1e-5
    )
    # A second call draws a new mask.
    residual2 = to_np(block(x, training=True)) - x
    assert not np.array_equal(dropped, np.all(residual2 == 0.0, axis=(1, 2, 3)))


def test_stochastic_depth_layer():
    x = gaussian((32, 2, 2, 3)) + 5.0  # no exact zeros in x
    np.testing.assert_array_equal(to_np(StochasticDepth(0.0)(x, training=True)), x)
    np.testing.assert_array_equal(to_np(StochasticDepth(0.9)(x, training=False)), x)
    out = to_np(StochasticDepth(0.25, seed=1)(x, training=True))
    kept = np.all(out != 0.0, axis=(1, 2, 3))
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(out[~kept], 0.0)
    with pytest.raises(ValueError, match="rate"):
        StochasticDepth(1.0)


# === Squeeze-Excite ===


def test_squeeze_excite_matches_manual_computation():
    x = gaussian((2, 3, 3, 8))
    se = SqueezeExcite(0.5, "relu")
    out = to_np(se(x))
    assert se.squeeze.units == 4 and se.excite.units == 8
    s = x.mean(axis=(1, 2)).astype("float64")
    s = np.maximum(s @ to_np(se.squeeze.kernel) + to_np(se.squeeze.bias), 0) * GAMMAS["relu"]
    s = s @ to_np(se.excite.kernel) + to_np(se.excite.bias)
    gate = 1 / (1 + np.exp(-s))
    np.testing.assert_allclose(out, 2 * gate[:, None, None, :] * x, rtol=1e-5, atol=1e-6)


def test_se_path_is_in_the_residual_branch():
    x = gaussian((2, 4, 4, 16))
    block = NFBlock(16, se_ratio=0.5, skip_gain_init=1.0)
    block.build(x.shape)
    assert isinstance(block.se, SqueezeExcite)
    assert any("/se/squeeze/kernel" in v.path for v in block.weights)
    h = block._scaled_input(x)
    pre_se = block.conv2(block.act3(block.conv1b(block.act2(block.conv1(block.act1(block.conv0(h)))))))
    np.testing.assert_allclose(
        to_np(block.residual_branch(x)), to_np(block.se(pre_se)), rtol=1e-5, atol=1e-6
    )
    plain = NFBlock(16)
    plain.build(x.shape)
    assert plain.se is None and not any("/se/" in v.path for v in plain.weights)


# === Serialization ===


def test_nfblock_config_and_keras_roundtrip(tmp_path):
    keras.utils.set_random_seed(1)
    block = NFBlock(
        16, expected_var=1.12, alpha=0.3, strides=2, transition=True, bottleneck_ratio=0.5,
        group_width=4, activation="gelu", se_ratio=0.5, stochastic_depth_rate=0.1,
        skip_gain_init=0.0, name="blk",
    )
    config = block.get_config()
    assert NFBlock.from_config(config).get_config() == config
    block.build((None, 8, 8, 8))
    rng = np.random.default_rng(2)
    for v in block.weights:  # "trained": nothing at its initial value
        v.assign(to_np(v) + rng.normal(0, 0.1, v.shape).astype("float32"))
    assert float(to_np(block.skip_gain)) != 0.0
    reloaded = keras_roundtrip(block, tmp_path, input_shape=(8, 8, 8))
    assert_same_weights(block, reloaded)
    assert reloaded.expected_var == 1.12 and reloaded.se is not None and reloaded.groups == 2
    x = gaussian((2, 8, 8, 8))
    np.testing.assert_array_equal(to_np(reloaded(x)), to_np(block(x)))


@pytest.mark.parametrize(
    "layer, shape",
    [(SqueezeExcite(0.25, "silu", name="se"), (3, 3, 8)), (StochasticDepth(0.2, seed=3, name="sd"), (3, 3, 2))],
)
def test_helper_layers_keras_roundtrip(layer, shape, tmp_path):
    reloaded = keras_roundtrip(layer, tmp_path, input_shape=shape)
    assert reloaded.get_config() == layer.get_config()
    assert_same_weights(layer, reloaded)
    x = gaussian((2,) + shape)
    np.testing.assert_array_equal(to_np(reloaded(x)), to_np(layer(x)))


# === Folding the block's scalars into the conv kernels ===


def _explicit_block(block, x, training=False):
    """The block written out with every multiply on the feature maps (no folding)."""

    def conv(layer, h):
        k = layer.standardized_kernel()
        if layer.groups == 1:
            y = ops.conv(h, k, strides=layer.strides, padding=layer.padding)
        else:
            hs, ks = ops.split(h, layer.groups, axis=-1), ops.split(k, layer.groups, axis=-1)
            y = ops.concatenate(
                [ops.conv(a, b, strides=layer.strides, padding=layer.padding) for a, b in zip(hs, ks)], -1
            )
        return y + layer.bias if layer.use_bias else y

    h = block.act0(x) / block.beta  # act0 includes gamma
    shortcut = x
    if block.transition:
        shortcut = conv(block.shortcut_conv, block.pool(h) if block.pool is not None else h)
    out = conv(block.conv0, h)
    out = conv(block.conv1, block.act1(out))
    out = conv(block.conv1b, block.act2(out))
    out = conv(block.conv2, block.act3(out))
    if block.se is not None:
        out = block.se(out)
    return shortcut + out * block.skip_gain * block.alpha


def _randomize(block, seed):
    rng = np.random.default_rng(seed)
    for v in block.weights:
        if v.path.endswith(("gain", "bias")) or v.path.endswith("skip_gain"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32") if v.shape else 0.8)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(filters=16, transition=True, strides=2, shortcut_pool=True),
        dict(filters=16, transition=True, strides=2, shortcut_pool=False, expected_var=1.3),
        dict(filters=8, bottleneck_ratio=0.5, expected_var=1.12, activation="gelu"),
        dict(filters=16, transition=True, group_width=2, bottleneck_ratio=0.5, use_bias=False),
        dict(filters=8, bottleneck_ratio=0.5, se_ratio=0.5, expected_var=1.08, activation="silu"),
    ],
    ids=["pool", "strided", "gelu", "grouped_no_bias", "se"],
)
def test_folded_scales_give_the_explicit_block_values_and_gradients(kwargs):
    block = NFBlock(alpha=0.3, **kwargs)
    x = ops.convert_to_tensor(gaussian((2, 8, 8, 8), seed=1))
    block.build(x.shape)
    _randomize(block, 2)

    def loss(forward):
        y = forward(block, x)
        return ops.sum(ops.sin(y)), y

    grads = []
    for forward in (NFBlock.__call__, _explicit_block):
        (_, y), g = value_and_grad(lambda forward=forward: loss(forward), block.trainable_weights)
        grads.append([y] + g)
    assert len(grads[0]) == len(block.trainable_weights) + 1
    # float32 rounding differs between the two orders of the same products; the
    # standardization's projection leaves some kernel gradients near 1e-5. Every conv has a fan-in of at
    # least 4: with 2 inputs a standardized kernel is ±1 whatever its values, so its gradient is rounding noise.
    for path, a, b in zip(["output"] + [v.path for v in block.trainable_weights], *grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 + 1e-5 * np.abs(b).max(), err_msg=path)


def test_folded_skip_gain_gradient_at_zero_init():
    # SkipInit: at skip_gain = 0 the branch's own weights get no gradient, but
    # the skip gain does (through the kernel it is folded into).
    block = NFBlock(8)
    x = gaussian((2, 6, 6, 8), seed=3)
    block.build(x.shape)
    _, (g_skip, g_kernel) = value_and_grad(
        lambda: ops.sum(ops.sin(block(x))), [block.skip_gain, block.conv0.kernel]
    )
    assert abs(float(g_skip)) > 1e-3
    assert np.abs(g_kernel).max() == 0.0


def test_a_block_with_its_own_mixed_policy_under_a_float32_global_policy():
    """Sublayers compute in the block's policy, not the global one."""
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    for kwargs in ({}, {"se_ratio": 0.5, "strides": 2, "transition": True, "shortcut_pool": True}):
        block = NFBlock(16, skip_gain_init=1.0, dtype="mixed_bfloat16", **kwargs)
        out = block(x)
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
        assert np.isfinite(to_np(keras.ops.cast(out, "float32"))).all()
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in block.weights)
