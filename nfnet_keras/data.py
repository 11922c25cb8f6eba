"""CIFAR-10: sources, normalisation (`preprocess`), augmentation and tf.data pipelines.

The data path reads one way: a source gives uint8 arrays -> `split` ->
`make_dataset` (batch -> `preprocess` -> augmentation -> prefetch) -> the model.
"""

import itertools
import os
import pickle
import tarfile

import keras
import numpy as np
import tensorflow as tf

from nfnet_keras.config import AUGMENTATIONS
from nfnet_keras.contract import CIFAR10_MEAN, CIFAR10_STD, NUM_CLASSES  # noqa: F401  (re-exported)

BATCHES_DIR = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# The fixed permutation behind the train/validation split: independent of
# --seed, so runs with different seeds validate on the same images.
SPLIT_SEED = 20210211


class DataError(RuntimeError):
    """The data could not be found or read; the message says where and what to do."""


def preprocess(images):
    """Normalises uint8 RGB images with the CIFAR-10 training-set statistics.

    The one normalisation of the project: the training pipeline, `predict` and
    the exported SavedModel all call it.

    Args:
        images: uint8 array or tensor `(..., height, width, 3)`.

    Returns:
        float32 tensor of the same shape, `(images / 255 - mean) / std` per channel.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise ValueError(f"preprocess expects uint8 images (0-255), got {images.dtype.name}.")
    if images.shape.rank is not None and images.shape[-1] not in (None, 3):
        raise ValueError(f"preprocess expects RGB images (last axis 3), got shape {images.shape}.")
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(CIFAR10_MEAN)) / tf.constant(CIFAR10_STD)


# === Sources ===


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return _check_batch(pickle.load(f, encoding="bytes"), path)
    except DataError:
        raise
    except Exception as e:  # truncated or not a pickle
        raise DataError(f"CIFAR-10 batch file {path} is corrupt or truncated ({e}); replace it.") from e


def _check_batch(batch, where):
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 batch file {where} has no b'data'/b'labels'; is it a CIFAR-10 batch?")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"CIFAR-10 batch file {where} holds data of shape {data.shape} {data.dtype} "
            f"and {len(labels)} labels; expected N x 3072 uint8 and N labels."
        )
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"CIFAR-10 batch file {where} has labels outside 0-9.")
    # Rows are channels-first (1024 red, 1024 green, 1024 blue): to NHWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _concat(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _from_batches_dir(folder, test_only=False):
    needed = (TEST_FILE,) if test_only else TRAIN_FILES + (TEST_FILE,)
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{folder} lacks CIFAR-10 batch file(s) {', '.join(missing)}; copy them there.")
    test = _unpickle(os.path.join(folder, TEST_FILE))
    if test_only:
        return None, test
    return _concat([_unpickle(os.path.join(folder, f)) for f in TRAIN_FILES]), test


def _from_tarball(path):
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

            def read(name):
                if name not in members:
                    raise DataError(f"{path} has no member {name}; is it the official {TARBALL}?")
                raw = tar.extractfile(members[name]).read()
                try:
                    return _check_batch(pickle.loads(raw, encoding="bytes"), f"{path}:{name}")
                except DataError:
                    raise
                except Exception as e:
                    raise DataError(f"{path}:{name} is corrupt or truncated ({e}).") from e

            return _concat([read(f) for f in TRAIN_FILES]), read(TEST_FILE)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path} is corrupt or truncated ({e}); download it again.") from e


def _local_source(data_dir):
    """The batches folder or tarball under `data_dir`, or None."""
    candidates = [
        (data_dir, "dir"),
        (os.path.join(data_dir, BATCHES_DIR), "dir"),
        (os.path.join(data_dir, TARBALL), "tar"),
    ]
    if os.path.isfile(data_dir):
        return data_dir, "tar"
    for path, kind in candidates:
        if kind == "dir" and any(os.path.isfile(os.path.join(path, f)) for f in TRAIN_FILES + (TEST_FILE,)):
            return path, kind
        if kind == "tar" and os.path.isfile(path):
            return path, kind
    return None


# Where TFDS downloads CIFAR-10 from; probed first, because offline TFDS retries
# with back-off for minutes before it fails.
TFDS_SOURCE_HOST = ("www.cs.toronto.edu", 443)


def _reachable(host, timeout=5.0):
    import socket

    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_tfds(tfds_dir):
    import tensorflow_datasets as tfds

    def load(download):
        splits = tfds.load("cifar10", split=["train", "test"], data_dir=tfds_dir, batch_size=-1,
                           as_supervised=True, download=download)
        return tuple((np.asarray(x, np.uint8), np.asarray(y, np.int64)) for x, y in tfds.as_numpy(splits))

    try:
        return load(download=False)  # an already prepared copy
    except Exception:
        if not _reachable(TFDS_SOURCE_HOST):
            raise ConnectionError(
                f"no prepared copy, and {TFDS_SOURCE_HOST[0]} is unreachable (offline?)"
            ) from None
        return load(download=True)


def load_cifar10(data_dir=None, tfds_dir=None, test_only=False):
    """Loads CIFAR-10 as uint8 NHWC arrays and int64 labels.

    A folder given as `data_dir` (else `$NFNET_DATA_DIR`) must hold the
    `cifar-10-batches-py` folder (or be it), or the official
    `cifar-10-python.tar.gz` (or be it): it is an error if it does not. Only
    when no folder is given does it ask TFDS (`tfds_dir`), which downloads on
    a connected machine.

    Args:
        data_dir: str or None. Defaults to `$NFNET_DATA_DIR`.
        tfds_dir: str or None. TFDS's `data_dir`.
        test_only: bool. Read only the test batch (the training part of the
            result is `None`). Defaults to `False`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: 50,000 and 10,000 images.

    Raises:
        DataError: the folder given holds no CIFAR-10 (the message says what
            was expected there), TFDS has no copy and cannot download one, or a
            file is corrupt (the message names it).
    """
    given = f"--data-dir {data_dir}" if data_dir else None
    if not data_dir and os.environ.get("NFNET_DATA_DIR"):
        data_dir = os.environ["NFNET_DATA_DIR"]
        given = f"NFNET_DATA_DIR={data_dir}"
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
        found = _local_source(data_dir)
        if found:
            path, kind = found
            if kind == "dir":
                return _from_batches_dir(path, test_only)
            train, test = _from_tarball(path)
            return (None if test_only else train), test
        what = ": no such folder" if not os.path.exists(data_dir) else " holds no CIFAR-10"
        raise DataError(
            f"{given}{what}; expected the folder holding {BATCHES_DIR}/ (data_batch_1-5, test_batch) or "
            f"{TARBALL}. Point it there, or give no folder to use TensorFlow Datasets."
        )
    try:
        return _from_tfds(tfds_dir)
    except Exception as e:  # offline, no TFDS copy
        raise DataError(
            f"CIFAR-10 not found: no --data-dir or NFNET_DATA_DIR given, and tensorflow_datasets 'cifar10' in "
            f"{tfds_dir or '~/tensorflow_datasets'} failed ({e}). Pass --data-dir DIR (or set NFNET_DATA_DIR) to "
            f"a folder holding {BATCHES_DIR}/ or {TARBALL}."
        ) from e


def split(x, y, val_size=5000, train_limit=None):
    """Deterministic train/validation split of the training images.

    The same fixed permutation every time; the validation set is its first
    `val_size` images, training the rest (its first `train_limit` if given).
    """
    n = len(x)
    if not 1 <= val_size < n:
        raise ValueError(f"--val-size must be >= 1 and less than the {n} training images, got {val_size}.")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_limit is not None:
        if train_limit < 1:
            raise ValueError(f"--train-limit must be >= 1, got {train_limit}.")
        train_idx = train_idx[:train_limit]
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


# === Augmentation (on normalised float batches) and the pipelines ===
#
# One implementation of every policy: per-image draws from a stateless key (`_per_image_draws`) applied to a
# batch (`_augment_batch`). `make_epoch_dataset` keys them on (seed, epoch) and the image, `make_augmenter` on
# (seed, batch index).

# Policies that only an epoch-indexed pipeline implements (they depend on the epoch): `make_augmenter`
# has no batch augmenter for them. Every policy has an epoch-indexed training pipeline (`make_epoch_dataset`).
EPOCH_AUGMENTATIONS = ("translate_altflip",)
# Salts of the stateless random streams of an epoch-indexed pipeline (one per kind of draw).
_FLIP_SALT, _ORDER_SALT, _SHIFT_SALT, _MIRROR_SALT, _CHOICE_SALT, _ANGLE_SALT, _NOISE_SALT = 1, 2, 3, 4, 5, 6, 7
# The largest shift (pixels, at 32 x 32) of each translating policy, and how the uncovered border is filled.
_SHIFT_POLICIES = {"translate_altflip": (2, "REFLECT"), "translate_flip": (2, "REFLECT"), "standard": (4, "CONSTANT")}


def shift_for(policy, image_shape):
    """(largest shift in pixels, border fill) of a translating policy on images of `image_shape` `(h, w, ...)`.

    The shift of `_SHIFT_POLICIES` at 32 x 32, scaled with the shorter side
    (rounded, at least 1): e.g. `translate_flip` moves 64 x 64 images by up to 4 pixels.
    A policy that does not translate: `(0, None)`.
    """
    pad, fill = _SHIFT_POLICIES.get(policy, (0, None))
    if pad:
        pad = max(1, round(pad * min(image_shape[:2]) / 32))
    return pad, fill


# `noise_rotate_flip`: the noise (normalised units) and the largest rotation (degrees).
_NOISE_STDDEV, _MAX_DEGREES = 0.2, 15.0


def first_epoch_mirrored(seed, count):
    """Which of `count` training images `translate_altflip` mirrors on epoch 0: a random half, from `seed`.

    Returns:
        bool array `(count,)`; image `i` is mirrored on epoch `e` iff
        `first_epoch_mirrored(seed, count)[i] != (e % 2 == 1)`.
    """
    return np.random.default_rng([seed, _FLIP_SALT]).random(count) < 0.5


def _epoch_key(seed, salt, epoch):
    """The stateless seed of one kind of draw (`salt`) at `epoch` (an int64 tensor)."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, salt], tf.int64), epoch)


