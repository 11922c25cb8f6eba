"""Labelled image sources: CIFAR-10, a folder of class subfolders, or a prepared TFDS dataset.

`load_dataset(spec)` reads any of them as uint8 NHWC arrays (the model's
input), int64 labels and the class names, at the data's own resolution or
resized to `image_size`:

- `"cifar10"`: `nfnet_keras.data.load_cifar10`, the CIFAR-10 class names.
- `"folder:PATH"`: Keras' `image_dataset_from_directory` convention: one
  subfolder of images per class, the class names the sorted subfolder names.
  With subfolders `train/` and `test/` (each holding the same class
  subfolders) those are the splits; otherwise a fixed, seeded fifth of each
  class is the test split (`FOLDER_TEST_FRACTION`, `data.SPLIT_SEED`).
- `"tfds:NAME"`: a TensorFlow Datasets image classification dataset (an
  `image` feature and a `ClassLabel` `label`), already prepared in the TFDS
  data_dir (nothing is downloaded). Its `train` and `test` splits; without a
  `test` split, the `train` split is divided as a folder's.

Every image is held in memory (N x H x W x 3 bytes, and once more as the
pipeline's constant), so a source suits datasets of up to a few GiB.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from nfnet_keras.config import dataset_problem
from nfnet_keras.contract import CLASS_NAMES
from nfnet_keras.data import SPLIT_SEED, DataError, load_cifar10

# The image files a folder source reads (Keras' `image_dataset_from_directory` formats).
FOLDER_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Of each class, the part a folder without train/ and test/ (or a TFDS dataset without a test split) tests on.
FOLDER_TEST_FRACTION = 0.2
# Of the training images of a dataset other than CIFAR-10, the most `--val-size` holds out.
MAX_VAL_FRACTION = 0.1


@dataclasses.dataclass
class LabelledData:
    """A source's images: `train` and `test` as `(uint8 NHWC, int64 labels)`, and the class names.

    Attributes:
        train: tuple or None. The training images (validation included); None when only the test split was read.
        test: tuple. The test images.
        class_names: tuple of str. In label order.
        note: str. How the splits were made, when the source did not give them (else empty).
    """

    train: tuple | None
    test: tuple
    class_names: tuple
    note: str = ""

    @property
    def image_shape(self):
        return tuple(self.test[0].shape[1:])


def _size_pair(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    return tuple(int(s) for s in image_size)


def resize_images(images, size):
    """uint8 images `(n, h, w, 3)` resized to `size` `(height, width)` (bilinear, antialiased); as is if already."""
    if size is None or tuple(images.shape[1:3]) == tuple(size):
        return images
    out = [_resize(tf.constant(images[i:i + 1024]), size).numpy() for i in range(0, len(images), 1024)]
    return np.concatenate(out) if out else np.zeros((0, *size, 3), np.uint8)


def _resize(image, size):
    resized = tf.image.resize(image, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def load_dataset(spec, data_dir=None, tfds_dir=None, image_size=None, test_only=False):
    """Reads a labelled image source (see the module's docstring).

    Args:
        spec: str. `"cifar10"`, `"folder:PATH"` or `"tfds:NAME"`.
        data_dir: str or None. CIFAR-10's folder (`load_cifar10`).
        tfds_dir: str or None. The TFDS data_dir (default `~/tensorflow_datasets`).
        image_size: int, `(height, width)` or None. Resize every image to it;
            None: the data's own size, which all its images must share.
        test_only: bool. Read only the test split (`train` is None). Defaults to `False`.

    Returns:
        A `LabelledData`.

    Raises:
        DataError: one line naming the source, what is wrong and what to do.
    """
    problem = dataset_problem(spec)
    if problem:
        raise DataError(f"--dataset {problem}.")
    size = _size_pair(image_size)
    kind, _, rest = spec.partition(":")
    if kind == "folder":
        return load_folder(rest, size, test_only)
    if kind == "tfds":
        return load_tfds(rest, tfds_dir, size, test_only)
    train, test = load_cifar10(data_dir, tfds_dir, test_only=test_only)
    if size is not None:
        train = None if train is None else (resize_images(train[0], size), train[1])
        test = (resize_images(test[0], size), test[1])
    return LabelledData(train, test, CLASS_NAMES)


def holdout_split(labels, fraction=FOLDER_TEST_FRACTION):
    """(train indices, test indices): `int(fraction * n_c)` images of each class `c` to test, seeded by `SPLIT_SEED`."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(fraction * len(members))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_note(what, test_count):
    return (f"{what} has no test split: {test_count} images (a fixed fifth of each class, seed {SPLIT_SEED}) are held "
            "out to test on.")


def _divided(images, labels, class_names, what):
    train_idx, test_idx = holdout_split(labels)
    if not len(test_idx):
        raise DataError(f"{what} has too few images to hold a fifth of a class out as its test split; give each "
                        "class at least 5 images, or train/ and test/ subfolders.")
    return LabelledData((images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]),
                        class_names, _split_note(what, len(test_idx)))


