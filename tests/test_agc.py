"""Adaptive Gradient Clipping (nfnet_keras/agc.py)."""

import numpy as np
import pytest

import keras
import tensorflow as tf
from nfnet_keras import clip_gradient, unitwise_norm, with_agc

from conftest import assert_same_weights, keras_roundtrip


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def f32(x):
    return np.asarray(x, "float32")


# === unitwise_norm ===


def test_unitwise_norm_dense_kernel():
    # (in=2, out=3): one norm per output column, over the inputs.
    w = f32([[3.0, 0.0, 1.0], [4.0, -2.0, 1.0]])
    norm = to_np(unitwise_norm(w))
    assert norm.shape == (1, 3)  # broadcastable to w
    np.testing.assert_allclose(norm, [[5.0, 2.0, np.sqrt(2.0)]], rtol=1e-6)


def test_unitwise_norm_hwio_kernel():
    # (h=2, w=1, in=2, out=2): per output channel over h, w and in.
    w = np.zeros((2, 1, 2, 2), "float32")
    w[..., 0] = [[[1.0, 2.0]], [[2.0, 4.0]]]  # sqrt(1 + 4 + 4 + 16) = 5
    w[..., 1] = [[[0.0, 0.0]], [[0.0, 3.0]]]  # 3
    norm = to_np(unitwise_norm(w))
    assert norm.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(norm.ravel(), [5.0, 3.0], rtol=1e-6)


def test_unitwise_norm_vector_and_scalar():
    np.testing.assert_allclose(to_np(unitwise_norm(f32([-3.0, 4.0, 0.0]))), [3.0, 4.0, 0.0])
    assert float(to_np(unitwise_norm(f32(-2.5)))) == 2.5


# === clip_gradient ===


def test_clip_dense_kernel_clips_only_the_large_units():
    w = f32([[3.0, 0.0], [4.0, 1.0]])  # column norms 5, 1 -> max norms 0.05, 0.01
    g = f32([[0.006, 0.3], [0.008, 0.4]])  # column norms 0.01 (kept), 0.5 (clipped)
    out = to_np(clip_gradient(g, w, clipping=0.01))
    np.testing.assert_allclose(out[:, 0], [0.006, 0.008], rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], [0.006, 0.008], rtol=1e-5)  # 0.5 -> 0.01, same direction
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), [0.01, 0.01], rtol=1e-5)


def test_clip_hwio_kernel():
    w = np.zeros((1, 1, 2, 2), "float32")
    w[0, 0, :, 0] = [0.6, 0.8]  # norm 1 -> max 0.1
    w[0, 0, :, 1] = [0.0, 2.0]  # norm 2 -> max 0.2
    g = np.zeros((1, 1, 2, 2), "float32")
    g[0, 0, :, 0] = [3.0, 4.0]  # norm 5 -> scaled by 0.1 / 5
    g[0, 0, :, 1] = [0.1, 0.0]  # norm 0.1 <= 0.2: kept
    out = to_np(clip_gradient(g, w, clipping=0.1))
    np.testing.assert_allclose(out[0, 0, :, 0], [0.06, 0.08], rtol=1e-5)
    np.testing.assert_allclose(out[0, 0, :, 1], [0.1, 0.0], rtol=1e-6)


def test_clip_vector_elementwise():
    w = f32([2.0, -0.5, 1.0])  # max norms 0.2, 0.05, 0.1
    g = f32([-1.0, 0.001, 0.1])
    out = to_np(clip_gradient(g, w, clipping=0.1))
    np.testing.assert_allclose(out, [-0.2, 0.001, 0.1], rtol=1e-6)  # sign kept; 0.1 is not > 0.1


def test_clip_scalar():
    assert float(to_np(clip_gradient(f32(3.0), f32(-2.0), clipping=0.5))) == pytest.approx(1.0)
    assert float(to_np(clip_gradient(f32(-0.5), f32(-2.0), clipping=0.5))) == pytest.approx(-0.5)


def test_nothing_clipped_returns_the_gradient_unchanged():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 4, 5)).astype("float32")
    g = (w * 1e-4).astype("float32")  # ||g_i|| = 1e-4 ||w_i|| < 0.01 ||w_i||
    np.testing.assert_array_equal(to_np(clip_gradient(g, w)), g)


