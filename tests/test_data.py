"""CIFAR-10 sources, preprocess, split, augmentation."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from nfnet_keras import data


def test_preprocess_normalises_with_training_statistics():
    images = np.array([[[[0, 255, 128]]]], np.uint8)
    out = data.preprocess(images).numpy()
    expected = (np.array([0, 255, 128]) / 255.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


def test_preprocess_rejects_float_images():
    with pytest.raises(ValueError, match="expects uint8"):
        data.preprocess(np.zeros((1, 32, 32, 3), np.float32))


def test_real_cifar10_loads_with_known_pixels(cifar_dir):
    (x, y), (xt, yt) = data.load_cifar10(cifar_dir)
    assert x.shape == (50000, 32, 32, 3) and xt.shape == (10000, 32, 32, 3)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [5000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    # The data set's published checks: data_batch_1 row 0 starts [59, 43, 50] in the channels-first layout
    # (red plane), i.e. red of pixels (0,0), (0,1), (0,2).
    assert x[0, 0, :3, 0].tolist() == [59, 43, 50]
    assert xt[0, 0, :4, 0].tolist() == [158, 159, 165, 166]


def test_split_is_deterministic_disjoint_and_limited():
    x = np.arange(1000)[:, None]
    y = np.arange(1000)
    (a, ya), (b, yb) = data.split(x, y, val_size=100)
    (a2, _), (b2, _) = data.split(x, y, val_size=100)
    assert len(a) == 900 and len(b) == 100
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert not set(ya) & set(yb)
    (a3, _), (b3, _) = data.split(x, y, val_size=100, train_limit=50)
    assert np.array_equal(a3, a[:50]) and np.array_equal(b3, b)
    for val_size in (0, 1000):  # the same rule as TrainConfig's: >= 1
        with pytest.raises(ValueError) as error:
            data.split(x, y, val_size=val_size)
        assert str(error.value) == f"--val-size must be >= 1 and less than the 1000 training images, got {val_size}."
    from nfnet_keras.config import TrainConfig

    with pytest.raises(ValueError) as error:
        TrainConfig(val_size=0).validate()
    assert str(error.value) == "--val-size must be >= 1, got 0."


def _fake_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}


def test_official_tarball_is_read(tmp_path):
    path = tmp_path / data.TARBALL
    batches = {name: _fake_batch(4, i) for i, name in enumerate(data.TRAIN_FILES + (data.TEST_FILE,))}
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            raw = pickle.dumps(batch)
            info = tarfile.TarInfo(f"{data.BATCHES_DIR}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    (x, y), (xt, yt) = data.load_cifar10(str(tmp_path))
    assert x.shape == (20, 32, 32, 3) and xt.shape == (4, 32, 32, 3)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(x[0], first)


def test_truncated_batch_file_is_named(tmp_path, synthetic_cifar_dir):
    folder = tmp_path / data.BATCHES_DIR
    folder.mkdir()
    src = os.path.join(synthetic_cifar_dir, data.BATCHES_DIR)
    for name in data.TRAIN_FILES:
        os.symlink(os.path.join(src, name), folder / name)
    with open(os.path.join(src, data.TEST_FILE), "rb") as f:
        (folder / data.TEST_FILE).write_bytes(f.read(5000))
    with pytest.raises(data.DataError, match="test_batch is corrupt or truncated"):
        data.load_cifar10(str(tmp_path))


def test_missing_data_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NFNET_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_reachable", lambda host, timeout=5.0: False)
    with pytest.raises(data.DataError) as error:
        data.load_cifar10(tfds_dir=str(tmp_path / "tfds"))
    assert str(error.value) == (
        f"CIFAR-10 not found: no --data-dir or NFNET_DATA_DIR given, and tensorflow_datasets 'cifar10' in "
        f"{tmp_path / 'tfds'} failed (no prepared copy, and www.cs.toronto.edu is unreachable (offline?)). Pass "
        "--data-dir DIR (or set NFNET_DATA_DIR) to a folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz.")


EXPECTED_THERE = ("expected the folder holding cifar-10-batches-py/ (data_batch_1-5, test_batch) or "
                  "cifar-10-python.tar.gz. Point it there, or give no folder to use TensorFlow Datasets.")


@pytest.mark.parametrize("from_env", [False, True], ids=["flag", "env"])
@pytest.mark.parametrize("exists", [True, False], ids=["empty_folder", "no_folder"])
def test_a_named_folder_without_cifar10_is_an_error_never_a_tfds_download(from_env, exists, tmp_path, monkeypatch):
    def no_tfds(tfds_dir):
        raise AssertionError("TFDS was asked although a folder was named")

    monkeypatch.setattr(data, "_from_tfds", no_tfds)
    folder = tmp_path / "wrong"
    if exists:
        folder.mkdir()
        (folder / "data_batch_1.txt").write_text("not CIFAR-10")
    monkeypatch.setenv("NFNET_DATA_DIR", str(folder)) if from_env else monkeypatch.delenv("NFNET_DATA_DIR", False)
    with pytest.raises(data.DataError) as error:
        data.load_cifar10(None if from_env else str(folder), tfds_dir=str(tmp_path / "tfds"), test_only=True)
    given = f"NFNET_DATA_DIR={folder}" if from_env else f"--data-dir {folder}"
    what = " holds no CIFAR-10" if exists else ": no such folder"
    assert str(error.value) == f"{given}{what}; {EXPECTED_THERE}"
    assert sorted(os.listdir(tmp_path)) == (["wrong"] if exists else [])


def test_the_command_line_reports_a_wrong_data_dir_alone_with_exit_2(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("NFNET_DATA_DIR", "TF_CPP_MIN_LOG_LEVEL")}
    env["PYTHONPATH"] = root
    result = subprocess.run(
        [sys.executable, "-m", "nfnet_keras.fit", "--preset", "tiny", "--no-export", "--run-dir",
         str(tmp_path / "run"), "--data-dir", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"error: --data-dir {tmp_path} holds no CIFAR-10; {EXPECTED_THERE}\n"
    assert os.listdir(tmp_path) == []


def test_seed_policy_proportions():
    """40% untouched, 20% noise, 20% rotation, 20% flip, per image."""
    n = 4000
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((n, 32, 32, 3)), tf.float32)
    out = data.make_augmenter("noise_rotate_flip", seed=1)(images).numpy()
    x = images.numpy()
    untouched = np.all(out == x, axis=(1, 2, 3))
    flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
    changed = ~untouched & ~flipped
    # Noise adds N(0, 0.2^2) to every pixel: the difference has variance 0.04
    # and the image's variance grows. A rotation re-samples the image by
    # bilinear interpolation (convex combinations of pixels) and never grows it.
    diff_var = (out - x).var(axis=(1, 2, 3))
    grew = out.var(axis=(1, 2, 3)) > x.var(axis=(1, 2, 3))
    noise = changed & (np.abs(diff_var - 0.04) < 0.006) & grew
    rotated = changed & ~noise
    assert not (untouched & flipped).any()
    # Binomial std for p=0.2 with n=4000 is 0.0063: 0.03 is ~5 sigma.
    for name, mask, p in (("untouched", untouched, 0.4), ("noise", noise, 0.2),
                          ("rotation", rotated, 0.2), ("flip", flipped, 0.2)):
        assert abs(mask.mean() - p) < 0.03, (name, mask.mean())


def test_rotation_stays_within_15_degrees():
    # A single bright dot off-centre: a rotation by theta moves it by r * theta.
    image = np.zeros((1000, 32, 32, 3), np.float32)
    image[:, 16, 28] = 1.0  # 12 px right of the centre (15.5, 15.5)
    out = data.make_augmenter("noise_rotate_flip", seed=2)(image).numpy()[..., 0]
    # Rotated: changed, not mirrored, and no noise (a bilinear rotation keeps every pixel in [0, 1]).
    rotated = ~np.all(out == image[..., 0], axis=(1, 2)) & ~np.all(out == image[:, :, ::-1, 0], axis=(1, 2))
    rotated &= out.min(axis=(1, 2)) >= 0
    assert abs(rotated.mean() - 0.2) < 0.05
    angles = []
    for rotated_image in out[rotated]:
        r, c = np.unravel_index(rotated_image.argmax(), rotated_image.shape)
        angles.append(np.degrees(np.arctan2(r - 15.5, c - 15.5) - np.arctan2(0.5, 12.5)))
    angles = np.abs(angles)
    assert angles.max() < 15 + 5  # pixel quantisation at r=12 is ~5 degrees
    assert angles.max() > 8  # and it does rotate by large angles


def test_standard_and_none_policies():
    images = tf.random.normal((64, 32, 32, 3), seed=0)
    out = data.make_augmenter("standard", seed=0)(images).numpy()
    assert out.shape == (64, 32, 32, 3)
    # A shift pads with zeros (the mean in normalised space).
    assert (out == 0).any() and not np.array_equal(out, images.numpy())
    assert data.make_augmenter("none") is None
    allowed = r"noise_rotate_flip, standard, translate_flip, translate_altflip, none\."
    with pytest.raises(ValueError, match=r"Use one of: " + allowed):
        data.make_augmenter("mixup")


def test_pipeline_batches_and_normalises():
    x = np.full((10, 32, 32, 3), 255, np.uint8)
    y = np.arange(10)
    batches = list(data.make_dataset(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    white = (1 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    np.testing.assert_allclose(batches[0][0].numpy()[0, 0, 0], white, rtol=1e-6)


@pytest.mark.parametrize("policy", ["noise_rotate_flip", "standard", "translate_flip"])
def test_augmentation_stays_float32_under_mixed_precision(policy):
    """The pipeline's augmentation must not pick up a bfloat16 compute policy
    (the report's policy's tf.where once failed to trace under mixed_bfloat16)."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        ds = data.make_dataset(x, np.zeros(16, np.int64), 8, training=True, augment=policy, seed=0)
        batch, _ = next(iter(ds))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert batch.dtype == tf.float32 and batch.shape == (8, 32, 32, 3)
    assert np.isfinite(batch.numpy()).all()


def test_normalize_is_preprocess_without_tensorflow():
    from nfnet_keras.contract import normalize

    images = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).astype(np.uint8)
    out = normalize(images)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data.preprocess(images).numpy())  # bit for bit: adapted stems agree
    with pytest.raises(ValueError, match="expects uint8"):
        normalize(images.astype(np.float32))