# === Folders ===


def _class_folders(folder, what):
    if not os.path.isdir(folder):
        problem = "is a file, not a folder" if os.path.exists(folder) else "no such folder"
        raise DataError(f"{what}: {problem}; give a folder with one subfolder of images per class.")
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if not names:
        raise DataError(f"{what} has no class subfolders; put each class's images in its own subfolder "
                        f"({os.path.join(folder, '<class>', 'image.png')}).")
    if len(names) == 1:
        raise DataError(f"{what} has one class subfolder ({names[0]}); a classifier needs at least 2 classes.")
    return names


def _image_files(folder, names, what):
    """(files, labels) of the class subfolders `names` of `folder`; every class must hold an image."""
    files, labels = [], []
    empty = []
    for label, name in enumerate(names):
        sub = os.path.join(folder, name)
        found = sorted(f for f in os.listdir(sub) if f.lower().endswith(FOLDER_EXTENSIONS)
                       and os.path.isfile(os.path.join(sub, f)))
        if not found:
            empty.append(name)
        files += [os.path.join(sub, f) for f in found]
        labels += [label] * len(found)
    kinds = "/".join(e.lstrip(".") for e in FOLDER_EXTENSIONS)
    if len(empty) == len(names):
        raise DataError(f"{what} holds no images ({kinds}) in its class subfolders; add images there.")
    if empty:
        raise DataError(f"{what}: class folder {os.path.join(folder, empty[0])} holds no images ({kinds}); add "
                        "some or remove the folder.")
    return files, np.asarray(labels, np.int64)


def read_image_files(files, size=None):
    """Decodes image files to uint8 RGB arrays, in parallel; each resized to `size` `(height, width)` if given.

    Returns:
        A list of uint8 arrays `(h, w, 3)`, in the order of `files`.

    Raises:
        DataError: a file is not a readable image (the message names it).
    """
    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return image if size is None else _resize(image, size)

    ds = tf.data.Dataset.from_tensor_slices(list(files)).map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                                                deterministic=True)
    images = []
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            images.append(next(iterator))
        except StopIteration:
            return images
        except tf.errors.OpError as e:  # the next file in order failed to decode
            reason = e.message.strip().splitlines()[0] if e.message.strip() else type(e).__name__
            raise DataError(f"{files[len(images)]} is not a readable image ({reason}); remove or replace it.") from None


def _stack(images, names, what):
    """One uint8 array of images that must share a size (else a DataError saying to pass --image-size)."""
    shapes = {}
    for image, name in zip(images, names):
        shapes.setdefault(image.shape, name)
    if len(shapes) > 1:
        (a, first), (b, second) = list(shapes.items())[:2]
        raise DataError(f"{what}: images differ in size ({a[1]}x{a[0]} in {first}, {b[1]}x{b[0]} in {second}); "
                        "pass --image-size N to resize them all to N x N.")
    return np.stack(images)


def _read_folder(folder, names, size, what):
    files, labels = _image_files(folder, names, what)
    return _stack(read_image_files(files, size), files, what), labels


