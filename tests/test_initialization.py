"""Initialization of conv layers: dirac (identity) kernels (`PartialDirac`, `dirac_initialize` through
`network.build_for`) and gains and biases set from data (`data_initialize`); also run under JAX and PyTorch."""

import json

import keras
import numpy as np
import pytest

from nfnet_keras import config as config_lib
from nfnet_keras import network
from nfnet_keras.models import adapt_model, data_initialize, model_convs


@pytest.mark.parametrize(
    "shape, groups, identity_filters",
    [
        ((3, 3, 4, 6), 1, 4),  # more filters than inputs: the first 4 are the identity, 2 from He normal
        ((3, 3, 6, 4), 1, 4),  # fewer filters than inputs: every filter takes its own input channel
        ((1, 1, 3, 5), 1, 3),  # a 1x1 conv: its centre is its only tap
        ((3, 3, 2, 8), 2, 4),  # 2 groups of 2 inputs -> 4 filters: the first 2 of each group
    ],
)
def test_partial_dirac_sets_the_identity_filters_and_keeps_the_base_elsewhere(shape, groups, identity_filters):
    from nfnet_keras.layers.initializers import PartialDirac

    keras.utils.set_random_seed(1)
    kernel = keras.ops.convert_to_numpy(PartialDirac(groups=groups)(shape))
    keras.utils.set_random_seed(1)
    base = keras.ops.convert_to_numpy(keras.initializers.HeNormal()(shape))
    kh, kw, group_in, c_out = shape
    group_out = c_out // groups
    expected = base.copy()
    ones = []
    for g in range(groups):
        for i in range(min(group_in, group_out)):
            expected[:, :, :, g * group_out + i] = 0.0
            expected[kh // 2, kw // 2, i, g * group_out + i] = 1.0
            ones.append(g * group_out + i)
    np.testing.assert_array_equal(kernel, expected)
    assert len(ones) == identity_filters
    rest = [f for f in range(c_out) if f not in ones]
    np.testing.assert_array_equal(kernel[..., rest], base[..., rest])


def test_partial_dirac_round_trips_and_refuses_bad_shapes():
    from nfnet_keras.layers.initializers import PartialDirac

    init = PartialDirac(base=keras.initializers.GlorotUniform(seed=3), groups=2)
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(keras.saving.serialize_keras_object(init))))
    assert type(revived) is PartialDirac and revived.get_config() == init.get_config()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(revived((3, 3, 2, 4))),
                                  keras.ops.convert_to_numpy(init((3, 3, 2, 4))))
    with pytest.raises(ValueError, match="dividing the 6 output channels, got 4"):
        PartialDirac(groups=4)((3, 3, 1, 6))
    with pytest.raises(ValueError, match="4-D HWIO"):
        PartialDirac()((3, 4))


def _convs(norm):
    keras.utils.set_random_seed(0)
    plain = model_convs(network.build_for(config_lib.TrainConfig(preset="tiny_speed", norm=norm).validate()))
    keras.utils.set_random_seed(0)
    dirac = model_convs(network.build_for(
        config_lib.TrainConfig(preset="tiny_speed", norm=norm, conv_init="dirac").validate()))
    return plain, dirac


def test_dirac_init_makes_every_batchnorm_twin_conv_pass_its_input_channels_on():
    plain, dirac = _convs("batch")
    assert [type(c) for c in dirac] == [keras.layers.Conv2D] * 6
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 24)).astype("float32")  # 24: the stem's channels
    for before, conv in zip(plain, dirac):
        c_in, c_out = conv.kernel.shape[2], conv.kernel.shape[3]
        out = keras.ops.convert_to_numpy(conv(x[..., :c_in]))
        n = min(c_in, c_out)
        np.testing.assert_allclose(out[..., :n], x[..., :n], rtol=0, atol=1e-5)
        # The other filters keep the kernel of the default init, unchanged.
        np.testing.assert_array_equal(np.asarray(conv.kernel)[..., n:], np.asarray(before.kernel)[..., n:])
    assert not np.allclose(np.asarray(plain[0].kernel)[..., :8], np.asarray(dirac[0].kernel)[..., :8])


