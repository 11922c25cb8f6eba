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
TINY_SPEED = ["--recipe", "speed", "--preset", "tiny_speed", "--batch-size", "64", "--val-size", "64",
              "--precision", "float32", "--quiet", "--no-export"]


@pytest.fixture(scope="module")
def tricks_run(tmp_path_factory, synthetic_cifar_dir):
    """2 epochs of tiny_speed on 128 synthetic images with every trick of this file (--whitening-bias-epochs 1,
    --data-init 48)."""
    run_dir = tmp_path_factory.mktemp("tricks") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "nfnet_keras.fit", *TINY_SPEED, "--epochs", "2", "--train-limit", "128",
         "--tta", "flip_translate_weighted", "--augment", "translate_altflip", "--conv-init", "dirac",
         "--whitening-bias-epochs", "1", "--data-init", "48",
         "--run-dir", str(run_dir), "--data-dir", synthetic_cifar_dir],
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
    assert metrics["tta"] == "flip_translate_weighted" and metrics["config"]["augment"] == "translate_altflip"
    assert metrics["history"]["epoch"] == [0, 1] and metrics["config"]["conv_init"] == "dirac"
    assert metrics["config"]["whitening_bias_epochs"] == 1 and metrics["config"]["data_init"] == 48
    assert "Initialised 6 conv gains and biases on 48 training images (--data-init)." in result.stdout
    assert metrics["tta_views"] == list(TTA_POLICY_VIEWS["flip_translate"])
    assert metrics["tta_weights"] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    assert "flip_translate_weighted test-time augmentation (6 views: identity, mirror" in result.stdout
    # The reported figure is the weighted TTA's accuracy of the saved model on the test images.
    _, (x_test, y_test) = load_cifar10(synthetic_cifar_dir, test_only=True)
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    predict = with_tta(keras_predictor(model), "flip_translate_weighted")
    assert metrics["test_accuracy_tta"] == float((predict(x_test).argmax(1) == y_test).mean())


# === Alternating flip ===

RAMP_COUNT, RAMP_BATCH = 40, 8  # 5 batches per epoch


def _ramps(count=RAMP_COUNT):
    """32 x 32 images (CIFAR's size, so shifts go up to 2 px) whose pixel value rises with the column (7 per
    column) and is the same down each column."""
    columns = np.arange(32) * 7 + np.arange(count)[:, None] % 7
    return np.broadcast_to(columns[:, None, :, None], (count, 32, 32, 3)).astype("uint8").copy()


