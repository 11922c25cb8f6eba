"""airbench94's data-side tricks: weighted test-time augmentation, alternating flips, Dirac init."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from nfnet_keras import config as config_lib
from nfnet_keras.inference import TTA_POLICY_VIEWS, TTA_POLICY_WEIGHTS, TTA_VIEWS, keras_predictor, with_tta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPEED = ["--recipe", "speed", "--preset", "tiny_speed", "--batch-size", "64", "--val-size", "128",
              "--precision", "float32", "--quiet", "--no-export"]


@pytest.fixture(scope="module")
def tricks_run(tmp_path_factory, synthetic_cifar_dir):
    """A 2-epoch tiny_speed run with the weighted TTA on 256 synthetic images."""
    run_dir = tmp_path_factory.mktemp("tricks") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "nfnet_keras.fit", *TINY_SPEED, "--epochs", "2", "--train-limit", "256",
         "--tta", "flip_translate_weighted", "--run-dir", str(run_dir), "--data-dir", synthetic_cifar_dir],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "metrics.json") as f:
        return run_dir, result, json.load(f)


# === Weighted test-time augmentation ===


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_weighted_tta_averages_the_logits_with_airbench_weights():
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype="uint8")

    def logits_of(images):  # a view's logits: 10 of its pixels, scaled; every view gives other values
        return images.reshape(len(images), -1)[:, 5:15].astype("float64") / 40.0

    out = with_tta(lambda images: _softmax(logits_of(images)), "flip_translate_weighted")(x)
    mirror = x[:, :, ::-1]
    views = [x, mirror, TTA_VIEWS["translate(-1,-1)"](x), TTA_VIEWS["translate(+1,+1)"](x),
             TTA_VIEWS["translate(-1,-1)"](mirror), TTA_VIEWS["translate(+1,+1)"](mirror)]
    weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    expected = _softmax(sum(w * logits_of(v) for w, v in zip(weights, views)))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)
    # Not the probability average of the same weights, nor the plain mean of the logits.
    assert not np.allclose(out, sum(w * _softmax(logits_of(v)) for w, v in zip(weights, views)), atol=1e-4)
    assert not np.allclose(out, _softmax(np.mean([logits_of(v) for v in views], axis=0)), atol=1e-4)


def test_weighted_tta_counts_an_underflowed_probability_as_the_smallest_float32():
    probabilities = np.array([[1.0, 0.0]], "float32")
    out = with_tta(lambda images: probabilities, "flip_translate_weighted")(np.zeros((1, 4, 4, 3), "uint8"))
    assert np.isfinite(out).all() and out.dtype == np.float32
    np.testing.assert_allclose(out, [[1.0, np.finfo("float32").tiny]], rtol=1e-6)


def test_every_policy_is_declared_once_with_weights_summing_to_one():
    assert tuple(TTA_POLICY_WEIGHTS) == config_lib.TTA_POLICIES
    for policy, pairs in TTA_POLICY_WEIGHTS.items():
        assert abs(sum(w for _, w in pairs) - 1.0) < 1e-12, policy
        assert TTA_POLICY_VIEWS[policy] == tuple(v for v, _ in pairs)
        assert set(TTA_POLICY_VIEWS[policy]) <= set(TTA_VIEWS)
    assert TTA_POLICY_VIEWS["flip_translate_weighted"] == TTA_POLICY_VIEWS["flip_translate"]


def test_fit_reports_the_weighted_tta(tricks_run, synthetic_cifar_dir):
    from nfnet_keras.data import load_cifar10

    run_dir, result, metrics = tricks_run
    assert metrics["tta"] == "flip_translate_weighted"
    assert metrics["tta_views"] == list(TTA_POLICY_VIEWS["flip_translate"])
    assert metrics["tta_weights"] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    assert "flip_translate_weighted test-time augmentation (6 views: identity, mirror" in result.stdout
    # The reported figure is the weighted TTA's accuracy of the saved model on the test images.
    _, (x_test, y_test) = load_cifar10(synthetic_cifar_dir, test_only=True)
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    predict = with_tta(keras_predictor(model), "flip_translate_weighted")
    assert metrics["test_accuracy_tta"] == float((predict(x_test).argmax(1) == y_test).mean())
