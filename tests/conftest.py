"""Shared fixtures and helpers of the test suite."""

import os

# Before TensorFlow is imported anywhere: keep its C++ INFO/WARNING logs out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import keras  # noqa: E402

CIFAR_BATCHES = "cifar-10-batches-py"


def pytest_configure(config):
    # Also declared in pytest.ini; registering here keeps `--strict-markers`
    # working when the tests run from another root.
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def cifar_dir():
    """The folder holding `cifar-10-batches-py/`, from `$NFNET_DATA_DIR`; skips without it."""
    data_dir = os.environ.get("NFNET_DATA_DIR")
    if not data_dir:
        pytest.skip("NFNET_DATA_DIR is not set: point it at a folder holding cifar-10-batches-py/")
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(os.path.join(data_dir, CIFAR_BATCHES)) and not os.path.isfile(
        os.path.join(data_dir, "data_batch_1")
    ):
        pytest.skip(f"NFNET_DATA_DIR={data_dir!r} holds no {CIFAR_BATCHES}/ folder")
    return data_dir


def keras_roundtrip(model_or_layer, tmp_path, input_shape=None, name="roundtrip.keras"):
    """Saves to a `.keras` file under `tmp_path`, reloads it and returns the reloaded object.

    A model comes back as the reloaded model. A layer is first wrapped in a
    Functional model on a `keras.Input(input_shape)` (required for a layer), and
    the reloaded copy of the layer is returned. Loading uses no
    `custom_objects`: the package's classes must be registered serializables.
    """
    path = os.path.join(str(tmp_path), name)
    if isinstance(model_or_layer, keras.Model):
        model_or_layer.save(path)
        return keras.saving.load_model(path)
    if input_shape is None:
        raise ValueError("keras_roundtrip needs input_shape=(h, w, c, ...) to wrap a layer.")
    layer = model_or_layer
    inputs = keras.Input(tuple(input_shape))
    model = keras.Model(inputs, layer(inputs))
    model.save(path)
    loaded = keras.saving.load_model(path)
    reloaded = loaded.get_layer(layer.name)
    assert type(reloaded) is type(layer)
    return reloaded


def _relative_path(variable, owner):
    # A Sequential model's variables carry the model's name as a prefix, which a
    # reloaded model (a new object) does not necessarily share.
    prefix = f"{owner.name}/"
    path = variable.path
    return path[len(prefix):] if path.startswith(prefix) else path


def assert_same_weights(a, b):
    """Every variable of `a` equals the one of `b` at the same path and position, bit for bit."""
    assert len(a.weights) == len(b.weights)
    for va, vb in zip(a.weights, b.weights):
        assert _relative_path(va, a) == _relative_path(vb, b)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(va), keras.ops.convert_to_numpy(vb), err_msg=va.path
        )
