"""Shared fixtures and helpers of the test suite.

- `cifar_dir`: the real CIFAR-10 from `$NFNET_DATA_DIR` (skips without it).
- `synthetic_cifar_dir` / `write_synthetic_cifar`: a small CIFAR-10 in the
  official `cifar-10-batches-py` layout whose classes a tiny model can learn.
- `run_layer_test`: the checks every public layer passes (config and `.keras`
  round trips, mixed precision, a compiled fit step).
- `keras_roundtrip`, `assert_same_weights`: `.keras` save/load helpers.
- `value_and_grad`: a function's value and gradients on whichever Keras backend runs.
- The `tensorflow_only` marker: skips a test, with its reason, on other backends.

JAX compiles without most XLA optimizations here and in every child process (`JAX_DISABLE_MOST_OPTIMIZATIONS`).
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

# Before TensorFlow is imported anywhere: keep its C++ INFO/WARNING logs out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Before JAX is imported here or in any child process: compile without XLA's optimization passes. The tests
# run tiny models for a few steps, so compiling is most of a JAX test's time: a 3-epoch `tiny` fit under JAX
# took 47 s with the passes and 32 s without on a 2-core CPU. Values agree within the tests' tolerances.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

CIFAR_BATCHES = "cifar-10-batches-py"
CIFAR_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


def pytest_configure(config):
    # Also declared in the project's pytest settings; registering here keeps
    # `--strict-markers` working when the tests run from another root.
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "tensorflow_only(reason): tests TensorFlow itself; skipped on other backends")


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        if marker is None:
            continue
        reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else None)
        if not reason:
            raise pytest.UsageError(f"{item.nodeid}: tensorflow_only needs a reason=... saying why")
        if backend != "tensorflow":
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow only, not {backend}: {reason}"))


@pytest.fixture(autouse=True)
def _float32_policy_after_each_test():
    """Restores the global float32 dtype policy after every test.

    Training under a mixed recipe sets the global policy; a test that fails
    before its own clean-up would otherwise build every later test's layers in
    bfloat16.
    """
    yield
    keras.mixed_precision.set_global_policy("float32")


# === CIFAR-10 ===


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


# One colour per class (RGB, 0-255), far apart from each other: a synthetic
# image is its class's colour plus pixel noise, so the mean colour of an image
# tells its class: a linear model of the mean colour reaches 100% test
# accuracy in 20 full-batch steps.
SYNTHETIC_CLASS_COLOURS = np.array(
    [
        [200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200],
        [40, 200, 200], [230, 230, 230], [25, 25, 25], [230, 130, 30], [110, 60, 160],
    ],
    dtype=np.float64,
)
SYNTHETIC_NOISE_STD = 25.0


def _synthetic_batch(rng, count, label_offset=0):
    """`count` images (N x 3072 uint8, channels-first rows) with balanced labels."""
    labels = rng.permutation((np.arange(count) + label_offset) % 10)
    images = SYNTHETIC_CLASS_COLOURS[labels][:, None, None, :] + rng.normal(
        0.0, SYNTHETIC_NOISE_STD, (count, 32, 32, 3)
    )
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    # NHWC -> the official row layout: 1024 red, then 1024 green, then 1024 blue.
    rows = images.transpose(0, 3, 1, 2).reshape(count, 3072)
    return rows, [int(label) for label in labels]


def write_synthetic_cifar(folder, per_batch=200, test=200, seed=0):
    """Writes a small CIFAR-10 under `folder/cifar-10-batches-py/` and returns `str(folder)`.

    The files are those of the official Python version: `data_batch_1` ...
    `data_batch_5` (`per_batch` images each), `test_batch` (`test` images) and
    `batches.meta`; each a pickled dict with bytes keys, `b"data"` an N x 3072
    uint8 array (rows channels-first: 1024 red, 1024 green, 1024 blue values)
    and `b"labels"` a list of ints. An image of class `c` is
    `SYNTHETIC_CLASS_COLOURS[c]` plus Gaussian pixel noise (std
    `SYNTHETIC_NOISE_STD`), clipped to 0-255; every batch holds the classes in
    (almost) equal numbers, in random order.

    Args:
        folder: str or path-like. Created if missing.
        per_batch: int. Images per training batch file (5 files). Defaults to `200`.
        test: int. Images in `test_batch`. Defaults to `200`.
        seed: int. Seed of the noise and the label order. Defaults to `0`.

    Returns:
        str. `folder`, the directory that contains `cifar-10-batches-py/` (as
        the `cifar_dir` fixture and `--data-dir` expect).
    """
    batches = os.path.join(os.fspath(folder), CIFAR_BATCHES)
    os.makedirs(batches, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = [(f"data_batch_{i}", per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    files.append(("test_batch", test, "testing batch 1 of 1"))
    for i, (name, count, label) in enumerate(files):
        data, labels = _synthetic_batch(rng, count, label_offset=i)
        batch = {
            b"batch_label": label.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"synthetic_{name}_{j:05d}.png".encode() for j in range(count)],
        }
        with open(os.path.join(batches, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [name.encode() for name in CIFAR_CLASS_NAMES],
        b"num_vis": 3072,
    }
    with open(os.path.join(batches, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return os.fspath(folder)


@pytest.fixture(scope="session")
def synthetic_cifar_dir(tmp_path_factory):
    """A session-wide synthetic CIFAR-10 (200 images per training batch, 200 test images).

    Returns the folder that contains `cifar-10-batches-py/` (the convention of
    `cifar_dir`). Read-only for tests: write your own copy with
    `write_synthetic_cifar(tmp_path)` to change or corrupt files.
    """
    return write_synthetic_cifar(tmp_path_factory.mktemp("synthetic_cifar"))


# === Saving ===


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


# === Gradients on any backend ===


def value_and_grad(fn, variables, inputs=()):
    """`fn(*inputs)` and the gradient of its loss, on the current Keras backend.

    TensorFlow: a `tf.GradientTape`; JAX: `jax.value_and_grad` of `fn` with the variables' values passed in
    through a `keras.StatelessScope`; PyTorch: `torch.autograd.grad` with respect to the variables' parameters.

    Args:
        fn: callable. Takes one tensor per entry of `inputs` and returns the scalar loss, or a tuple whose
            first entry is the loss (the others, e.g. the output, come back with it).
        variables: list of Keras variables to differentiate; `fn` reads them as usual (through layers or ops).
        inputs: sequence of float arrays. Passed to `fn` as tensors, and differentiated too.

    Returns:
        `(value, grads)`: `value` is what `fn` returned, as NumPy (a tuple of arrays for a tuple); `grads` one
        NumPy array per variable, then one per input, zeros where the loss does not depend on it.
    """
    variables = list(variables)
    backend = keras.backend.backend()
    loss_of = lambda out: out[0] if isinstance(out, tuple) else out
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = fn(*tensors)
        grads = tape.gradient(loss_of(out), variables + tensors, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    elif backend == "jax":
        import jax

        def pure(values, tensors):
            # Keras variables are read through the scope's values, which jax traces.
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                out = fn(*tensors)
            return loss_of(out), out

        tensors = [keras.ops.convert_to_tensor(x) for x in inputs]
        grad_fn = jax.value_and_grad(pure, argnums=(0, 1), has_aux=True)
        (_, out), (var_grads, input_grads) = grad_fn([v.value for v in variables], tensors)
        grads = list(var_grads) + list(input_grads)
    elif backend == "torch":
        import torch

        tensors = [keras.ops.convert_to_tensor(x).detach().requires_grad_(True) for x in inputs]
        out = fn(*tensors)
        sources = [v.value for v in variables] + tensors  # a variable's value is its torch.nn.Parameter
        grads = torch.autograd.grad(loss_of(out), sources, allow_unused=True)
        grads = [torch.zeros_like(s) if g is None else g for s, g in zip(sources, grads)]
    else:
        raise NotImplementedError(f"value_and_grad has no implementation for the {backend!r} backend")
    value = tuple(_np(o) for o in out) if isinstance(out, tuple) else _np(out)
    return value, [_np(g) for g in grads]


# === The layer harness ===

# Largest |mixed - float32| output difference allowed, relative to the largest
# |float32| output: bfloat16 keeps 8 bits of mantissa, float16 11. Measured on
# the package's layers at the harness's shapes: <= 0.0084 and <= 0.0010.
MIXED_TOLERANCE = {"mixed_bfloat16": 0.03, "mixed_float16": 0.005}


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _values(layer):
    return [_np(v).copy() for v in layer.trainable_weights]


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    tmp_path,
    *,
    expected_output_shape=None,
    trains_every_weight=True,
    mixed_tolerance=None,
    seed=0,
):
    """Runs the checks every public layer of the package must pass; returns the float32 layer.

    On a float32 batch of standard-normal `input_shape` values (batch axis first):

    0. Shapes: the eager output has `compute_output_shape(input_shape)` (where
       the layer defines it) and `expected_output_shape` (if given); a
       symbolic call agrees.
    1. Config round trip: every init argument is in `get_config()`;
       `from_config(get_config())` gives the same config and, with the weights
       copied, the same outputs bit for bit; the JSON serialization (the
       `.keras` format's) revives the same class and config.
    2. A compiled fit step: a tiny model (the layer, `Flatten`, a 3-way
       `Dense`) trains 2 steps of Adam; the loss is finite and the classifier
       and the layer's trainable weights moved (every one of the layer's with
       `trains_every_weight`).
    3. `.keras` round trip of that trained model: same weights bit for bit,
       same model and layer outputs to 1e-6, same layer config.
    4. Mixed precision: built under the global `mixed_bfloat16` and
       `mixed_float16` policies with the float32 layer's weights, the layer
       keeps float32 variables and returns the policy's compute dtype, finite,
       and off the float32 output by at most `mixed_tolerance[policy]`
       (default `MIXED_TOLERANCE`) times the float32 output's largest value.
       The global policy is float32 again afterwards, whatever happens.

    Args:
        layer_cls: the layer class.
        init_kwargs: dict. Its constructor arguments.
        input_shape: tuple of ints, batch axis first (keep it small).
        tmp_path: a folder for the `.keras` file (pytest's `tmp_path`).
        expected_output_shape: tuple or None. The output shape, if known.
        trains_every_weight: bool. Whether every trainable weight must move in
            the fit step (else at least one, if the layer has any).
        mixed_tolerance: dict or None. Policy name -> relative tolerance.
        seed: int. Seed of the inputs, labels and initial weights.

    Returns:
        The float32 layer of step 1, built, with its initial weights.
    """
    input_shape = tuple(input_shape)
    tolerance = dict(MIXED_TOLERANCE, **(mixed_tolerance or {}))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape).astype("float32")
    keras.utils.set_random_seed(seed)

    # === 0. Shapes ===
    layer = layer_cls(**init_kwargs)
    y = _np(layer(x))
    assert y.dtype == np.float32
    if type(layer).compute_output_shape is not keras.layers.Layer.compute_output_shape:
        assert y.shape == tuple(layer.compute_output_shape(input_shape))
    if expected_output_shape is not None:
        assert y.shape == tuple(expected_output_shape)
    symbolic = layer(keras.Input(input_shape[1:], batch_size=None))
    assert tuple(symbolic.shape) == (None,) + y.shape[1:]
    assert np.isfinite(y).all()

    # === 1. Config round trip ===
    config = layer.get_config()
    missing = [key for key in init_kwargs if key not in config]
    assert not missing, f"get_config() lacks init argument(s) {missing}"
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    clone(x)
    assert [_relative_path(v, clone) for v in clone.weights] == [_relative_path(v, layer) for v in layer.weights]
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(_np(clone(x)), y)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is layer_cls
    assert revived.get_config() == config

    # === 2. A compiled fit step ===
    keras.utils.set_random_seed(seed)
    trainee = layer_cls.from_config(config)
    inputs = keras.Input(input_shape[1:])
    logits = keras.layers.Dense(3, name="classifier")(keras.layers.Flatten()(trainee(inputs)))
    model = keras.Model(inputs, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    labels = rng.integers(0, 3, input_shape[0])
    before, classifier_before = _values(trainee), _values(model.get_layer("classifier"))
    history = model.fit(x, labels, batch_size=input_shape[0], epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all(), history.history
    # The step ran: the classifier on the layer's output moved.
    assert not np.array_equal(classifier_before[0], _values(model.get_layer("classifier"))[0])
    moved = [not np.array_equal(a, b) for a, b in zip(before, _values(trainee))]
    if trains_every_weight:
        still = [v.path for v, m in zip(trainee.trainable_weights, moved) if not m]
        assert not still, f"weights that did not train: {still}"
    elif moved:
        assert any(moved), "no weight of the layer trained"

    # === 3. `.keras` round trip of the trained model ===
    path = os.path.join(os.fspath(tmp_path), f"{layer_cls.__name__}_trained.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_same_weights(model, loaded)
    reloaded = loaded.get_layer(trainee.name)
    assert type(reloaded) is layer_cls
    assert reloaded.get_config() == trainee.get_config()
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_np(reloaded(x)), _np(trainee(x)), rtol=0, atol=1e-6)

    # === 4. Mixed precision ===
    for policy in ("mixed_bfloat16", "mixed_float16"):
        try:
            keras.mixed_precision.set_global_policy(policy)
            mixed = layer_cls(**init_kwargs)
            mixed(x)
            mixed.set_weights(layer.get_weights())
            out = mixed(x)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        compute_dtype = keras.mixed_precision.Policy(policy).compute_dtype
        assert keras.backend.standardize_dtype(out.dtype) == compute_dtype, policy
        assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in mixed.weights), policy
        out = _np(keras.ops.cast(out, "float32"))
        assert np.isfinite(out).all(), policy
        error = np.abs(out - y).max()
        assert error <= tolerance[policy] * max(np.abs(y).max(), 1e-6), (policy, error, np.abs(y).max())
    return layer


# === Training runs in subprocesses ===

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ctrl_c_enabled():
    """A `preexec_fn` that gives a child the default Ctrl-C handling.

    A process started in the background by a non-interactive shell inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler: a
    test that sends Ctrl-C to a child needs the child to take it however the
    test run itself was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def checkout_env(**variables):
    """This process's environment for a child Python that imports the checkout (`benchmarks`, `tuner`, the
    package), with `variables` set."""
    return dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **variables)