def test_eps_floors_the_norm_of_a_zero_weight():
    # A zero weight (e.g. a bias at init) still gets a step: max = clipping * eps.
    w = np.zeros((2, 1), "float32")
    g = f32([[3.0], [4.0]])  # norm 5 -> 0.01 * 1e-3 = 1e-5
    np.testing.assert_allclose(to_np(clip_gradient(g, w)), [[6e-6], [8e-6]], rtol=1e-5)
    np.testing.assert_allclose(to_np(clip_gradient(g, w, eps=1e-2)), [[6e-5], [8e-5]], rtol=1e-5)


def test_zero_gradient_stays_zero_and_dtype_is_kept():
    w = f32([[1.0, 2.0]])
    out = clip_gradient(np.zeros((1, 2), "float16"), w)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    np.testing.assert_array_equal(to_np(out), 0.0)


# === with_agc ===


def toy_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="classifier")(x))


def toy_batch():
    rng = np.random.default_rng(1)
    return rng.standard_normal((16, 4)).astype("float32") * 5.0, rng.integers(0, 2, 16)


def test_with_agc_update_equals_manual_clipped_update():
    model = toy_model()
    x, y = toy_batch()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    before = [to_np(v).copy() for v in variables]
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    grads = [to_np(g) for g in tape.gradient(loss, variables)]

    lr, clipping = 0.1, 0.01
    optimizer = with_agc(keras.optimizers.SGD(lr), clipping=clipping)
    assert type(optimizer).__name__ == "AGCSGD" and isinstance(optimizer, keras.optimizers.SGD)
    model.compile(optimizer, loss_fn)
    model.train_on_batch(x, y)

    some_clipped = False
    for v, w0, g in zip(variables, before, grads):
        excluded = v.path.startswith("classifier/")
        step = g if excluded else to_np(clip_gradient(g, w0, clipping))
        np.testing.assert_allclose(to_np(v), w0 - lr * step, rtol=1e-5, atol=1e-7, err_msg=v.path)
        # The check can fail: AGC changes the hidden layer's update here, and
        # would have changed the classifier's.
        clipped = not np.allclose(to_np(clip_gradient(g, w0, clipping)), g)
        some_clipped |= clipped and not excluded
        if excluded:
            assert clipped, f"{v.path}: pick a batch where the exclusion matters"
    assert some_clipped


def test_with_agc_keeps_the_optimizer_config():
    base = keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    optimizer = with_agc(base, clipping=0.02, eps=1e-2, exclude=("head", "classifier"))
    config = optimizer.get_config()
    for key, value in base.get_config().items():
        if key != "name":
            assert config[key] == value, key
    assert config["agc_clipping"] == 0.02 and config["agc_eps"] == 1e-2
    assert config["agc_exclude"] == ["head", "classifier"]
    clone = type(optimizer).from_config(config)
    assert (clone.agc_clipping, clone.agc_eps, clone.agc_exclude) == (0.02, 1e-2, ("head", "classifier"))


def test_with_agc_rejects_bad_input():
    with pytest.raises(TypeError):
        with_agc("sgd")
    with pytest.raises(ValueError, match="clipping"):
        with_agc(keras.optimizers.SGD(), clipping=0.0)
    with pytest.raises(ValueError, match="already"):
        with_agc(with_agc(keras.optimizers.SGD()))
    used = keras.optimizers.SGD()
    used.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="built"):
        with_agc(used)


def test_agc_optimizer_survives_model_save_and_load(tmp_path):
    model = toy_model()
    x, y = toy_batch()
    model.compile(
        with_agc(keras.optimizers.SGD(0.1, momentum=0.9), clipping=0.02, exclude=("classifier",)),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    loaded = keras_roundtrip(model, tmp_path)
    opt = loaded.optimizer
    assert type(opt).__name__ == "AGCSGD"
    assert (opt.agc_clipping, opt.agc_eps, opt.agc_exclude) == (0.02, 1e-3, ("classifier",))
    assert opt.get_config()["momentum"] == 0.9
    assert_same_weights(model, loaded)
    # The momentum buffers came back too: one more identical step from both
    # gives identical weights (and that step still clips).
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    assert_same_weights(model, loaded)
    assert int(to_np(opt.iterations)) == 2
