"""WSConv2D: scaled weight standardization (nfnet_keras/layers/wsconv.py)."""

import functools

import keras
import numpy as np
import pytest
from keras import ops

from nfnet_keras import WSConv2D
from nfnet_keras.layers.wsconv import add_channel_bias

from conftest import assert_same_weights, keras_roundtrip, run_layer_test, value_and_grad


def to_np(x):
    return ops.convert_to_numpy(x)


def np_standardize(kernel, gain, eps=1e-4):
    """gain * (W - mean) / sqrt(max(N var, eps)) per output channel, over the fan-in."""
    kernel = kernel.astype("float64")
    fan_in = np.prod(kernel.shape[:3])
    mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
    var = kernel.var(axis=(0, 1, 2), keepdims=True)  # biased, as in the paper
    return gain * (kernel - mean) / np.sqrt(np.maximum(fan_in * var, eps))


def np_conv2d(x, kernel, strides=1, padding="valid"):
    """NHWC x HWIO cross-correlation with TensorFlow's 'same' padding rule."""
    n, h, w, _ = x.shape
    kh, kw, _, _ = kernel.shape
    if padding == "same":
        oh, ow = -(-h // strides), -(-w // strides)
        ph = max((oh - 1) * strides + kh - h, 0)
        pw = max((ow - 1) * strides + kw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - kh) // strides + 1, (w - kw) // strides + 1
    out = np.zeros((n, oh, ow, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + strides * oh : strides, j : j + strides * ow : strides, :]
            out += np.einsum("nhwc,co->nhwo", patch, kernel[i, j])
    return out


def randomize(layer, seed):
    """Gives every weight (kernel, bias, gain) non-trivial random values."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        if v.path.endswith("gain"):
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
        else:
            v.assign(rng.standard_normal(v.shape).astype("float32"))


@pytest.mark.parametrize(
    "kwargs, output_shape",
    [
        (dict(filters=4, kernel_size=3, padding="same"), (2, 6, 6, 4)),
        (dict(filters=6, kernel_size=3, strides=2, padding="same", groups=2), (2, 3, 3, 6)),
        (dict(filters=4, kernel_size=1, use_bias=False, eps=1e-3), (2, 6, 6, 4)),
    ],
    ids=["plain", "grouped", "no_bias"],
)
def test_layer_harness(kwargs, output_shape, tmp_path):
    conv = run_layer_test(WSConv2D, kwargs, (2, 6, 6, 4), tmp_path, expected_output_shape=output_shape)
    assert [v.path.split("/")[-1] for v in conv.weights] == (
        ["kernel", "bias", "gain"] if conv.use_bias else ["kernel", "gain"]
    )


def test_gain_is_a_per_channel_weight_initialised_to_one():
    conv = WSConv2D(6, 3)
    conv.build((None, 8, 8, 4))
    assert conv.gain.shape == (6,) and conv.gain.trainable
    np.testing.assert_array_equal(to_np(conv.gain), np.ones(6))
    assert [v.path.split("/")[-1] for v in conv.weights] == ["kernel", "bias", "gain"]


def test_standardized_kernel_zero_mean_and_gain_norm():
    conv = WSConv2D(6, 3)
    conv.build((None, 8, 8, 4))
    gain = np.linspace(0.5, 3.0, 6).astype("float32")
    conv.gain.assign(gain)
    w = to_np(conv.standardized_kernel()).astype("float64")
    # Zero mean over the fan-in (3 * 3 * 4) of every output channel ...
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-7)
    # ... and sum of squares gain^2: unit norm times the gain.
    np.testing.assert_allclose((w**2).sum(axis=(0, 1, 2)), gain.astype("float64") ** 2, rtol=1e-5)
    np.testing.assert_allclose(w, np_standardize(to_np(conv.kernel), gain), rtol=1e-5, atol=1e-6)


def test_uncentred_kernel_is_the_raw_filter_scaled_to_the_gain():
    conv = WSConv2D(6, 3, center=False)
    conv.build((None, 8, 8, 4))
    gain = np.linspace(0.5, 3.0, 6).astype("float32")
    conv.gain.assign(gain)
    conv.kernel.assign(conv.kernel + 0.2)  # filters with a mean the centred conv would remove
    raw = to_np(conv.kernel).astype("float64")
    w = to_np(conv.standardized_kernel()).astype("float64")
    np.testing.assert_allclose(w, raw / np.sqrt((raw**2).sum(axis=(0, 1, 2))) * gain, rtol=1e-5, atol=1e-7)
    assert np.abs(w.mean(axis=(0, 1, 2))).min() > 1e-3
    # A constant input gives each channel its filter's sum (times the input), not 0 as with centring.
    out = to_np(conv(np.ones((1, 5, 5, 4), "float32")))[0, 2, 2]
    np.testing.assert_allclose(out, w.sum(axis=(0, 1, 2)) + to_np(conv.bias), rtol=1e-4)
    assert WSConv2D.from_config(conv.get_config()).center is False


def test_eps_floors_a_tiny_variance_kernel():
    conv = WSConv2D(2, 1, use_bias=False)
    conv.build((None, 4, 4, 4))
    # Channel 0: N var = 4 * 1e-8 << eps, so it is divided by sqrt(eps), not
    # normalised; channel 1 is constant: its standardized kernel is exactly 0.
    kernel = np.zeros((1, 1, 4, 2), "float32")
    kernel[0, 0, :, 0] = [1e-4, -1e-4, 1e-4, -1e-4]
    kernel[0, 0, :, 1] = 0.7
    conv.kernel.assign(kernel)
    w = to_np(conv.standardized_kernel())
    np.testing.assert_allclose(w[0, 0, :, 0], kernel[0, 0, :, 0] / np.sqrt(1e-4), rtol=1e-5)
    np.testing.assert_array_equal(w[..., 1], 0.0)
    assert np.isfinite(to_np(conv(np.ones((1, 4, 4, 4), "float32")))).all()


@pytest.mark.parametrize(
    "kernel_size, strides, padding, shape",
    [
        (3, 1, "same", (2, 7, 7, 5)),
        (3, 2, "same", (2, 8, 9, 5)),
        (1, 1, "valid", (2, 4, 4, 5)),
        (3, 2, "valid", (1, 9, 9, 5)),
    ],
)
def test_output_matches_manual_conv(kernel_size, strides, padding, shape):
    conv = WSConv2D(7, kernel_size, strides=strides, padding=padding)
    conv.build(shape)
    randomize(conv, seed=kernel_size + strides)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    w = np_standardize(to_np(conv.kernel), to_np(conv.gain))
    expected = np_conv2d(x.astype("float64"), w, strides, padding) + to_np(conv.bias)
    np.testing.assert_allclose(to_np(conv(x)), expected, rtol=1e-4, atol=1e-4)


def test_grouped_conv_matches_per_group_manual_conv():
    conv = WSConv2D(6, 3, padding="same", groups=2)
    conv.build((2, 6, 6, 4))
    assert conv.kernel.shape == (3, 3, 2, 6)  # fan-in is in_channels / groups
    randomize(conv, seed=5)
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 4)).astype("float64")
    w = np_standardize(to_np(conv.kernel), to_np(conv.gain))
    # Group g: input channels [2g, 2g+2) -> output channels [3g, 3g+3).
    expected = np.concatenate(
        [np_conv2d(x[..., 2 * g : 2 * g + 2], w[..., 3 * g : 3 * g + 3], 1, "same") for g in range(2)],
        axis=-1,
    ) + to_np(conv.bias)
    out = to_np(conv(x.astype("float32")))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # Not the same as one ungrouped conv over all inputs with this kernel's statistics.
    assert not np.allclose(out[..., :3], out[..., 3:])


def test_gradient_flows_through_the_standardization():
    # Standardization happens in the forward pass: the loss is invariant to a
    # rescaling of a channel's raw kernel, so the raw-kernel gradient is
    # orthogonal to the kernel, channel by channel.
    conv = WSConv2D(3, 3, use_bias=False)
    x = np.random.default_rng(2).standard_normal((2, 5, 5, 2)).astype("float32")
    conv.build(x.shape)
    _, (grad,) = value_and_grad(lambda: ops.sum(ops.sin(conv(x))), [conv.kernel])
    kernel = to_np(conv.kernel)
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose((grad * kernel).sum(axis=(0, 1, 2)), 0.0, atol=1e-4)


def test_channel_bias_add_gradient_is_the_explicit_sum():
    # Every backend (TensorFlow's custom gradient, the others' plain add): the
    # output is x + bias over the last axis, the input gradient is the upstream
    # gradient and the bias gradient its sum over batch and space.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 6, 5)).astype("float32")
    upstream = rng.standard_normal((4, 6, 6, 5)).astype("float32")
    bias = keras.Variable(rng.standard_normal(5).astype("float32"))

    def loss(x):
        y = add_channel_bias(x, bias)
        return ops.sum(ops.multiply(y, upstream)), y

    (_, y), (g_bias, g_x) = value_and_grad(loss, [bias], [x])
    np.testing.assert_allclose(y, x + to_np(bias), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_x, upstream, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_bias, upstream.astype("float64").sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.tensorflow_only(
    reason="the bias add's custom gradient exists only under TensorFlow; this checks it inside tf.function, "
    "with and without XLA, and its float32 accumulation of float16/bfloat16 gradients"
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("jit", [False, True])
def test_channel_bias_add_matches_broadcast_add_values_and_gradients(dtype, jit):
    # The oneDNN workaround (a custom gradient for the bias) must be invisible.
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((4, 6, 6, 5)), dtype)
    bias = tf.Variable(rng.standard_normal(5).astype("float32"))
    upstream = tf.constant(rng.standard_normal((4, 6, 6, 5)), dtype)

    def run(add):
        @tf.function(jit_compile=jit)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = add(x, bias)
                loss = tf.reduce_sum(tf.cast(y * upstream, "float32"))
            return (y,) + tuple(tape.gradient(loss, [x, bias]))

        return [to_np(tf.cast(t, "float32")) for t in step(x)]

    ours = run(add_channel_bias)
    reference = run(lambda x, b: x + tf.cast(b, x.dtype))
    tol = dict(float32=1e-6, bfloat16=2e-2, float16=2e-3)[dtype]
    for a, b in zip(ours[:2], reference[:2]):  # outputs, input gradients
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    # The bias gradient: the upstream gradient summed over batch and space,
    # accumulated in float32 (closer to it than the low-precision reference).
    expected = to_np(tf.cast(upstream, "float32")).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(ours[2], expected, rtol=max(tol, 1e-6), atol=tol)
    assert np.abs(ours[2] - expected).max() <= np.abs(reference[2] - expected).max() + 1e-6


@pytest.mark.tensorflow_only(reason="the bias add's custom gradient exists only under TensorFlow")
def test_channel_bias_gradient_of_a_large_bfloat16_map_is_the_float32_sum_rounded_once():
    # 16 x 31 x 31 = 15,376 values a channel: summed in bfloat16 (8 significant bits) the sum would
    # drift far from the exact one; the gradient is the float32 sum rounded once to bfloat16.
    import tensorflow as tf

    rng = np.random.default_rng(5)
    x = tf.zeros((16, 31, 31, 8), "bfloat16")
    upstream = tf.constant(rng.standard_normal((16, 31, 31, 8)) + 0.5, "bfloat16")
    bias = tf.Variable(np.zeros(8, "float32"))

    @tf.function
    def bias_gradient():
        with tf.GradientTape() as tape:
            y = add_channel_bias(x, bias)
            loss = tf.reduce_sum(tf.cast(y * upstream, "float32"))
        return tape.gradient(loss, bias)

    exact = to_np(tf.cast(upstream, "float64")).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(to_np(bias_gradient()), exact, rtol=2**-8, atol=0)


@pytest.mark.parametrize("use_bias, groups", [(True, 1), (False, 1), (True, 2)])
def test_input_and_output_scales_equal_scaling_the_activations(use_bias, groups):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 6, 4)).astype("float32")
    conv = WSConv2D(4, 3, padding="same", use_bias=use_bias, groups=groups)
    conv.build(x.shape)
    randomize(conv, 7)
    s = keras.Variable(0.7)

    def loss(y):
        return ops.sum(ops.sin(y)), y

    weights = conv.trainable_weights + [s]
    (_, folded), g_folded = value_and_grad(lambda: loss(conv(x, input_scale=1.7, output_scale=s)), weights)
    (_, explicit), g_explicit = value_and_grad(lambda: loss(ops.multiply(conv(x * 1.7), s)), weights)
    np.testing.assert_allclose(folded, explicit, rtol=1e-5, atol=1e-5)
    assert len(g_folded) == len(weights) == (4 if use_bias else 3)
    for a, b in zip(g_folded, g_explicit):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_bias_gradient_matches_keras_conv2d():
    # Same kernel and bias in a plain Keras Conv2D (its own bias add) and in
    # WSConv2D (fed the kernel it standardizes to): same outputs and bias grads.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 7, 4)).astype("float32")
    ws = WSConv2D(6, 3, padding="same")
    ws.build(x.shape)
    ws.bias.assign(rng.standard_normal(6).astype("float32"))
    plain = keras.layers.Conv2D(6, 3, padding="same")
    plain.build(x.shape)
    plain.set_weights([to_np(ws.standardized_kernel()), to_np(ws.bias)])

    def loss(layer):
        y = layer(x)
        return ops.sum(ops.sin(y)), y

    grads = []
    for layer in (ws, plain):
        (_, y), (g_bias,) = value_and_grad(functools.partial(loss, layer), [layer.bias])
        grads.append((y, g_bias))
    np.testing.assert_allclose(grads[0][0], grads[1][0], atol=1e-5)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def test_keras_roundtrip_keeps_a_changed_gain(tmp_path):
    conv = WSConv2D(6, 3, padding="same", groups=2, name="ws")
    conv.build((None, 8, 8, 4))
    randomize(conv, seed=7)
    gain = to_np(conv.gain).copy()
    assert not np.allclose(gain, 1.0)
    reloaded = keras_roundtrip(conv, tmp_path, input_shape=(8, 8, 4))
    np.testing.assert_array_equal(to_np(reloaded.gain), gain)
    assert_same_weights(conv, reloaded)
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype("float32")
    np.testing.assert_array_equal(to_np(reloaded(x)), to_np(conv(x)))
    assert reloaded.groups == 2 and reloaded.eps == conv.eps


def test_keras_roundtrip_of_a_trained_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            WSConv2D(4, 3, padding="same", name="ws1"),
            WSConv2D(4, 3, strides=2, use_bias=False, name="ws2"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 8, 8, 3)).astype("float32")
    model.fit(x, rng.integers(0, 2, 16), epochs=3, batch_size=8, verbose=0)
    for name in ("ws1", "ws2"):
        assert not np.allclose(to_np(model.get_layer(name).gain), 1.0), f"{name} gain did not train"
    loaded = keras_roundtrip(model, tmp_path)
    assert_same_weights(model, loaded)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_load_rejects_a_file_without_gain():
    conv = WSConv2D(2, 1)
    conv.build((None, 4, 4, 3))
    store = {"0": np.zeros((1, 1, 3, 2)), "1": np.zeros(2)}  # kernel, bias: no gain
    with pytest.raises(ValueError, match="expected 3 variables"):
        conv.load_own_variables(store)


def test_config_roundtrip():
    conv = WSConv2D(
        8, (3, 1), strides=2, padding="same", groups=2, use_bias=False, eps=1e-3,
        gain_initializer=keras.initializers.Constant(0.5), name="ws",
    )
    config = conv.get_config()
    assert config["eps"] == 1e-3 and config["groups"] == 2 and config["use_bias"] is False
    clone = WSConv2D.from_config(config)
    assert clone.get_config() == config
    clone.build((None, 8, 8, 4))
    np.testing.assert_array_equal(to_np(clone.gain), np.full(8, 0.5))
    assert clone.kernel.shape == (3, 1, 2, 8)


def test_default_kernel_initializer_is_he_normal():
    assert WSConv2D(4, 3).get_config()["kernel_initializer"]["class_name"] == "HeNormal"


@pytest.mark.parametrize("bad", ["channels_first", "NCHW"])
def test_bad_data_format_raises(bad):
    with pytest.raises(ValueError, match="channels_last"):
        WSConv2D(4, 3, data_format=bad)


def test_bad_eps_raises():
    with pytest.raises(ValueError, match="eps"):
        WSConv2D(4, 3, eps=0.0)


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="PyTorch has no XLA: jit_compile=True means torch.compile there, minutes of compiling on a CPU",
)
def test_fit_with_xla():
    # A two-conv model compiles in ~1.5 s on CPU.
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            WSConv2D(4, 3, padding="same"),
            WSConv2D(4, 3, padding="same", groups=2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", jit_compile=True)
    assert model.jit_compile is True
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 8, 8, 3)).astype("float32")
    history = model.fit(x, rng.integers(0, 2, 8), epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(to_np(model.layers[0].gain), 1.0)


# === The tap-matmul filter gradient (a CPU fast path of TensorFlow's bfloat16 convs) ===


@pytest.mark.tensorflow_only(reason="the tap-matmul gradient is TensorFlow code; compared with TensorFlow's own op")
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel_size", [1, 2, 3])
def test_tap_matmul_filter_gradient_equals_tensorflows(padding, kernel_size):
    import tensorflow as tf

    from nfnet_keras.layers.wsconv import tap_matmul_filter_gradient

    rng = np.random.default_rng(kernel_size)
    x = tf.constant(rng.standard_normal((3, 7, 6, 5)), tf.float32)
    shape = (kernel_size, kernel_size, 5, 4)
    out_shape = tf.nn.conv2d(x, tf.zeros(shape), 1, padding.upper()).shape
    upstream = tf.constant(rng.standard_normal(out_shape), tf.float32)
    expected = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=shape, out_backprop=upstream,
                                               strides=[1, 1, 1, 1], padding=padding.upper())
    np.testing.assert_allclose(to_np(tap_matmul_filter_gradient(x, upstream, shape, padding)), to_np(expected),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.tensorflow_only(reason="which convs take the path is decided for TensorFlow only")
def test_tap_matmul_applies_to_bfloat16_small_maps_with_many_channels(monkeypatch):
    from nfnet_keras.layers import wsconv
    from nfnet_keras.layers.wsconv import uses_tap_matmul

    monkeypatch.setattr(wsconv, "tensorflow_on_cpu_only", lambda: True)
    monkeypatch.setattr(wsconv, "_cpu_lacks_bfloat16", lambda: False)  # with bfloat16 kernels
    small = ((None, 7, 7, 256), (3, 3, 256, 256))
    assert uses_tap_matmul(*small, "bfloat16")
    assert uses_tap_matmul((None, 11, 11, 128), (3, 3, 128, 128), "bfloat16")
    assert not uses_tap_matmul(*small, "float32")  # TensorFlow's float32 gradient won at all but one shape
    assert not uses_tap_matmul(*small, "float16")  # not measured
    assert not uses_tap_matmul((None, 15, 15, 256), (3, 3, 256, 256), "bfloat16")  # > 121 positions
    assert not uses_tap_matmul((None, 7, 7, 64), (3, 3, 64, 256), "bfloat16")  # too few channels
    assert not uses_tap_matmul((None, None, None, 256), (3, 3, 256, 256), "bfloat16")  # unknown map size
    assert not uses_tap_matmul(*small, "bfloat16", strides=(2, 2))
    assert not uses_tap_matmul(*small, "bfloat16", dilation_rate=(2, 2))
    monkeypatch.setattr(wsconv, "_cpu_lacks_bfloat16", lambda: True)  # an AVX2-only CPU: reference bfloat16 kernels
    assert wsconv.emulated_bfloat16() and not uses_tap_matmul(*small, "bfloat16")
    monkeypatch.setattr(wsconv, "tensorflow_on_cpu_only", lambda: False)  # a GPU, or another backend
    assert not wsconv.emulated_bfloat16() and not uses_tap_matmul(*small, "bfloat16")


@pytest.mark.tensorflow_only(reason="the tap-matmul gradient is TensorFlow code, taken in a traced train step")
def test_wsconv_on_the_tap_matmul_path_has_the_same_gradients(monkeypatch):
    import tensorflow as tf

    from nfnet_keras.layers import wsconv

    monkeypatch.setattr(wsconv, "tensorflow_on_cpu_only", lambda: True)  # the path under test, even beside a GPU
    monkeypatch.setattr(wsconv, "_cpu_lacks_bfloat16", lambda: False)  # with bfloat16 kernels
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((2, 4, 4, 128)), tf.bfloat16)
    upstream = tf.constant(rng.standard_normal((2, 4, 4, 128)), tf.float32)
    conv = WSConv2D(128, 3, padding="same", dtype="mixed_bfloat16")
    conv.build(x.shape)

    def gradients():
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.cast(conv(x), tf.float32) * upstream)
            return tape.gradient(loss, [x, conv.kernel, conv.bias, conv.gain])

        ops_used = {op.type for op in step.get_concrete_function(x).graph.get_operations()}
        return [to_np(tf.cast(g, tf.float32)) for g in step(x)], ops_used

    taps, taps_ops = gradients()
    monkeypatch.setattr(wsconv, "TAP_MATMUL_MAX_POSITIONS", 0)
    reference, reference_ops = gradients()
    assert "Conv2DBackpropFilter" in reference_ops and "Conv2DBackpropFilter" not in taps_ops
    for ours, expected in zip(taps, reference):  # both bfloat16 sums, in other orders
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours / scale, expected / scale, atol=2e-2)


@pytest.mark.tensorflow_only(reason="the bias add's custom gradient exists only under TensorFlow")
@pytest.mark.parametrize("emulated", [False, True])
def test_bfloat16_bias_gradient_is_a_matmul_only_where_bfloat16_has_kernels(monkeypatch, emulated):
    # On reference bfloat16 kernels (an AVX2-only CPU) a bfloat16 matmul does not accumulate in float32.
    import tensorflow as tf

    from nfnet_keras.layers import wsconv

    monkeypatch.setattr(wsconv, "emulated_bfloat16", lambda: emulated)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.standard_normal((8, 6, 6, 4)), tf.bfloat16)
    upstream = tf.constant(rng.standard_normal((8, 6, 6, 4)), tf.bfloat16)
    bias = tf.Variable(np.zeros(4, "float32"))

    @tf.function
    def bias_gradient(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(wsconv.add_channel_bias(x, bias) * upstream, tf.float32))
        return tape.gradient(loss, bias)

    ops_used = {op.type for op in bias_gradient.get_concrete_function(x).graph.get_operations()}
    assert ("MatMul" in ops_used) is (not emulated)
    expected = to_np(tf.cast(upstream, tf.float32)).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(to_np(bias_gradient(x)), expected, rtol=1e-2, atol=0.1)