def translate_batch(images, shifts, pad=2, mode="REFLECT"):
    """Each image moved by its own `(dy, dx)`, the uncovered border filled by reflection (or zeros).

    `out[i, r, c] = image[i, r - dy, c - dx]` inside the image; `|dy|, |dx| <= pad`.
    The same convention as the test-time views (`inference.TTA_VIEWS`).

    Args:
        images: float tensor `(n, h, w, c)`.
        shifts: int32 tensor `(n, 2)`: `(dy, dx)` of each image.
        pad: int. The largest shift. Defaults to `2`.
        mode: str. `"REFLECT"`, or `"CONSTANT"` (zeros: the mean colour of normalised images).
            Defaults to `"REFLECT"`.

    Returns:
        A tensor like `images`.
    """
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode)
    rows = tf.range(height)[None, :] + pad - shifts[:, :1]
    cols = tf.range(width)[None, :] + pad - shifts[:, 1:]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def rotate_batch(images, degrees):
    """Each image rotated about its centre by its own angle, bilinear, the corners filled by reflection.

    Args:
        images: float32 tensor `(n, h, w, c)`.
        degrees: float32 tensor `(n,)`.

    Returns:
        A tensor like `images`.
    """
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    cy, cx = (tf.cast(height, tf.float32) - 1) / 2, (tf.cast(width, tf.float32) - 1) / 2
    radians = degrees * (np.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    zeros = tf.zeros_like(cos)
    # Output (x, y) reads input (cos*(x-cx) - sin*(y-cy) + cx, sin*(x-cx) + cos*(y-cy) + cy).
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros],
                          axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.stack([height, width]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


class EpochFeed(keras.callbacks.Callback):
    """Tells an epoch-indexed training pipeline the epoch and step `fit` starts at.

    The pipeline (`make_epoch_dataset`) yields the batches of epochs
    `start_epoch .. epochs - 1` in one pass, each epoch's batches a function of
    its index, the first `start_step` batches of `start_epoch` left out; `fit`
    reads `steps_per_epoch` of them per epoch from one iterator. The iterator is
    created after the first `on_epoch_begin` (which sets `start_epoch` here,
    after a resume callback such as `EpochCheckpoint` has set the initial epoch
    in `on_train_begin`, and `start_step` from `resume_step`, which a
    mid-epoch resume sets then), and the pipeline reads both when it yields its
    first batch: a run resumed after epoch `k` (and step `s` of epoch `k + 1`)
    sees the batches that an uninterrupted run sees from there on.
    `training.fit_model` adds the feed of `train_ds.epoch_feed` to its callbacks.

    Args:
        steps_per_epoch: int. Batches per epoch.
    """

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.start_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="start_epoch")
        self.start_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="start_step")
        self.resume_step = 0
        self._started = False

    def on_train_begin(self, logs=None):
        self._started = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self.start_epoch.assign(epoch)
            self.start_step.assign(self.resume_step)
            self._started = True


