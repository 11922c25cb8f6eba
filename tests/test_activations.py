"""The gamma table and ScaledActivation (nfnet_keras/layers/activations.py)."""

import math

import keras
import numpy as np
import pytest
from keras import ops
from scipy import integrate, special

from nfnet_keras import GAMMAS, ScaledActivation
from nfnet_keras.layers.activations import ACTIVATIONS

from conftest import keras_roundtrip, run_layer_test, value_and_grad


def to_np(x):
    return keras.ops.convert_to_numpy(x)


SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805

# NumPy versions of every activation, written from the definitions (not from
# keras), with the parameters the table was published with: leaky_relu slope
# 0.01, elu/celu alpha 1, tanh-approximated GELU. `test_numpy_twins_match_keras`
# ties them to `nfnet_keras.layers.activations.ACTIVATIONS`.
NUMPY_ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "gelu_exact": lambda z: 0.5 * z * (1 + special.erf(z / math.sqrt(2))),
    "silu": lambda z: z * special.expit(z),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "selu": lambda z: SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0))),
    "tanh": np.tanh,
    "sigmoid": special.expit,
    "softplus": lambda z: np.logaddexp(0.0, z),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "relu6": lambda z: np.clip(z, 0.0, 6.0),
    "celu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),  # alpha 1
    "log_sigmoid": lambda z: -np.logaddexp(0.0, -z),
    "soft_sign": lambda z: z / (1 + np.abs(z)),
    "identity": lambda z: z,
}
NUMPY_ACTIVATIONS["swish"] = NUMPY_ACTIVATIONS["silu"]
NUMPY_ACTIVATIONS["linear"] = NUMPY_ACTIVATIONS["identity"]


def np_glu(x):
    a, b = np.split(x, 2, axis=-1)
    return a * special.expit(b)


def np_log_softmax(x):
    return x - special.logsumexp(x, axis=-1, keepdims=True)


