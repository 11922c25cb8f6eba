"""The gamma table and ScaledActivation (nfnet_keras/activations.py)."""

import math

import numpy as np
import pytest
from scipy import integrate, special

import keras
from nfnet_keras import GAMMAS, ScaledActivation
from nfnet_keras.activations import ACTIVATIONS

from conftest import keras_roundtrip

SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805

# NumPy versions of every activation, written from the definitions (not from
# keras), with the parameters the table was published with: leaky_relu slope
# 0.01, elu/celu alpha 1, tanh-approximated GELU. `test_numpy_twins_match_keras`
# ties them to `nfnet_keras.activations.ACTIVATIONS`.
NUMPY_ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
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


def computed_gamma(name):
    if name == "glu":
        # glu(x) = a * sigmoid(b), a and b independent N(0, 1) halves of x:
        # Var = E[a^2] E[sigmoid(b)^2] - (E[a] E[sigmoid(b)])^2 = E[sigmoid(b)^2].
        return 1.0 / math.sqrt(gaussian_moment(special.expit, 2))
    if name == "log_softmax":
        # For x of n iid N(0, 1) entries, y_1 = x_1 - L with L = logsumexp(x):
        # Var(y_1) = 1 - 2 Cov(x_1, L) + Var(L). Stein's lemma gives
        # Cov(x_1, L) = E[dL/dx_1] = E[softmax(x)_1] = 1/n exactly, and the delta
        # method on L = log n + log(mean(e^x)) gives Var(L) = (e - 1)/n + O(1/n^2).
        # So Var(y_1) = 1 + (e - 3)/n + O(1/n^2) -> 1 and gamma -> 1 as n grows;
        # the table's value depends on the axis size and matches its limit to 2e-4.
        # (The issue wrote 1 + (e - 2)/n, forgetting the covariance term: that
        # would put gamma below 1, while the published one is above 1, as is
        # `test_log_softmax_variance_asymptotics`' measurement.)
        return 1.0
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


def test_gamma_disagreements_recorded(computed_gammas, record_property):
    """Lists the published values that differ from the computation by more than 1e-4.

    The published constants were measured by sampling and sit systematically
    about 5e-4 above the exact values; the computation is the one to trust.
    Shown with `pytest -rP`; also recorded as a junit property.
    """
    rows = []
    for name in sorted(GAMMAS):
        exact, table = computed_gammas[name], GAMMAS[name]
        rel = (table - exact) / exact
        if abs(rel) > 1e-4:
            rows.append(f"{name:12s} table {table:.10f} computed {exact:.10f} rel {rel:+.2e}")
    print("gamma entries off by more than 1e-4 relative:\n" + "\n".join(rows))
    record_property("gamma_disagreements", rows)
    # sigmoid is the one the issue singled out (~5e-4): make sure we see it.
    assert any(row.startswith("sigmoid ") for row in rows)
    assert not any(row.startswith(("identity ", "linear ")) for row in rows)


def test_log_softmax_variance_asymptotics():
    # Monte Carlo check of Var(x_1 - logsumexp(x)) = 1 + (e - 3)/n + O(1/n^2)
    # at n = 256: the prediction is 1 - 1.10e-3, the sampling error ~3e-4
    # (4M values), and 1 + (e - 2)/n = 1 + 2.8e-3 is rejected.
    n = 256
    x = np.random.default_rng(0).standard_normal((16384, n))
    var = np_log_softmax(x).var()
    assert var == pytest.approx(1 + (math.e - 3) / n, abs=1e-3)
    assert var < 1.0
    # The Keras version agrees with the NumPy one.
    got = np.asarray(ACTIVATIONS["log_softmax"](keras.ops.convert_to_tensor(x[:8], "float32")))
    np.testing.assert_allclose(got, np_log_softmax(x[:8]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_numpy_twins_match_keras(name):
    # The integrated functions are the ones the package runs (e.g. GELU's tanh
    # approximation, leaky slope 0.01), on both sides of every kink.
    x = np.concatenate([np.linspace(-8, 8, 161), [-1e-3, 0.0, 1e-3, 5.999, 6.0, 6.001]])
    got = np.asarray(ACTIVATIONS[name](keras.ops.convert_to_tensor(x, "float32")))
    np.testing.assert_allclose(got, NUMPY_ACTIVATIONS[name](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "glu", "log_softmax"])
def test_scaled_activation_is_activation_times_gamma(name):
    x = np.random.default_rng(1).standard_normal((4, 5, 5, 6)).astype("float32")
    reference = {"glu": np_glu, "log_softmax": np_log_softmax}.get(name) or NUMPY_ACTIVATIONS[name]
    layer = ScaledActivation(name)
    out = np.asarray(layer(x))
    np.testing.assert_allclose(out, reference(x.astype("float64")) * GAMMAS[name], rtol=1e-5, atol=1e-6)
    assert out.shape == layer.compute_output_shape(x.shape)


def test_scaled_activation_has_unit_variance_on_gaussian_input():
    z = np.random.default_rng(2).standard_normal((200_000,)).astype("float32")
    for name in ("relu", "gelu", "silu", "tanh"):
        assert np.asarray(ScaledActivation(name)(z)).var() == pytest.approx(1.0, abs=0.01), name


def test_unknown_activation_lists_allowed_names():
    with pytest.raises(ValueError, match="Unknown activation 'rleu'") as info:
        ScaledActivation("rleu")
    for name in ("relu", "gelu", "glu", "log_softmax", "identity"):
        assert name in str(info.value)


def test_scaled_activation_config_and_keras_roundtrip(tmp_path):
    layer = ScaledActivation("gelu", name="act")
    clone = ScaledActivation.from_config(layer.get_config())
    assert clone.activation == "gelu" and clone.gamma == GAMMAS["gelu"]
    reloaded = keras_roundtrip(layer, tmp_path, input_shape=(3, 3, 4))
    x = np.random.default_rng(3).standard_normal((2, 3, 3, 4)).astype("float32")
    assert reloaded.activation == "gelu"
    np.testing.assert_array_equal(np.asarray(reloaded(x)), np.asarray(layer(x)))