def _check_policy(augment):
    if augment not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {augment!r}. Use one of: {', '.join(AUGMENTATIONS)}.")
    return augment


def _per_image_draws(policy, seed, epoch, count, pad, mirrored_first):
    """An epoch's augmentation draws of each image (by image index), stateless in `(seed, epoch)`."""

    def uniform(salt, shape=(), **kwargs):
        return tf.random.stateless_uniform([count, *shape], seed=_epoch_key(seed, salt, epoch), **kwargs)

    draws = {}
    if pad:
        draws["shift"] = uniform(_SHIFT_SALT, (2,), minval=-pad, maxval=pad + 1, dtype=tf.int32)
    if policy == "translate_altflip":
        draws["mirror"] = tf.not_equal(mirrored_first, tf.equal(epoch % 2, 1))
    elif policy in ("translate_flip", "standard"):
        draws["mirror"] = uniform(_MIRROR_SALT) < 0.5
    elif policy == "noise_rotate_flip":
        # Branch per image: [0, 0.4) untouched, [0.4, 0.6) noise, [0.6, 0.8) rotation, [0.8, 1) mirror.
        draws["branch"] = tf.searchsorted(tf.constant([0.4, 0.6, 0.8]), uniform(_CHOICE_SALT), side="right")
        draws["degrees"] = uniform(_ANGLE_SALT, minval=-_MAX_DEGREES, maxval=_MAX_DEGREES)
    return draws


