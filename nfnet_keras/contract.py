"""What a model of this package takes and gives, in one place.

The images every entry point accepts (uint8 RGB, 32 x 32 for CIFAR-10; a
model trained on other images takes their size), the class names, and the TF
Serving contract of an export: the signature, its input and output names, and
the class-names asset. A `.keras` model written by `fit` carries its class
names too, as the member `class_names.txt` of its zip archive
(`write_class_names`, `read_class_names`), and every export as a
`class_names.txt` file (`read_class_names_file`): an export's contract follows
its model, whatever its image size and classes. `export` writes this contract,
`serving` reads it, `inference` and `data` check images against it. Imports no
TensorFlow.
"""

import os
import re
import zipfile

import numpy as np

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)
# Channel statistics of the 50,000 CIFAR-10 training images on the [0, 1] scale: the one normalisation of
# the project (`normalize` here, `data.preprocess` for TensorFlow graphs, the ONNX/LiteRT export's input).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The exported SavedModel's serving signature.
SIGNATURE = "serving_default"
INPUT = "image"  # uint8 [batch, height, width, 3], raw pixels (32 x 32 for CIFAR-10)
PROBABILITIES = "probabilities"  # float32 [batch, num_classes]
CLASS_ID = "class_id"  # int64 [batch]
CLASS_NAMES_ASSET = "class_names.txt"  # under assets/, one name per line in class-id order
# A model's name in TF Serving's model folder (`<base>/<name>/<version>/`).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def normalize(images):
    """uint8 RGB images `(..., height, width, 3)` as float32 `(images / 255 - mean) / std` per channel (NumPy).

    The same values as `data.preprocess`, without TensorFlow.
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"normalize expects uint8 images (0-255), got {x.dtype.name}.")
    x = x.astype("float32") / np.float32(255.0)
    return (x - np.asarray(CIFAR10_MEAN, "float32")) / np.asarray(CIFAR10_STD, "float32")


class InputError(ValueError):
    """Bad images, a bad model path or a bad output path; the message says what to do."""


def check_images(images, where="images", allow_single=False, shape=IMAGE_SHAPE):
    """Returns `images` as a uint8 array `(batch, *shape)`, or raises InputError.

    Args:
        images: array-like. Raw RGB pixels, 0-255.
        where: str. What to name in the error message (a flag, a file).
        allow_single: bool. Accept one image `shape` and add a batch axis.
            Defaults to `False`.
        shape: tuple. `(height, width, 3)` of an image; a `None` size takes any.
            Defaults to `IMAGE_SHAPE`.

    Raises:
        InputError: not uint8 (models normalise raw pixels themselves, so the
            pixels must not be scaled), or not `(batch, *shape)`.
    """
    shape = tuple(shape)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(
            f"{where}: expected uint8 raw pixels (0-255), got dtype {images.dtype}; the model "
            "normalises them itself, so do not scale them."
        )
    def fits(image_shape):
        return len(image_shape) == 3 and all(s is None or s == d for s, d in zip(shape, image_shape))

    if allow_single and images.ndim == 3 and fits(images.shape):
        images = images[None]
    if images.ndim != 4 or not fits(images.shape[1:]):
        sizes = " x ".join("H W 3".split()[i] if s is None else str(s) for i, s in enumerate(shape))
        expected = f"N x {sizes}" + (f" or {sizes}" if allow_single else "")
        raise InputError(f"{where}: expected shape {expected}, got {images.shape}.")
    return images


def write_class_names(keras_path, class_names):
    """Adds the class names (one per line, in class-id order) to a saved `.keras` archive as `class_names.txt`.

    Keras loads the archive as before: it reads only its own members.
    """
    with zipfile.ZipFile(keras_path, "a") as archive:
        archive.writestr(CLASS_NAMES_ASSET, "".join(f"{name}\n" for name in class_names))


def read_class_names(keras_path):
    """The class names a `.keras` archive carries (`write_class_names`), or None if it carries none."""
    with zipfile.ZipFile(keras_path) as archive:
        if CLASS_NAMES_ASSET not in archive.namelist():
            return None
        return tuple(archive.read(CLASS_NAMES_ASSET).decode("utf-8").splitlines())


def read_class_names_file(path):
    """The class names of a `class_names.txt` (one per line, in class-id order), or None if there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return tuple(f.read().splitlines())


def default_class_names(count):
    """The class names of a model that carries none: CIFAR-10's for 10 classes, else the class ids as text."""
    return CLASS_NAMES if count == NUM_CLASSES else tuple(str(i) for i in range(count))


def is_cifar10(image_shape, class_names):
    """Whether a model with these `(height, width, 3)` inputs and class names classifies CIFAR-10."""
    return tuple(image_shape) == IMAGE_SHAPE and tuple(class_names) == CLASS_NAMES


def describe(image_shape, class_names, most=5):
    """`"48 x 48 images, 3 classes (cat, dog, fox)"`: what a model takes and gives, for messages."""
    sizes = " x ".join("?" if s is None else str(s) for s in tuple(image_shape)[:2])
    names = ", ".join(class_names[:most]) + (", ..." if len(class_names) > most else "")
    return f"{sizes} images, {len(class_names)} classes ({names})"


def check_model_name(name):
    """Raises a ValueError unless `name` can name a model in TF Serving's model folder."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"Model name {name!r} is not valid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (e.g. 'nfnet')."
        )
