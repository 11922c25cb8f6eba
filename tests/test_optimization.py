"""The optimizer of a run: schedule values at given steps, weight-decay exclusions, XLA choice."""

import math

import keras
import numpy as np
import pytest

from nfnet_keras.config import TrainConfig
from nfnet_keras.optimization import OneCycle, make_optimizer, make_schedule
from nfnet_keras.training import resolve_jit

STEPS = 10  # steps per epoch


def _lr(schedule, step):
    if isinstance(schedule, float):
        return schedule
    return float(schedule(step))


def test_step_schedule_divides_by_ten_at_quarter_half_and_three_quarters():
    schedule = make_schedule(TrainConfig(epochs=200, lr=0.01, schedule="step"), STEPS)
    # The report: lr / 10 every 50 epochs.
    expected = {0: 0.01, 50 * STEPS - 1: 0.01, 50 * STEPS + 1: 1e-3, 100 * STEPS + 1: 1e-4, 150 * STEPS + 1: 1e-5,
                200 * STEPS - 1: 1e-5}
    for step, lr in expected.items():
        assert _lr(schedule, step) == pytest.approx(lr, rel=1e-6), step


def test_step_schedule_that_never_fires_is_the_constant_lr():
    assert make_schedule(TrainConfig(epochs=1, lr=0.1, schedule="step"), STEPS) == 0.1  # every boundary at 0
    assert make_schedule(TrainConfig(epochs=40, lr=0.1, schedule="constant"), STEPS) == 0.1


def test_cosine_schedule_with_and_without_warmup():
    total = 20 * STEPS
    plain = make_schedule(TrainConfig(epochs=20, lr=0.2, schedule="cosine"), STEPS)
    for step in (0, total // 4, total // 2, total):
        assert _lr(plain, step) == pytest.approx(0.1 * (1 + math.cos(math.pi * step / total)), abs=1e-7)
    warm = make_schedule(TrainConfig(epochs=20, lr=0.2, schedule="cosine", warmup_epochs=2), STEPS)
    assert _lr(warm, 0) == pytest.approx(0.0, abs=1e-7)
    assert _lr(warm, 10) == pytest.approx(0.1, rel=1e-5)  # half-way up the 20 warm-up steps
    assert _lr(warm, 20) == pytest.approx(0.2, rel=1e-5)
    decay = total - 20
    assert _lr(warm, 20 + decay // 2) == pytest.approx(0.1, rel=1e-4)
    assert _lr(warm, total) == pytest.approx(0.0, abs=1e-6)


def test_onecycle_ramps_linearly_for_a_quarter_then_anneals_by_cosine():
    schedule = make_schedule(TrainConfig(epochs=20, lr=0.1, schedule="onecycle"), STEPS)
    assert isinstance(schedule, OneCycle)
    total, up = 200, 50
    assert _lr(schedule, 0) == pytest.approx(0.1 / 25)
    assert _lr(schedule, 25) == pytest.approx(0.004 + (0.1 - 0.004) * 0.5)
    assert _lr(schedule, up) == pytest.approx(0.1)
    assert _lr(schedule, up + (total - up) // 2) == pytest.approx(0.05, rel=1e-5)
    assert _lr(schedule, total) == pytest.approx(0.0, abs=1e-8)
    values = [_lr(schedule, s) for s in range(total + 1)]
    assert int(np.argmax(values)) == up and all(np.diff(values[up:]) <= 1e-9)


def test_onecycle_round_trips_through_its_config():
    schedule = OneCycle(0.3, 1000, pct=0.3, div=10.0)
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    for step in (0, 150, 300, 650, 1000):
        assert float(again(step)) == pytest.approx(float(schedule(step)))


def test_weight_decay_skips_gains_skip_gains_and_biases():
    from nfnet_keras import build_model

    model = build_model("tiny")
    config = TrainConfig(preset="tiny", weight_decay=0.5, lr=0.1, momentum=0.0, schedule="constant").validate()
    optimizer = make_optimizer(config, STEPS)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # nonzero everywhere, so that decay would show
        v.assign(rng.normal(size=v.shape).astype("float32"))
    before = {v.path: np.array(v) for v in model.trainable_variables}
    optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
    decayed, kept = [], []
    for v in model.trainable_variables:
        old, new = before[v.path], np.array(v)
        (decayed if not np.allclose(old, new) else kept).append(v.path.split("/")[-1])
    # With a zero gradient only weight decay moves a variable: kernel *= 1 - lr * wd.
    assert set(decayed) == {"kernel"}
    assert {"gain", "bias", "skip_gain"} <= set(kept)
    kernel = next(v for v in model.trainable_variables if v.path.endswith("kernel"))
    np.testing.assert_allclose(np.array(kernel), before[kernel.path] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_agc_wraps_the_optimizer_only_when_asked():
    from nfnet_keras.agc import with_agc

    plain = make_optimizer(TrainConfig(agc=0.0).validate(), STEPS)
    clipped = make_optimizer(TrainConfig(agc=0.01).validate(), STEPS)
    assert type(plain) is keras.optimizers.SGD
    assert isinstance(clipped, keras.optimizers.SGD) and type(clipped) is not keras.optimizers.SGD
    assert type(clipped) is type(with_agc(keras.optimizers.SGD(), clipping=0.01))
    assert clipped.agc_clipping == 0.01


@pytest.mark.parametrize(
    "jit, strategy, has_gpu, expected",
    [
        (None, "none", False, False),  # CPU: XLA measured slower
        (None, "none", True, True),  # GPU: on
        (True, "none", False, True),  # asked for: on
        (False, "none", True, False),  # refused: off
        (True, "mirrored", True, False),  # keras#19005: never under a strategy
    ],
)
def test_resolve_jit(jit, strategy, has_gpu, expected, capsys):
    assert resolve_jit(TrainConfig(jit=jit, strategy=strategy), has_gpu=has_gpu) is expected
    if jit and strategy != "none":
        assert "keras#19005" in capsys.readouterr().out
