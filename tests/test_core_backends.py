"""The model core's unit tests under JAX and PyTorch, each in a pytest subprocess.

`tests/test_activations.py`, `tests/test_wsconv.py`, `tests/test_blocks.py` and
`tests/test_batchnorm_stats.py` run under `KERAS_BACKEND=<backend>` without their `tensorflow_only`
tests: the same assertions on values, gradients (`conftest.value_and_grad`), `.keras` round trips and
the layer harness as under TensorFlow. Skips a backend whose package is not installed.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import checkout_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_TESTS = ["tests/test_activations.py", "tests/test_wsconv.py", "tests/test_blocks.py",
              "tests/test_batchnorm_stats.py", "tests/test_speed_jax.py", "tests/test_initialization.py"]
INNER_RUN = "NFNET_CORE_BACKEND_RUN"  # set in the subprocess, so this test never runs inside its own run


def _installed(backend):
    return pytest.mark.skipif(importlib.util.find_spec(backend) is None, reason=f"{backend} not installed")


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(INNER_RUN)), reason="already inside a core-backend run")
@pytest.mark.parametrize("backend", [pytest.param(b, marks=_installed(b)) for b in ("jax", "torch")])
def test_core_unit_tests_pass_under_another_backend(backend):
    env = checkout_env(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", **{INNER_RUN: backend})
    command = [sys.executable, "-m", "pytest", *CORE_TESTS, "-q", "-p", "no:cacheprovider", "-m", "not tensorflow_only"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} under KERAS_BACKEND={backend}: exit {result.returncode}\n" + (
        output[-6000:]
    )
    assert " passed" in result.stdout.strip().splitlines()[-1], output[-2000:]
