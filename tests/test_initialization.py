"""Dirac (identity) initialization of conv kernels: `PartialDirac` and `dirac_initialize` through
`network.build_for` (also run under JAX and PyTorch)."""

import json

import keras
import numpy as np
import pytest

from nfnet_keras import config as config_lib
from nfnet_keras import network
from nfnet_keras.models import model_convs


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
