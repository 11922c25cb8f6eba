"""Adaptive Gradient Clipping (nfnet_keras/agc.py)."""

import inspect

import keras
import numpy as np
import pytest
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


# === Where AGC runs in the optimizer's step ===


def np_agc(grad, weight, clipping, eps=1e-3):
    """AGC in NumPy from the paper's formula: per output column of a dense kernel, per element of a vector."""
    grad, weight = np.asarray(grad, "float64"), np.asarray(weight, "float64")
    norm = (lambda t: np.abs(t)) if grad.ndim == 1 else (lambda t: np.sqrt((t**2).sum(axis=0, keepdims=True)))
    limit = clipping * np.maximum(norm(weight), eps)
    g_norm = norm(grad)
    return np.where(g_norm > limit, grad * limit / np.maximum(g_norm, 1e-6), grad)


def np_clip_by_norm(grad, clip):
    norm = np.sqrt((grad**2).sum())
    return grad * min(1.0, clip / norm)


# A dense kernel (in=2, out=2) and a bias. Column norms: W 0.5 and 5, G 1 and
# 0.5; with clipping 0.1 AGC shrinks column 0 (1 -> 0.05) and keeps column 1.
W0 = np.array([[0.3, 4.0], [0.4, 3.0]])
G = np.array([[0.6, 0.3], [0.8, 0.4]])
B0 = np.array([0.5, -2.0])
GB = np.array([0.2, 0.1])  # element-wise limits 0.05 and 0.2: 0.2 -> 0.05, 0.1 kept
LR, CLIPPING = 0.5, 0.1


def _one_step(**optimizer_kwargs):
    kernel = keras.Variable(W0.astype("float32"), name="kernel")
    bias = keras.Variable(B0.astype("float32"), name="bias")
    optimizer = with_agc(keras.optimizers.SGD(LR, **optimizer_kwargs), clipping=CLIPPING)
    optimizer.apply_gradients([(G.astype("float32"), kernel), (GB.astype("float32"), bias)])
    return to_np(kernel).astype("float64"), to_np(bias).astype("float64")


def test_agc_alone_step():
    kernel, bias = _one_step()
    np.testing.assert_allclose(kernel, W0 - LR * np.array([[0.03, 0.3], [0.04, 0.4]]), rtol=1e-6)
    np.testing.assert_allclose(bias, B0 - LR * np.array([0.05, 0.1]), rtol=1e-6)
    np.testing.assert_allclose(np_agc(G, W0, CLIPPING), [[0.03, 0.3], [0.04, 0.4]], rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, first, second",
    [
        # The optimizer's clipnorm (each tensor on its own) clips what AGC left.
        (dict(clipnorm=0.25),
         lambda g, w: np_clip_by_norm(np_agc(g, w, CLIPPING), 0.25),
         lambda g, w: np_agc(np_clip_by_norm(g, 0.25), w, CLIPPING)),
        (dict(clipvalue=0.1),
         lambda g, w: np.clip(np_agc(g, w, CLIPPING), -0.1, 0.1),
         lambda g, w: np_agc(np.clip(g, -0.1, 0.1), w, CLIPPING)),
    ],
    ids=["clipnorm", "clipvalue"],
)
def test_agc_runs_before_the_optimizers_own_clipping(kwargs, first, second):
    kernel, bias = _one_step(**kwargs)
    np.testing.assert_allclose(kernel, W0 - LR * first(G, W0), rtol=1e-5)
    np.testing.assert_allclose(bias, B0 - LR * first(GB, B0), rtol=1e-5)
    # The other order gives another step: the test can tell them apart.
    assert not np.allclose(W0 - LR * second(G, W0), kernel, rtol=1e-3)


def test_agc_runs_before_global_clipnorm():
    # global_clipnorm scales every gradient by one factor: clip / the global
    # norm of what AGC left (of kernel and bias together).
    clip = 0.25
    clipped = [np_agc(G, W0, CLIPPING), np_agc(GB, B0, CLIPPING)]
    scale = min(1.0, clip / np.sqrt(sum((g**2).sum() for g in clipped)))
    kernel, bias = _one_step(global_clipnorm=clip)
    np.testing.assert_allclose(kernel, W0 - LR * scale * clipped[0], rtol=1e-5)
    np.testing.assert_allclose(bias, B0 - LR * scale * clipped[1], rtol=1e-5)
    other_scale = min(1.0, clip / np.sqrt((G**2).sum() + (GB**2).sum()))
    assert not np.allclose(W0 - LR * np_agc(other_scale * G, W0, CLIPPING), kernel, rtol=1e-3)


