"""Mixed precision: the model under `mixed_bfloat16` and `mixed_float16` policies (tiny preset).

bfloat16 runs natively on these CPUs (AVX512-BF16); float16 runs here too, slowly,
which is enough to check the graph a GPU would run: dtypes, the folded scales,
the bias gradient, loss scaling.
"""

import keras
import numpy as np
import pytest

from nfnet_keras import build_model
from nfnet_keras.training import TrainConfig, compile_model


@pytest.fixture(scope="module")
def float32_model():
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(3)
    model = build_model("tiny_grouped")
    rng = np.random.default_rng(0)
    for v in model.weights:  # non-trivial gains, biases and skip gains
        if v.path.endswith(("gain", "bias")):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    return model


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def images(n=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype("float32")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"], indirect=True)
def test_mixed_policy_matches_float32_and_keeps_logits_and_variables_float32(float32_model, policy):
    model = build_model("tiny_grouped")
    model.set_weights(float32_model.get_weights())
    assert all(v.dtype == "float32" for v in model.weights)
    block = next(layer for layer in model.layers if layer.name.startswith("stage"))
    assert block.compute_dtype == policy.split("_")[1]
    x = images()
    logits = model(x, training=False)
    assert logits.dtype == "float32"
    reference = np.asarray(float32_model(x, training=False))
    scale = np.abs(reference).max()
    # bfloat16 keeps 8 bits of mantissa, float16 11.
    tol = 0.08 if policy == "mixed_bfloat16" else 0.01
    assert np.abs(np.asarray(logits) - reference).max() <= tol * scale
    assert (np.asarray(logits).argmax(1) == reference.argmax(1)).mean() >= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"], indirect=True)
def test_mixed_policy_trains(float32_model, policy):
    model = build_model("tiny_grouped")
    model.set_weights(float32_model.get_weights())
    config = TrainConfig(preset="tiny_grouped", epochs=1, lr=0.05, precision=policy)
    compile_model(model, config, steps_per_epoch=4)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = images(32, seed=2), np.arange(32) % 10
    before = [np.asarray(v) for v in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    moved = [not np.allclose(a, np.asarray(v)) for a, v in zip(before, model.trainable_weights)]
    skip_gains = [m for m, v in zip(moved, model.trainable_weights) if v.path.endswith("skip_gain")]
    assert all(skip_gains) and sum(moved) >= 0.9 * len(moved)
    assert all(v.dtype == "float32" for v in model.trainable_weights)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_mixed_model_exports_as_its_float32_twin(float32_model, policy, tmp_path):
    import tensorflow as tf

    from nfnet_keras.data import preprocess
    from nfnet_keras.export import export_saved_model, float32_twin

    model = build_model("tiny_grouped")
    model.set_weights(float32_model.get_weights())
    twin = float32_twin(model)
    assert keras.mixed_precision.global_policy().name == policy  # restored
    assert all(layer.dtype_policy.name == "float32" for layer in twin._flatten_layers())
    x = images()
    np.testing.assert_allclose(np.asarray(twin(x)), np.asarray(float32_model(x)), atol=1e-5)
    # The bf16 model's own outputs are ~1e-2 off float32; the export serves the twin's.
    path = export_saved_model(model, "mixed", base_dir=str(tmp_path))
    uint8 = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    served = tf.saved_model.load(path).signatures["serving_default"](image=tf.constant(uint8))["probabilities"]
    expected = tf.nn.softmax(float32_model(preprocess(uint8)))
    np.testing.assert_allclose(served.numpy(), expected.numpy(), atol=1e-5)
    assert float32_twin(float32_model) is float32_model