def _augment_batch(batch, draws, pad, fill, seed, epoch, step):
    """A preprocessed batch augmented by its images' draws (`_per_image_draws`); pixel noise keyed on the step."""
    if "shift" in draws:
        batch = translate_batch(batch, draws["shift"], pad, fill)
    if "mirror" in draws:
        batch = tf.where(draws["mirror"][:, None, None, None], tf.reverse(batch, axis=[2]), batch)
    if "branch" in draws:
        branch = draws["branch"][:, None, None, None]
        noise_key = tf.random.experimental.stateless_fold_in(_epoch_key(seed, _NOISE_SALT, epoch), step)
        noise = tf.random.stateless_normal(tf.shape(batch), seed=noise_key, stddev=_NOISE_STDDEV)
        out = tf.where(branch == 1, batch + noise, batch)
        out = tf.where(branch == 2, rotate_batch(batch, draws["degrees"]), out)
        batch = tf.where(branch == 3, tf.reverse(batch, axis=[2]), out)
    return batch


def make_epoch_dataset(x, y, batch_size, epochs, augment="translate_altflip", seed=0, start_epoch=None,
                       start_step=0, one_hot=False, num_classes=NUM_CLASSES):
    """The training pipeline as a function of (seed, epoch, step): resumable at any step.

    For each epoch `e` from `start_epoch` to `epochs - 1`: the images in an
    order drawn from `(seed, e)` -> batches (the last one smaller) -> gather ->
    `preprocess` -> the policy -> (one-hot). Every random draw is stateless,
    keyed on `(seed, e)` and the image (or, for pixel noise, the step), so
    nothing depends on the batches before and a run resumed at epoch `e`, step
    `s` gets the same batches as an uninterrupted one.

    The policies (`config.AUGMENTATIONS`): `translate_altflip`: each image
    moved by its own `(dy, dx)` in `-2..2` with reflected borders, then
    mirrored on alternate epochs: on epoch 0 the images of
    `first_epoch_mirrored(seed, n)` (a random half), on every later epoch
    exactly those that were not mirrored on the epoch before.
    `translate_flip`: the same shift, each image mirrored with probability
    1/2. `standard`: a shift in `-4..4` with zero (mean) borders, a pad-4
    random crop, and the mirror. The shifts are those of 32 x 32 images,
    scaled with the images' shorter side (`shift_for`). `noise_rotate_flip`: each image 40% untouched,
    20% Gaussian noise (std 0.2 in normalised units), 20% rotated by a uniform
    angle in +-15 degrees (reflected corners), 20% mirrored (the report's
    policy). `none`: no augmentation.

    Args:
        x: uint8 array `(n, h, w, 3)`.
        y: int array `(n,)`.
        batch_size: int.
        epochs: int. The run's epochs.
        augment: str. A policy of `config.AUGMENTATIONS` (or an alias).
            Defaults to `"translate_altflip"`.
        seed: int. Defaults to `0`.
        start_epoch: int or None. The first epoch to yield; None: read from a
            new `EpochFeed` when the first batch is drawn (set by `fit`).
            Defaults to `None`.
        start_step: int. Batches of the first epoch left out (with a given
            `start_epoch`; the feed's `start_step` otherwise). Defaults to `0`.
        one_hot: bool. One-hot labels of `num_classes`. Defaults to `False`.
        num_classes: int. Defaults to `NUM_CLASSES`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)`; with `start_epoch=None` its
        `epoch_feed` attribute holds the `EpochFeed` to pass to `fit`.
    """
    policy = _check_policy(augment)
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}.")
    count = len(x)
    steps = -(-count // batch_size)
    if not (isinstance(start_step, int) and 0 <= start_step < steps):
        raise ValueError(f"start_step must be an int in [0, {steps}) (the batches of an epoch), got {start_step!r}.")
    feed = EpochFeed(steps) if start_epoch is None else None
    images, labels = tf.constant(x), tf.constant(y)
    mirrored_first = tf.constant(first_epoch_mirrored(seed, count))
    pad, fill = shift_for(policy, x.shape[1:])

    def skipped(epoch):
        if feed is None:
            return tf.where(tf.equal(epoch, start_epoch), tf.constant(start_step, tf.int64), 0)
        return tf.where(tf.equal(epoch, feed.start_epoch), feed.start_step, 0)

    def epoch_batches(epoch):
        order = tf.argsort(tf.random.stateless_uniform([count], seed=_epoch_key(seed, _ORDER_SALT, epoch)))
        draws = _per_image_draws(policy, seed, epoch, count, pad, mirrored_first)
        draws = {name: tf.gather(values, order) for name, values in draws.items()}
        ds = tf.data.Dataset.from_tensor_slices((order, draws)).batch(batch_size).enumerate()
        return ds.skip(skipped(epoch)).map(lambda step, batch: (epoch, step, *batch))

    def transform(epoch, step, index, draws):
        batch = _augment_batch(preprocess(tf.gather(images, index)), draws, pad, fill, seed, epoch, step)
        batch_labels = tf.gather(labels, index)
        if one_hot:
            batch_labels = tf.one_hot(batch_labels, num_classes)
        return batch, batch_labels

    if feed is None:
        epoch_ids = tf.data.Dataset.range(start_epoch, epochs)
    else:  # read when the first batch is drawn, after fit's first on_epoch_begin
        epoch_ids = tf.data.Dataset.range(epochs).filter(lambda epoch: epoch >= feed.start_epoch)
    ds = epoch_ids.flat_map(epoch_batches)
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
    if feed is not None:
        ds.epoch_feed = feed
    return ds


def make_augmenter(policy, seed=None):
    """Returns `augment(images, index=None)` on normalised float batches for a policy of `config.AUGMENTATIONS`.

    The policies of `make_epoch_dataset`, by the same code (`_per_image_draws`,
    `_augment_batch`), each batch's draws keyed on `(seed, index)`: `index`
    counts the batches (`make_dataset` passes it); a call without it takes the
    next count. `noise_rotate_flip`: the report's per-image policy;
    `standard`: pad-4 random crop + horizontal flip; `translate_flip`: a
    random translation of up to 2 px with reflected borders + horizontal
    flip (shifts scaled with the image size, `shift_for`); `none`: None. The
    policies of `EPOCH_AUGMENTATIONS` depend on the epoch and have no batch
    augmenter: `make_dataset(..., epochs=N)` builds them.

    Args:
        policy: str. A policy of `config.AUGMENTATIONS`.
        seed: int or None. None: a seed drawn at random. Defaults to `None`.
    """
    if _check_policy(policy) in EPOCH_AUGMENTATIONS:
        raise ValueError(f"{policy!r} depends on the epoch: build its pipeline with make_dataset(..., epochs=N).")
    if policy == "none":
        return None
    seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
    calls = itertools.count()

    def augment(images, index=None):
        images = tf.convert_to_tensor(images, tf.float32)
        index = tf.constant(next(calls), tf.int64) if index is None else tf.cast(index, tf.int64)
        pad, fill = shift_for(policy, images.shape[1:])
        draws = _per_image_draws(policy, seed, index, tf.shape(images)[0], pad, None)
        return _augment_batch(images, draws, pad, fill, seed, index, 0)

    return augment


def make_dataset(x, y, batch_size, training=False, augment="none", seed=None, repeat=False, one_hot=False,
                 num_classes=NUM_CLASSES, epochs=None):
    """A `tf.data` pipeline: (shuffle) -> batch -> preprocess -> (augment) -> prefetch.

    Augmentation runs on whole batches, in parallel with training. With
    `one_hot`, labels become one-hot vectors of `num_classes` (for a loss with
    label smoothing, which the sparse loss cannot do). A training pipeline
    given `epochs` (as `training.make_datasets` gives) is
    `make_epoch_dataset`'s: all the epochs in one pass, each batch a function
    of (seed, epoch, step), with an `epoch_feed` for `fit`, so that a resumed
    run sees the batches of an uninterrupted one. Without `epochs` it shuffles
    anew on each pass and augments each batch with `make_augmenter`'s draws,
    keyed on the seed and the batch's index; a policy of `EPOCH_AUGMENTATIONS` needs `epochs`.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}.")
    if training and (epochs is not None or augment in EPOCH_AUGMENTATIONS):
        if epochs is None or repeat:
            raise ValueError(f"augmentation {augment!r} depends on the epoch: pass epochs=N (and no repeat).")
        return make_epoch_dataset(x, y, batch_size, epochs, augment, seed=seed or 0, one_hot=one_hot,
                                  num_classes=num_classes)
    augmenter = make_augmenter(augment, seed) if training else None
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=False).enumerate()

    def transform(index, batch):
        images, labels = batch
        images = preprocess(images)
        if augmenter is not None:
            images = augmenter(images, index)
        if one_hot:
            labels = tf.one_hot(labels, num_classes)
        return images, labels

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