def _mirrored_by_image(ds, epochs):
    """{epoch: bool array of each image (by its label = index) mirrored}, checking each image comes once."""
    flips = {}
    batches = list(ds)
    steps = -(-RAMP_COUNT // RAMP_BATCH)
    assert len(batches) == steps * len(epochs)
    for k, epoch in enumerate(epochs):
        seen = np.full(RAMP_COUNT, -1)
        for images, labels in batches[k * steps:(k + 1) * steps]:
            interior = images.numpy()[:, 0, 2:-2, 0]  # the columns no +-2 px shift fills by reflection
            rising, falling = (np.diff(interior) > 0).all(1), (np.diff(interior) < 0).all(1)
            assert (rising ^ falling).all()
            seen[labels.numpy()] = falling
        assert (seen >= 0).all()  # every image once per epoch
        flips[epoch] = seen.astype(bool)
    return flips


def _altflip(start_epoch=0, epochs=3, seed=5):
    from nfnet_keras.data import make_epoch_dataset

    return make_epoch_dataset(_ramps(), np.arange(RAMP_COUNT), RAMP_BATCH, epochs, seed=seed, start_epoch=start_epoch)


def test_altflip_mirrors_a_seeded_half_then_alternates_every_epoch():
    from nfnet_keras.data import first_epoch_mirrored

    flips = _mirrored_by_image(_altflip(), (0, 1, 2))
    np.testing.assert_array_equal(flips[0], first_epoch_mirrored(5, RAMP_COUNT))
    assert 0.3 <= flips[0].mean() <= 0.7
    np.testing.assert_array_equal(flips[1], ~flips[0])
    np.testing.assert_array_equal(flips[2], flips[0])
    other = _mirrored_by_image(_altflip(epochs=1, seed=6), (0,))[0]
    assert not np.array_equal(other, flips[0])  # the half depends on the seed


def test_altflip_translates_each_image_by_up_to_two_pixels_with_reflection():
    from nfnet_keras.data import translate_batch

    x = np.random.default_rng(0).integers(0, 256, (2, 6, 7, 3)).astype("float32")
    out = translate_batch(x, np.array([[1, 1], [-1, -1]], "int32")).numpy()
    np.testing.assert_array_equal(out[0], TTA_VIEWS["translate(+1,+1)"](x)[0])
    np.testing.assert_array_equal(out[1], TTA_VIEWS["translate(-1,-1)"](x)[1])
    out = translate_batch(x[:1], np.array([[0, -2]], "int32")).numpy()
    np.testing.assert_array_equal(out[0, :, :-2], x[0, :, 2:])
    np.testing.assert_array_equal(out[0, :, -2:], x[0, :, -2:-4:-1])  # reflected about the last column
    # In the pipeline: every shift in -2..2 occurs, and not every image stays put.
    from nfnet_keras.data import preprocess

    originals = preprocess(_ramps()).numpy()[:, 0, :, 0]
    shifts = set()
    for images, labels in _altflip(epochs=1):
        for image, label in zip(images.numpy()[:, 0, :, 0], labels.numpy()):
            row = image if image[3] < image[4] else image[::-1]
            shifts.add(int(np.argmin(np.abs(originals[label] - row[4]))) - 4)
    assert shifts == {-2, -1, 0, 1, 2}


def test_a_resumed_altflip_pipeline_yields_the_batches_of_an_uninterrupted_one():
    whole = list(_altflip())
    steps = len(whole) // 3
    for start in (1, 2):
        resumed = list(_altflip(start_epoch=start))
        assert len(resumed) == (3 - start) * steps
        for (a, la), (b, lb) in zip(whole[start * steps:], resumed):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
            np.testing.assert_array_equal(la.numpy(), lb.numpy())


class _Fingerprint(keras.layers.Layer):
    """Passes its input on; in training adds a fixed random projection of each batch to `seen`."""

    def build(self, input_shape):
        self.seen = self.add_weight(name="seen", shape=(), initializer="zeros", trainable=False)
        self.projection = np.random.default_rng(0).normal(size=tuple(input_shape[1:])).astype("float32")

    def call(self, x, training=None):
        if training:
            self.seen.assign_add(keras.ops.sum(x * self.projection))
        return x


class _RecordEpochs(keras.callbacks.Callback):
    """{epoch: the fingerprint of the data fit trained on}; raises `_Stop` at the start of `stop_at`."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.stop_at, self.seen = stop_at, {}

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_at:
            raise _Stop
        self.model.get_layer("fingerprint").seen.assign(0.0)

    def on_epoch_end(self, epoch, logs=None):
        self.seen[epoch] = float(self.model.get_layer("fingerprint").seen.numpy())


class _Stop(Exception):
    pass


@pytest.mark.tensorflow_only(reason="the fingerprint layer assigns a variable inside the TensorFlow train step")
def test_fit_resumed_after_an_epoch_trains_on_the_same_flips_as_an_uninterrupted_fit(tmp_path):
    from nfnet_keras import training
    from nfnet_keras.callbacks import EpochCheckpoint

    config = config_lib.TrainConfig(epochs=3, batch_size=RAMP_BATCH, augment="translate_altflip", seed=3,
                                    val_size=8).validate()
    data = (_ramps(), np.arange(RAMP_COUNT) % 10)

    def fit(checkpoints, record):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Flatten()(_Fingerprint(name="fingerprint")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(10)(x))
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
        train_ds, val_ds = training.make_datasets(config, data, data)
        assert train_ds.epoch_feed.steps_per_epoch == RAMP_COUNT // RAMP_BATCH
        callbacks = [record] + ([EpochCheckpoint(str(checkpoints))] if checkpoints else [])
        training.fit_model(model, config, train_ds, val_ds, callbacks=callbacks, verbose=0)

    whole = _RecordEpochs()
    fit(None, whole)
    assert len(set(whole.seen.values())) == 3  # each epoch trains on other data
    first = _RecordEpochs(stop_at=1)
    with pytest.raises(_Stop):
        fit(tmp_path, first)
    resumed = _RecordEpochs()
    fit(tmp_path, resumed)  # EpochCheckpoint resumes at epoch 1
    assert first.seen == {0: whole.seen[0]}
    assert resumed.seen == {1: whole.seen[1], 2: whole.seen[2]}


# === The whitening stem's bias trained for the first epochs only ===


def _stem_fit(tmp_path, bias_epochs, epochs=3, ema=0.0, stop_at=None, record=None):
    """fit_model of tiny_speed on 32 fixed images, checkpointed under `tmp_path`; returns the model."""
    from nfnet_keras import training
    from nfnet_keras.callbacks import EpochCheckpoint

    config = config_lib.TrainConfig(preset="tiny_speed", epochs=epochs, batch_size=16, lr=0.05, schedule="constant",
                                    ema=ema, whitening_bias_epochs=bias_epochs, precision="float32").validate()
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(32, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 32))
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(data).batch(16)
    keras.utils.set_random_seed(0)
    model = training.compile_model(training.build_for(config), config, steps_per_epoch=2)
    callbacks = [record or _StopAt(stop_at), EpochCheckpoint(str(tmp_path))]
    training.fit_model(model, config, ds, ds, callbacks=callbacks, verbose=0)
    return model


class _StopAt(keras.callbacks.Callback):
    """Raises `_Stop` at the start of epoch `epoch` (0-based; None: never)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Stop


class _StemBias(keras.callbacks.Callback):
    """The stem's bias and the first conv's kernel at the start and at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.bias, self.kernel = [], []

    def _take(self):
        self.bias.append(np.asarray(self.model.get_layer("stem_whitening").bias).copy())
        self.kernel.append(np.asarray(self.model.get_layer("stage1_group").conv1.kernel).copy())

    def on_train_begin(self, logs=None):
        self._take()

    def on_epoch_end(self, epoch, logs=None):
        self._take()


@pytest.mark.tensorflow_only(reason="freezing a layer during fit rebuilds the TensorFlow train function")
def test_the_whitening_bias_trains_for_its_epochs_then_stays(tmp_path):
    record = _StemBias()
    model = _stem_fit(tmp_path, bias_epochs=1, record=record)
    start, after = record.bias[0], record.bias[1:]
    assert not np.array_equal(start, after[0])  # trained in epoch 1
    np.testing.assert_array_equal(after[1], after[0])  # frozen in epochs 2 and 3
    np.testing.assert_array_equal(after[2], after[0])
    assert not np.array_equal(record.kernel[2], record.kernel[1])  # the rest still trains
    assert not np.array_equal(record.kernel[3], record.kernel[2])
    stem = model.get_layer("stem_whitening")
    assert stem.trainable and any(v is stem.bias for v in model.trainable_variables)  # trainable again at the end


@pytest.mark.tensorflow_only(reason="freezing a layer during fit rebuilds the TensorFlow train function")
def test_a_run_resumed_after_the_freeze_ends_with_the_uninterrupted_weights_and_averages(tmp_path):
    import shutil

    whole = _stem_fit(tmp_path / "whole", bias_epochs=1, epochs=3, ema=0.5)
    # The state after epoch 2 of the same run, as a run stopped there leaves it.
    shutil.copytree(tmp_path / "whole" / "epoch-0002", tmp_path / "resumed" / "epoch-0002")
    resumed = _stem_fit(tmp_path / "resumed", bias_epochs=1, epochs=3, ema=0.5)  # starts past the freeze
    for a, b in zip(whole.weights, resumed.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    averages = zip(whole.optimizer._model_variables_moving_average, resumed.optimizer._model_variables_moving_average)
    for a, b in averages:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
