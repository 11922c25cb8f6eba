"""benchmarks.speed_jax: the NumPy feed of the JAX runner and its shards (also run under JAX and PyTorch)."""

import keras
import numpy as np
import pytest

from benchmarks import speed_jax
from nfnet_keras import data
from nfnet_keras.contract import normalize


def test_translate_matches_the_tf_data_pipeline():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    shifts = rng.integers(-2, 3, (40, 2))
    expected = data.translate_batch(images, shifts.astype(np.int32), pad=2).numpy()
    np.testing.assert_array_equal(speed_jax.translate(images, shifts, 2), expected)


def _half_white(count):
    """Images black on the left half and white on the right: a mirror swaps the halves, a shift of 2 does not."""
    images = np.zeros((count, 32, 32, 3), np.uint8)
    images[:, :, 16:] = 255
    return images


def _mirrored_by_id(batches):
    """{image id (its label): whether the epoch mirrors it}, over every batch of the current epoch."""
    seen = {}
    for i in range(len(batches)):
        x, y = batches[i]
        for image, label in zip(x, y):
            seen[int(label)] = bool(image[:, :16].mean() > image[:, 16:].mean())
    return seen


def test_altflip_mirrors_complementary_halves_on_alternate_epochs():
    count = 200
    batches = speed_jax.epoch_batches_class()(_half_white(count), np.arange(count), 64, "translate_altflip", 3,
                                              num_classes=count, one_hot=False)
    assert len(batches) == 4 and len(batches[3][0]) == count - 3 * 64
    epochs = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        epochs.append(_mirrored_by_id(batches))
    assert sorted(epochs[0]) == list(range(count))  # every image once per epoch
    first = np.array([epochs[0][i] for i in range(count)])
    assert 0.35 < first.mean() < 0.65
    np.testing.assert_array_equal([epochs[1][i] for i in range(count)], ~first)
    np.testing.assert_array_equal([epochs[2][i] for i in range(count)], first)


def test_batches_are_normalised_images_with_their_labels():
    rng = np.random.default_rng(1)
    images = np.repeat(rng.integers(0, 256, (30, 1, 1, 3), dtype=np.uint8), 32, axis=1).repeat(32, axis=2)
    labels = rng.integers(0, 10, 30)
    batches = speed_jax.epoch_batches_class()(images, labels, 16, "translate_flip", 0, num_classes=10,
                                              one_hot=True)
    x, y = batches[0]
    assert x.dtype == np.float32 and y.shape == (16, 10)
    for image, one_hot in zip(x, y):  # a constant image stays constant under shifts and mirrors
        source = [i for i in range(30) if np.allclose(normalize(images[i]), image)]
        assert labels[source[0]] == one_hot.argmax()
    with pytest.raises(ValueError, match="--augment standard is not drawn by speed_jax"):
        speed_jax.epoch_batches_class()(images, labels, 16, "standard", 0, num_classes=10, one_hot=True)


def test_fit_draws_a_new_epoch_after_each_epoch():
    count = 32
    batches = speed_jax.epoch_batches_class()(_half_white(count), np.arange(count) % 2, 16, "translate_altflip", 0,
                                              num_classes=2, one_hot=True)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True))
    drawn = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: drawn.append(batches.epoch))
    model.fit(batches, epochs=3, verbose=0, callbacks=[batches.feed, record])
    assert drawn == [0, 1, 2]


def test_shards_round_trip_and_a_missing_one_is_named(tmp_path, capsys):
    rng = np.random.default_rng(2)
    splits = {name: (rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size))
              for name, size in zip(speed_jax.SPLITS, (50, 7, 13))}
    count = speed_jax.write_shards(str(tmp_path / "out"), splits, [f"c{i}" for i in range(10)], shard_mb=0.07)
    assert count == 4  # 70 images of 3,072 bytes, 23 a shard
    loaded, meta = speed_jax.load_prepared([str(tmp_path / "out"), str(tmp_path / "out" / "part2")])  # part2 twice
    for name in speed_jax.SPLITS:
        np.testing.assert_array_equal(loaded[name][0], splits[name][0])
        np.testing.assert_array_equal(loaded[name][1], splits[name][1])
    assert meta["class_names"][3] == "c3"
    (tmp_path / "out" / "part3" / "shard.npz").unlink()
    with pytest.raises(SystemExit, match="the shards hold 47 images, splits.json 70: a shard is missing"):
        speed_jax.load_prepared([str(tmp_path / "out")])


def test_gpu_rows_train_the_configs_they_are_named_for(capsys):
    import dataclasses

    configs = {name: speed_jax.fit_config(flags) for name, flags in speed_jax.ROWS.items()}
    twin = dataclasses.replace(speed_jax.fit_config([]), norm="batch", bn_momentum=0.4, bn_epsilon=1e-12,
                               gain_lr_mult=0.0, ema=0.0, recipe="speed_twin", batch_size=512, lr=0.4, kernel_lr=0.24,
                               preset="cifar_speed")
    assert configs["twin_airbn"] == twin
    assert configs["twin_airbn_dirac"] == dataclasses.replace(twin, conv_init="dirac")
    assert configs["twin_recipe"] == dataclasses.replace(twin, conv_init="dirac", bias_lr_mult=64.0)
    for name in ("wide_lookahead", "twin_airbn_lookahead", "twin_airbn_dirac_lookahead"):
        config = configs[name]
        assert (config.ema, config.lookahead, config.lookahead_schedule) == (0.0, 5, "airbench"), name
    assert configs["wide_kpeak0.5"].preset == "cifar_speed_wide" and configs["wide_kpeak0.5"].kernel_peak_pct == 0.5
    assert configs["wider"].preset == "cifar_speed_wider" and configs["wide_kwd0"].kernel_weight_decay == 0
    for name in ("recipe_b256", "wide_b256", "wider_b256"):
        config = configs[name]
        assert (config.batch_size, config.lr, config.kernel_lr) == (256, 0.28, 0.17), name
    assert configs["wider_b256"].preset == configs["wider"].preset
    for name in ("recipe", "wide_b128", "wider_b128"):  # the recipe's batch 128
        assert (configs[name].batch_size, configs[name].lr, configs[name].kernel_lr) == (128, 0.2, 0.12), name
    for name in ("wide", "wide_lookahead", "wide_kpeak0.5", "wider", "wide_kwd0", "twin_recipe"):  # measured at 512
        assert (configs[name].batch_size, configs[name].lr, configs[name].kernel_lr) == (512, 0.4, 0.24), name
    assert configs["wide_b128"].preset == "cifar_speed_wide"
    assert configs["wider_b128"] == speed_jax.fit_config([])  # the recipe itself
    assert configs["recipe"].preset == configs["recipe_b256"].preset == "cifar_speed"
    with pytest.raises(SystemExit) as exit_info:  # gpu_check.sh's unknown JAX_ROWS entry: exit 2, the rows named
        speed_jax.main(["run", "--data", "x", "--row", "twin"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'twin'" in capsys.readouterr().err