def load_folder(path, size=None, test_only=False):
    """A folder of class subfolders (see the module's docstring) as a `LabelledData`."""
    what = f"--dataset folder:{path}"
    path = os.path.expanduser(path)
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if not (os.path.isdir(train_dir) and os.path.isdir(test_dir)):
        names = _class_folders(path, what)
        images, labels = _read_folder(path, names, size, what)
        data = _divided(images, labels, tuple(names), what)
        return dataclasses.replace(data, train=None) if test_only else data
    names = _class_folders(train_dir, f"{what}/train")
    test_names = _class_folders(test_dir, f"{what}/test")
    if test_names != names:
        raise DataError(f"{what}: test/ has classes {', '.join(test_names)} but train/ has {', '.join(names)}; "
                        "give both the same class subfolders.")
    test = _read_folder(test_dir, names, size, f"{what}/test")
    train = None
    if not test_only:
        train = _read_folder(train_dir, names, size, f"{what}/train")
        if train[0].shape[1:] != test[0].shape[1:]:
            raise DataError(f"{what}: train/ images are {train[0].shape[2]}x{train[0].shape[1]} but test/ images "
                            f"are {test[0].shape[2]}x{test[0].shape[1]}; pass --image-size N to resize both.")
    return LabelledData(train, test, tuple(names))


# === TensorFlow Datasets ===


def _tfds_builder(name, tfds_dir):
    import tensorflow_datasets as tfds

    what = f"--dataset tfds:{name}"
    where = tfds_dir or os.path.join("~", "tensorflow_datasets")
    try:
        builder = tfds.builder(name, data_dir=tfds_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"{what}: no TFDS dataset of that name, registered or prepared in {where}; check the name "
                        "or --tfds-dir.") from None
    except Exception as e:  # a malformed name or version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{what}: {reason}") from None
    if not builder.is_prepared():
        raise DataError(f"{what} is not prepared in {where} (nothing is downloaded here); prepare it on a connected "
                        f"machine (tfds build {name} --data_dir DIR), copy DIR here and pass --tfds-dir DIR.")
    features = builder.info.features
    image, label = (features[k] if k in features else None for k in ("image", "label"))
    if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
        raise DataError(f"{what} is not an image classification dataset: it needs an 'image' feature and a "
                        f"ClassLabel 'label', it has {', '.join(features.keys())}.")
    return builder


def _read_tfds_split(builder, split, size, what):
    def select(example):
        image = example["image"]
        image = tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image
        return image if size is None else _resize(image, size), example["label"]

    ds = builder.as_dataset(split=split).map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise DataError(f"{what}: the {split} split holds no images.")
    return _stack(images, [f"{split}[{i}]" for i in range(len(images))], what), np.asarray(labels, np.int64)


def load_tfds(name, tfds_dir=None, size=None, test_only=False):
    """A prepared TFDS image classification dataset (see the module's docstring) as a `LabelledData`."""
    what = f"--dataset tfds:{name}"
    builder = _tfds_builder(name, tfds_dir)
    splits = builder.info.splits
    class_names = tuple(builder.info.features["label"].names)
    if len(class_names) < 2:
        raise DataError(f"{what} has {len(class_names)} class; a classifier needs at least 2 classes.")
    if "train" not in splits:
        raise DataError(f"{what} has no train split (it has {', '.join(splits.keys())}).")
    if "test" not in splits:
        images, labels = _read_tfds_split(builder, "train", size, what)
        data = _divided(images, labels, class_names, what)
        return dataclasses.replace(data, train=None) if test_only else data
    test = _read_tfds_split(builder, "test", size, what)
    train = None if test_only else _read_tfds_split(builder, "train", size, what)
    if train is not None and train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(f"{what}: its train and test images differ in size; pass --image-size N to resize both.")
    return LabelledData(train, test, class_names)


def val_size_for(spec, requested, train_count):
    """The validation images to hold out: `requested`, for a dataset other than CIFAR-10 at most a tenth.

    Returns:
        `(size, note)`: the note says when `requested` was lowered (else empty).
    """
    if spec == "cifar10":
        return requested, ""
    cap = max(1, int(MAX_VAL_FRACTION * train_count))
    if requested <= cap:
        return requested, ""
    return cap, (f"Holding out {cap} of the {train_count} training images for validation (--val-size {requested} "
                 f"is at most a tenth of them).")