def test_dirac_init_of_the_nf_network_sets_the_raw_ws_kernels():
    from nfnet_keras.layers import WSConv2D

    plain, dirac = _convs("none")
    assert all(isinstance(c, WSConv2D) for c in dirac) and len(dirac) == 6
    for before, conv in zip(plain, dirac):
        c_in, c_out = conv.kernel.shape[2], conv.kernel.shape[3]
        n = min(c_in, c_out)
        kernel = np.asarray(conv.kernel)
        expected = np.zeros((3, 3, c_in, n), "float32")
        expected[1, 1, np.arange(n), np.arange(n)] = 1.0
        np.testing.assert_array_equal(kernel[..., :n], expected)
        np.testing.assert_array_equal(kernel[..., n:], np.asarray(before.kernel)[..., n:])
        # Standardized, an identity filter of fan-in N is sqrt(1 - 1/N) at its centre (not 1).
        fan_in = 9 * c_in
        standardized = keras.ops.convert_to_numpy(conv.standardized_kernel(conv.kernel, None))
        np.testing.assert_allclose(standardized[1, 1, 0, 0], np.sqrt(1 - 1 / fan_in), rtol=1e-4)
    # ... so filter i gives (x_i - the mean of its 3x3 x C_in window) / sqrt(1 - 1/N), away from the border.
    conv = dirac[1]  # stage1 conv2: 8 -> 8
    x = np.random.default_rng(1).normal(size=(1, 6, 6, 8)).astype("float32")
    out = keras.ops.convert_to_numpy(conv(x))[0, 1:-1, 1:-1]
    windows = np.stack([x[0, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]).mean(axis=(0, 3))
    expected = (x[0, 1:-1, 1:-1] - windows[..., None]) / np.sqrt(1 - 1 / 72)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_dirac_init_skips_the_rgb_stem_conv_of_a_resnet():
    from nfnet_keras.models import build_model
    from nfnet_keras.models.initialization import dirac_initialize

    keras.utils.set_random_seed(0)
    model = build_model("tiny")
    stem = np.asarray(model_convs(model)[0].kernel).copy()
    names = dirac_initialize(model)
    assert len(names) == len(model_convs(model)) - 1 and "stem_conv1" not in " ".join(names)
    np.testing.assert_array_equal(np.asarray(model_convs(model)[0].kernel), stem)


def _coloured_images(count, seed):
    """uint8 images of a random colour each plus smooth noise: channel means far from the data's, as real photos'."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (count, 1, 1, 3))
    noise = rng.normal(0, 40, (count, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(colours + noise, 0, 255).astype("uint8")


def _pre_activations(model, images):
    """Per group, the inputs of its two activations on `images`: (max-pooled conv1 outputs, conv2 outputs)."""
    x = model.get_layer("stem_act")(model.get_layer("stem_whitening")(images))
    out = []
    for group in [layer for layer in model.layers if layer.name.endswith("_group")]:
        pooled = group._pooled(x)
        out.append((keras.ops.convert_to_numpy(pooled), keras.ops.convert_to_numpy(group.conv2(group.act1(pooled)))))
        x = group(x)
    return out


def test_data_init_standardizes_every_activation_input_of_the_nf_network_and_keeps_its_filters():
    from nfnet_keras.contract import normalize

    keras.utils.set_random_seed(0)
    model = network.build_for(config_lib.TrainConfig(preset="tiny_speed").validate())
    images = normalize(_coloured_images(96, seed=0))
    adapt_model(model, images)
    kernels = [np.asarray(conv.kernel).copy() for conv in model_convs(model)]
    before = _pre_activations(model, images)
    assert max(np.abs(a.reshape(-1, a.shape[-1]).mean(0)).max() for pair in before for a in pair) > 0.3

    names = data_initialize(model, images, batch_size=40)  # 3 passes, the last of 16 images

    assert names == [f"stage{s}_group/conv{c}/gain" for s in (1, 2, 3) for c in (1, 2)]
    for pooled, pre_act2 in _pre_activations(model, images):
        for a in (pooled, pre_act2):
            a = a.reshape(-1, a.shape[-1]).astype("float64")
            np.testing.assert_allclose(a.mean(0), 0.0, atol=2e-5)
            np.testing.assert_allclose(a.var(0), 1.0, rtol=2e-4)
    for kernel, conv in zip(kernels, model_convs(model)):
        np.testing.assert_array_equal(np.asarray(conv.kernel), kernel)
    # On other images of the same kind the statistics are near, not exactly, standardized.
    pooled, _ = _pre_activations(model, normalize(_coloured_images(96, seed=1)))[0]
    assert np.abs(pooled.reshape(-1, pooled.shape[-1]).mean(0)).max() < 0.5


def test_data_init_refuses_the_batchnorm_twin():
    model = network.build_for(config_lib.TrainConfig(preset="tiny_speed", norm="batch").validate())
    with pytest.raises(ValueError, match="has no layer initialized from data"):
        data_initialize(model, np.zeros((4, 32, 32, 3), "float32"))