def test_agc_clips_against_the_weights_before_decoupled_weight_decay():
    # Keras decays first (W <- W - lr wd W) and then steps, but AGC has
    # already clipped against the undecayed W: the limit of column 0 is
    # 0.1 * 0.5, not 0.1 * 0.5 * (1 - lr wd).
    wd = 0.4
    kernel, bias = _one_step(weight_decay=wd)
    np.testing.assert_allclose(kernel, W0 * (1 - LR * wd) - LR * np_agc(G, W0, CLIPPING), rtol=1e-5)
    np.testing.assert_allclose(bias, B0 * (1 - LR * wd) - LR * np_agc(GB, B0, CLIPPING), rtol=1e-5)
    decayed_first = W0 * (1 - LR * wd) - LR * np_agc(G, W0 * (1 - LR * wd), CLIPPING)
    assert not np.allclose(decayed_first, kernel, rtol=1e-3)


@pytest.mark.parametrize("wrap", ["loss_scale_factor", "LossScaleOptimizer"])
def test_agc_sees_unscaled_gradients(wrap):
    # A scaled loss gives scaled gradients: AGC must clip them after unscaling,
    # or its limit (relative to the weights) would be off by the scale.
    scale = 64.0
    kernel = keras.Variable(W0.astype("float32"), name="kernel")
    if wrap == "loss_scale_factor":
        optimizer = with_agc(keras.optimizers.SGD(LR, loss_scale_factor=scale), clipping=CLIPPING)
    else:
        optimizer = keras.optimizers.LossScaleOptimizer(
            with_agc(keras.optimizers.SGD(LR), clipping=CLIPPING), initial_scale=scale
        )
    optimizer.apply_gradients([((scale * G).astype("float32"), kernel)])
    np.testing.assert_allclose(to_np(kernel), W0 - LR * np_agc(G, W0, CLIPPING), rtol=1e-5)


def test_keras_routes_every_update_through_the_overridden_method():
    # AGC overrides Keras 3.15's private `_backend_apply_gradients(grads,
    # trainable_variables)`. This fails if Keras renames it, changes its
    # arguments, or stops calling it from apply_gradients, fit or a
    # LossScaleOptimizer, or calls it with still-scaled gradients.
    from nfnet_keras import agc

    base = keras.optimizers.Optimizer
    assert agc.HOOK == "_backend_apply_gradients"
    assert list(inspect.signature(getattr(base, agc.HOOK)).parameters) == ["self", "grads", "trainable_variables"]
    agc_class = type(with_agc(keras.optimizers.Adam()))
    assert getattr(agc_class, agc.HOOK) is agc._AGCMixin._backend_apply_gradients

    calls = []

    class Spy(keras.optimizers.SGD):
        def _backend_apply_gradients(self, grads, trainable_variables):
            values = [to_np(g) for g in grads] if tf.executing_eagerly() else None  # fit traces it
            calls.append((values, [v.path for v in trainable_variables]))
            return super()._backend_apply_gradients(grads, trainable_variables)

    variable = keras.Variable(np.ones(2, "float32"), name="w")
    Spy(0.1, loss_scale_factor=4.0).apply_gradients([(np.array([4.0, 8.0], "float32"), variable)])
    keras.optimizers.LossScaleOptimizer(Spy(0.1), initial_scale=8.0).apply_gradients(
        [(np.array([8.0, 16.0], "float32"), variable)]
    )
    assert [c[1] for c in calls] == [["w"], ["w"]]
    for grads, _ in calls:  # unscaled
        np.testing.assert_allclose(grads[0], [1.0, 2.0])
    model = toy_model()
    model.compile(Spy(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*toy_batch(), batch_size=8, epochs=1, verbose=0)  # traced once, run twice
    assert len(calls) == 3 and calls[-1][1] == [v.path for v in model.trainable_variables]


def test_agc_refuses_gradient_accumulation():
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        with_agc(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2))