def run_fit_under(backend, args, extra_env=None, timeout=420, wait=True):
    """`python -m nfnet_keras.fit ARGS` under `KERAS_BACKEND=backend`; a `CompletedProcess`, or the `Popen`."""
    env = checkout_env(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", **(extra_env or {}))
    command = [sys.executable, "-m", "nfnet_keras.fit", *args]
    if wait:
        return subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return subprocess.Popen(command, cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ctrl_c_enabled)


def interrupt_after_first_epoch(proc, run_dir, timeout=300):
    """Sends Ctrl-C (SIGINT) once epoch 1 is checkpointed; returns (exit status, output, epochs checkpointed)."""
    deadline = time.time() + timeout
    try:
        while not (run_dir / "checkpoints" / "epoch-0001").exists():
            assert proc.poll() is None, "the run ended before epoch 1 was checkpointed:\n" + proc.stdout.read()[-3000:]
            assert time.time() < deadline, f"no checkpoint of epoch 1 within {timeout} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = sorted(int(p.split("-")[1]) for p in os.listdir(run_dir / "checkpoints") if p.startswith("epoch-"))
    return proc.returncode, output, done[-1]


class StopTraining(Exception):
    """Raised by a test's callback to stop `fit` where a preemption would."""


class WeightsAt(keras.callbacks.Callback):
    """Records the model's variables at the end of epoch 1 (or at the first step), and can stop fit at the start of
    epoch 2 (`StopTraining`).

    `weights`: every model variable (BatchNorm statistics included), `trainable`: the trainable ones, and
    `averages`: the optimizer's moving averages of those (with `use_ema`), as NumPy copies. `statistics`: the
    BatchNorm statistics at the last epoch's end (`models.batchnorm_statistics`). Placed before the EMA swap, it
    sees what an epoch's checkpoint holds.
    """

    def __init__(self, at_epoch_end=True, stop=False):
        super().__init__()
        self.at_epoch_end, self.stop = at_epoch_end, stop
        self.weights = self.trainable = self.averages = self.statistics = None

    def _take(self):
        self.weights = [np.array(w) for w in self.model.weights]
        self.trainable = [np.array(w) for w in self.model.trainable_variables]
        self.averages = [np.array(v) for v in getattr(self.model.optimizer, "_model_variables_moving_average", ())]

    def on_epoch_end(self, epoch, logs=None):
        from nfnet_keras.models import batchnorm_statistics

        if self.at_epoch_end and epoch == 0:
            self._take()
        self.statistics = batchnorm_statistics(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if self.stop and epoch == 1:
            raise StopTraining

    def on_train_batch_begin(self, batch, logs=None):
        if not self.at_epoch_end and self.weights is None:
            self._take()
