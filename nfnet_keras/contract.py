"""What a model of this package takes and gives, in one place.

The images every entry point accepts (uint8 RGB, 32 x 32), the class names,
and the TF Serving contract of an export: the signature, its input and output
names, and the class-names asset. `export` writes this contract, `serving`
reads it, `inference` and `data` check images against it. Imports no
TensorFlow.
"""

import re

import numpy as np

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)

# The exported SavedModel's serving signature.
SIGNATURE = "serving_default"
INPUT = "image"  # uint8 [batch, 32, 32, 3], raw pixels
PROBABILITIES = "probabilities"  # float32 [batch, num_classes]
CLASS_ID = "class_id"  # int64 [batch]
CLASS_NAMES_ASSET = "class_names.txt"  # under assets/, one name per line in class-id order
# A model's name in TF Serving's model folder (`<base>/<name>/<version>/`).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class InputError(ValueError):
    """Bad images, a bad model path or a bad output path; the message says what to do."""


def check_images(images, where="images", allow_single=False):
    """Returns `images` as a uint8 array `(batch, 32, 32, 3)`, or raises InputError.

    Args:
        images: array-like. Raw RGB pixels, 0-255.
        where: str. What to name in the error message (a flag, a file).
        allow_single: bool. Accept one image `(32, 32, 3)` and add a batch axis.
            Defaults to `False`.

    Raises:
        InputError: not uint8 (models normalise raw pixels themselves, so the
            pixels must not be scaled), or not `(batch, 32, 32, 3)`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(
            f"{where}: expected uint8 raw pixels (0-255), got dtype {images.dtype}; the model "
            "normalises them itself, so do not scale them."
        )
    if allow_single and images.shape == IMAGE_SHAPE:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        expected = "N x 32 x 32 x 3" + (" or 32 x 32 x 3" if allow_single else "")
        raise InputError(f"{where}: expected shape {expected}, got {images.shape}.")
    return images


def check_model_name(name):
    """Raises a ValueError unless `name` can name a model in TF Serving's model folder."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"Model name {name!r} is not valid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (e.g. 'nfnet')."
        )