def gaussian_moment(f, k):
    """E[f(z)^k], z ~ N(0, 1), by adaptive quadrature split at the kinks 0 and 6."""
    def integrand(z):
        return float(f(np.float64(z))) ** k * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    pieces = [(-np.inf, 0.0), (0.0, 6.0), (6.0, np.inf)]
    return sum(
        integrate.quad(integrand, a, b, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
        for a, b in pieces
    )


def log_softmax_variance(n, rows, seed=0):
    """Var(log_softmax(z)_i), z ~ N(0, I_n), by Monte Carlo over `rows` draws of z.

    Every entry has the same distribution; y_i = z_i - L with L = logsumexp(z),
    so Var(y_i) = Var(z_i) - 2 Cov(z_i, L) + Var(L). Var(z_i) = 1 exactly; the
    two other terms are sampled. Var(L) ~ 1.7/n and Cov(z_i, L) ~ 1/n are
    small, and so are their sampling errors: at n = 256 and 16384 draws the
    estimate's spread over seeds is 7e-5, against 1.1e-3 for the variance of
    sampled y itself. Cov(z_i, L) is averaged over i, as
    E[mean_i(z_i) (L - E[L])].
    """
    rng = np.random.default_rng(seed)
    sums, means = [], []
    for start in range(0, rows, 4096):
        z = rng.standard_normal((min(4096, rows - start), n))
        sums.append(special.logsumexp(z, axis=1))
        means.append(z.mean(axis=1))
    lse, z_mean = np.concatenate(sums), np.concatenate(means)
    cov = np.mean((lse - lse.mean()) * z_mean)
    return 1.0 - 2.0 * cov + lse.var()


# log_softmax normalises over an axis of n entries, and its variance depends on
# n: 1 + (e - 3)/n + O(1/n^2) (`test_log_softmax_variance_asymptotics`). The
# table's gamma is checked at n = 256, the widest stage of the seed network.
LOG_SOFTMAX_N = 256


def computed_gamma(name):
    if name == "glu":
        # glu(x) = a * sigmoid(b), a and b independent N(0, 1) halves of x:
        # Var = E[a^2] E[sigmoid(b)^2] - (E[a] E[sigmoid(b)])^2 = E[sigmoid(b)^2].
        return 1.0 / math.sqrt(gaussian_moment(special.expit, 2))
    if name == "log_softmax":
        # 16384 draws: the sampling error of gamma is ~4e-5, well below the
        # table's tolerance of 1e-3.
        return 1.0 / math.sqrt(log_softmax_variance(LOG_SOFTMAX_N, rows=16384))
    f = NUMPY_ACTIVATIONS[name]
    m1, m2 = gaussian_moment(f, 1), gaussian_moment(f, 2)
    return 1.0 / math.sqrt(m2 - m1 * m1)


@pytest.fixture(scope="module")
def computed_gammas():
    return {name: computed_gamma(name) for name in GAMMAS}


def test_quadrature_reproduces_closed_forms():
    # Known closed forms, to trust the quadrature before trusting the table.
    assert computed_gamma("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-10)
    assert computed_gamma("selu") == pytest.approx(1.0, rel=1e-8)  # SELU is self-normalising
    assert computed_gamma("identity") == pytest.approx(1.0, rel=1e-12)
    # relu6 only differs from relu beyond 6 sigma.
    assert computed_gamma("relu6") == pytest.approx(computed_gamma("relu"), rel=1e-8)


def test_table_covers_every_activation():
    assert set(GAMMAS) == set(ACTIVATIONS)
    assert set(GAMMAS) == set(NUMPY_ACTIVATIONS) | {"glu", "log_softmax"}


@pytest.mark.parametrize("name", sorted(GAMMAS))
def test_gamma_table_entry(name, computed_gammas):
    assert GAMMAS[name] == pytest.approx(computed_gammas[name], rel=1e-3)


def test_published_gammas_are_sampled_values(computed_gammas):
    # The published constants were measured by sampling and sit up to ~5e-4
    # above the exact values (within the table's 1e-3, checked above):
    # sigmoid is one of them, identity is exact.
    def rel(name):
        return (GAMMAS[name] - computed_gammas[name]) / computed_gammas[name]

    assert abs(rel("sigmoid")) > 1e-4
    assert abs(rel("identity")) < 1e-10 and abs(rel("linear")) < 1e-10


def test_log_softmax_gamma_is_the_wide_axis_value():
    # Measured at n = 256 (1.00059) and n = 1024 (1.00014): the table's
    # 1.000208 lies within 1e-3 of both and is above 1, as the variance of
    # log_softmax is below 1 for every n, approaching 1 as n grows.
    narrow = 1.0 / math.sqrt(log_softmax_variance(256, rows=16384, seed=1))
    wide = 1.0 / math.sqrt(log_softmax_variance(1024, rows=4096, seed=2))
    assert 1.0 < wide < narrow
    # The first-order formula, up to its O(1/n^2) term (~1e-4 in the variance here).
    assert narrow == pytest.approx(1 / math.sqrt(1 + (math.e - 3) / 256), rel=2e-4)
    for gamma in (narrow, wide):
        assert GAMMAS["log_softmax"] == pytest.approx(gamma, rel=1e-3)
    assert abs(GAMMAS["log_softmax"] - wide) < abs(GAMMAS["log_softmax"] - narrow)


def test_log_softmax_variance_asymptotics():
    # Var(x_1 - logsumexp(x)) = 1 + (e - 3)/n + O(1/n^2): at n = 256 the
    # prediction is 1 - 1.10e-3, and 1 + (e - 2)/n = 1 + 2.8e-3 is rejected.
    # Sampled directly (4M values) the variance spreads by ~1e-3 over seeds;
    # the control-variate estimate by ~7e-5.
    n = 256
    x = np.random.default_rng(0).standard_normal((16384, n))
    var = np_log_softmax(x).var()
    assert var == pytest.approx(1 + (math.e - 3) / n, abs=1e-3)
    assert var < 1.0
    precise = log_softmax_variance(n, rows=16384, seed=3)
    assert precise == pytest.approx(1 + (math.e - 3) / n, abs=3e-4)
    assert precise < 1 - 5e-4
    # The Keras version agrees with the NumPy one.
    got = to_np(ACTIVATIONS["log_softmax"](keras.ops.convert_to_tensor(x[:8], "float32")))
    np.testing.assert_allclose(got, np_log_softmax(x[:8]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_numpy_twins_match_keras(name):
    # The integrated functions are the ones the package runs (e.g. GELU's tanh
    # approximation, leaky slope 0.01), on both sides of every kink.
    x = np.concatenate([np.linspace(-8, 8, 161), [-1e-3, 0.0, 1e-3, 5.999, 6.0, 6.001]])
    got = to_np(ACTIVATIONS[name](keras.ops.convert_to_tensor(x, "float32")))
    np.testing.assert_allclose(got, NUMPY_ACTIVATIONS[name](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "glu", "log_softmax"])
def test_scaled_activation_is_activation_times_gamma(name):
    x = np.random.default_rng(1).standard_normal((4, 5, 5, 6)).astype("float32")
    reference = {"glu": np_glu, "log_softmax": np_log_softmax}.get(name) or NUMPY_ACTIVATIONS[name]
    layer = ScaledActivation(name)
    out = to_np(layer(x))
    np.testing.assert_allclose(out, reference(x.astype("float64")) * GAMMAS[name], rtol=1e-5, atol=1e-6)
    assert out.shape == layer.compute_output_shape(x.shape)


def test_scaled_activation_has_unit_variance_on_gaussian_input():
    z = np.random.default_rng(2).standard_normal((200_000,)).astype("float32")
    for name in ("relu", "gelu", "silu", "tanh"):
        assert to_np(ScaledActivation(name)(z)).var() == pytest.approx(1.0, abs=0.01), name


def test_unknown_activation_lists_allowed_names():
    with pytest.raises(ValueError, match="Unknown activation 'rleu'") as info:
        ScaledActivation("rleu")
    for name in ("relu", "gelu", "glu", "log_softmax", "identity"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "activation, output_shape",
    [("relu", (2, 4, 4, 6)), ("glu", (2, 4, 4, 3)), ("log_softmax", (2, 4, 4, 6))],
)
def test_scaled_activation_layer_harness(activation, output_shape, tmp_path):
    run_layer_test(
        ScaledActivation, dict(activation=activation), (2, 4, 4, 6), tmp_path,
        expected_output_shape=output_shape,
    )


def test_scaled_activation_config_and_keras_roundtrip(tmp_path):
    layer = ScaledActivation("gelu", name="act")
    clone = ScaledActivation.from_config(layer.get_config())
    assert clone.activation == "gelu" and clone.gamma == GAMMAS["gelu"]
    reloaded = keras_roundtrip(layer, tmp_path, input_shape=(3, 3, 4))
    x = np.random.default_rng(3).standard_normal((2, 3, 3, 4)).astype("float32")
    assert reloaded.activation == "gelu"
    np.testing.assert_array_equal(to_np(reloaded(x)), to_np(layer(x)))


# === The fused tanh GELU of the train step ===


@pytest.mark.tensorflow_only(reason="fused_gelu is its own code on TensorFlow only; elsewhere it is ops.gelu")
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_fused_gelu_matches_gelu_times_scale_values_and_gradients(dtype, tol):
    from nfnet_keras.layers.activations import fused_gelu

    x = np.linspace(-6, 6, 97).astype("float32").reshape(1, 97)
    upstream = np.random.default_rng(0).standard_normal((1, 97)).astype("float32")

    def loss(activation):
        def f(x):
            y = activation(ops.cast(x, dtype))
            return ops.sum(ops.cast(y, "float32") * upstream), ops.cast(y, "float32")

        return value_and_grad(f, [], [x])

    (_, ours), (grad_ours,) = loss(lambda x: fused_gelu(x, 1.7))
    (_, plain), (grad_plain,) = loss(lambda x: ops.gelu(ops.cast(x, "float32"), approximate=True) * 1.7)
    np.testing.assert_allclose(ours, plain, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad_ours, grad_plain, rtol=tol, atol=tol)


@pytest.mark.tensorflow_only(reason="training and inference differ in the GELU's implementation on TensorFlow only")
def test_scaled_gelu_is_the_same_function_in_training_and_inference():
    layer = ScaledActivation("gelu")
    x = ops.convert_to_tensor(np.linspace(-4, 4, 33).astype("float32"))
    np.testing.assert_allclose(to_np(layer(x, training=True)), to_np(layer(x, training=False)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(layer.unscaled(x, training=True)), to_np(layer.unscaled(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow_only(reason="the fused GELU's two halves are XLA-compiled TensorFlow functions")
def test_scaled_gelu_compiles_with_xla_in_training_only(monkeypatch):
    # Inference graphs (and so every export, which TF Serving must run without XLA) keep the plain ops.
    import tensorflow as tf

    from nfnet_keras.layers import activations

    monkeypatch.setattr(activations, "tensorflow_on_cpu_only", lambda: True)  # the path under test, even beside a GPU
    layer = ScaledActivation("gelu")
    x = tf.constant(np.linspace(-4, 4, 33).astype("float32"))

    def xla_calls(training):
        graph = tf.function(lambda x: layer(x, training=training)).get_concrete_function(x).graph
        return [op for op in graph.get_operations()
                if op.node_def.attr["_XlaMustCompile"].b or "_XlaMustCompile" in str(op.node_def)]

    assert xla_calls(training=False) == []
    assert len(xla_calls(training=True)) == 1
    float64 = tf.function(lambda x: activations.activate("gelu", x, training=True))
    graph = float64.get_concrete_function(tf.cast(x, "float64")).graph
    assert not any("_XlaMustCompile" in str(op.node_def) for op in graph.get_operations())  # XLA's is float32
    monkeypatch.setattr(activations, "tensorflow_on_cpu_only", lambda: False)  # a GPU: the plain ops
    assert xla_calls(training=True) == []
