"""BatchNorm statistics recomputed for other weights: the function (on every backend: see test_core_backends),
and `--bn-recalibrate` in a training run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from nfnet_keras import training
from nfnet_keras.callbacks import EpochCheckpoint
from nfnet_keras.config import TrainConfig
from nfnet_keras.data import preprocess
from nfnet_keras.layers import NormActivation
from nfnet_keras.models import batchnorm_statistics, recompute_batchnorm_statistics, set_batchnorm_statistics

from conftest import StopTraining, WeightsAt


@pytest.fixture(scope="module")
def branches():
    """Three BatchNorms on convs of the input (so each one's input does not depend on the batch): a plain one,
    one nested in a `NormActivation`, and a frozen one."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    convs = [keras.layers.Conv2D(4, 3, padding="same", name=f"conv{i}") for i in range(3)]
    plain = keras.layers.BatchNormalization(momentum=0.9, name="plain")
    nested = NormActivation(keras.layers.BatchNormalization, "relu", norm_config={"momentum": 0.5}, name="nested")
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    outputs = keras.layers.Concatenate()([plain(convs[0](inputs)), nested(convs[1](inputs)), frozen(convs[2](inputs))])
    model = keras.Model(inputs, outputs)
    conv_outputs = keras.Model(inputs, [conv.output for conv in convs])
    return model, conv_outputs


def test_recomputed_statistics_are_the_exact_mean_and_variance_over_all_images(branches):
    model, conv_outputs = branches
    images = np.random.default_rng(1).normal(2.0, 3.0, size=(10, 6, 6, 3)).astype("float32")
    weights = [np.array(w) for w in model.trainable_weights]
    frozen = model.get_layer("frozen")
    frozen_before = (np.array(frozen.moving_mean), np.array(frozen.moving_variance))

    assert recompute_batchnorm_statistics(model, images, batch_size=4) == 2  # batches of 4, 4 and 2

    for name, output in zip(("plain", "nested"), conv_outputs(images)):
        output = keras.ops.convert_to_numpy(output).astype(np.float64)
        layer = model.get_layer(name)
        layer = layer if name == "plain" else layer.norm
        np.testing.assert_allclose(np.asarray(layer.moving_mean), output.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
        # pooled over the 10 images, not the mean of the three batches' variances
        np.testing.assert_allclose(np.asarray(layer.moving_variance), output.var(axis=(0, 1, 2)), rtol=1e-4)
    assert model.get_layer("plain").momentum == 0.9 and model.get_layer("nested").norm.momentum == 0.5
    np.testing.assert_array_equal(np.asarray(frozen.moving_mean), frozen_before[0])
    np.testing.assert_array_equal(np.asarray(frozen.moving_variance), frozen_before[1])
    for before, after in zip(weights, model.trainable_weights):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_statistics_round_trip_and_bad_arguments(branches):
    model, _ = branches
    saved = batchnorm_statistics(model)
    assert len(saved) == 2
    set_batchnorm_statistics(model, [(mean + 1, var * 2) for mean, var in saved])
    np.testing.assert_allclose(np.asarray(model.get_layer("plain").moving_mean), saved[0][0] + 1)
    set_batchnorm_statistics(model, saved)
    np.testing.assert_array_equal(np.asarray(model.get_layer("plain").moving_mean), saved[0][0])
    with pytest.raises(ValueError, match="needs images and a batch size >= 1, got 0 images"):
        recompute_batchnorm_statistics(model, np.zeros((0, 6, 6, 3), "float32"), 4)
    no_norm = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert recompute_batchnorm_statistics(no_norm, np.zeros((3, 4), "float32"), 2) == 0


@pytest.mark.tensorflow_only(reason="the training run and its checkpoints use the TensorFlow trainer and tf.data")
def test_bn_recalibrate_validates_the_average_with_its_own_statistics_and_checkpoints_the_raw_ones(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(preprocess(images)), labels)).batch(32)

    def fit(recalibrate, callbacks, checkpoint_dir):
        config = TrainConfig(preset="tiny_speed", norm="batch", bn_momentum=0.4, epochs=2, batch_size=32, lr=0.05,
                             ema=0.9, bn_recalibrate=recalibrate, schedule="constant", precision="float32").validate()
        keras.utils.set_random_seed(0)
        model = training.compile_model(training.build_for(config), config, steps_per_epoch=2)
        result = training.fit_model(model, config, ds, ds, callbacks=[*callbacks, EpochCheckpoint(checkpoint_dir)],
                                    verbose=0, train_images=images)
        return model, result

    # Without recalibration and with it, the run's own variables at the end of epoch 1 (what the epoch's
    # checkpoint holds) are the same: the recomputed statistics are only in the model beside the average.
    plain, recalibrated = WeightsAt(stop=True), WeightsAt(stop=True)
    for snapshot, recalibrate, folder in ((plain, 0, "plain"), (recalibrated, 48, "recal")):
        with pytest.raises(StopTraining):
            fit(recalibrate, [snapshot], str(tmp_path / folder))
    for a, b in zip(plain.weights, recalibrated.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Resumed from that checkpoint, the run starts from exactly those variables and ends with the average and
    # statistics recomputed for it from the first 48 images; its last validation used them.
    resumed = WeightsAt(at_epoch_end=False)
    model, result = fit(48, [resumed], str(tmp_path / "recal"))
    for a, b in zip(recalibrated.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    final = batchnorm_statistics(model)
    assert len(final) == 6
    recompute_batchnorm_statistics(model, np.asarray(preprocess(images[:48])), 32)
    for (mean, var), (mean2, var2) in zip(final, batchnorm_statistics(model)):
        np.testing.assert_allclose(mean, mean2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, var2, rtol=1e-5, atol=1e-6)
    loss = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(result.history["val_loss"][-1], rel=1e-5)
    # The statistics of the raw weights, which the model held before the swap, give another loss.
    set_batchnorm_statistics(model, resumed.statistics)
    assert model.evaluate(ds, verbose=0, return_dict=True)["loss"] != pytest.approx(loss, rel=1e-3)


@pytest.mark.tensorflow_only(reason="fit_model's TensorFlow training run")
def test_bn_recalibrate_needs_the_training_images():
    config = TrainConfig(preset="tiny_speed", norm="batch", ema=0.9, bn_recalibrate=8, epochs=1).validate()
    with pytest.raises(ValueError, match="fit_model needs train_images"):
        training.fit_model(None, config, None, None)
