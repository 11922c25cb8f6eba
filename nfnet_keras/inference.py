"""Loading a trained model for inference, and reading images to classify.

Shared by `python -m nfnet_keras.evaluate` and `python -m nfnet_keras.predict`. TensorFlow is imported
only to load a SavedModel or decode image files: a Keras model's predictions and the test-time
augmentation run on any Keras backend.
"""

import os
import zipfile

import keras
import numpy as np

from nfnet_keras.config import TTA_LOG_AVERAGED, TTA_POLICY_WEIGHTS
from nfnet_keras.contract import (
    CLASS_NAMES_ASSET,
    IMAGE_SHAPE,
    INPUT,
    PROBABILITIES,
    SIGNATURE,
    InputError,
    check_images,
    default_class_names,
    normalize,
    read_class_names,
    read_class_names_file,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def keras_predictor(model, batch_size=256):
    """`predict(uint8 images) -> probabilities` for an in-memory Keras model (logits out)."""

    def predict(images):
        logits = keras.ops.cast(model.predict(normalize(images), batch_size=batch_size, verbose=0), "float32")
        return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))

    return predict


def _translate(images, dy, dx):
    """`images` moved by `dy` rows and `dx` columns, the uncovered border filled by reflection."""
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return padded[:, 1 - dy:1 - dy + height, 1 - dx:1 - dx + width]


def _mirror(images):
    return images[:, :, ::-1]


# Each view of `config.TTA_VIEW_NAMES`: a function of a uint8 batch (N, H, W, C).
TTA_VIEWS = {
    "identity": lambda x: x,
    "mirror": _mirror,
    "translate(-1,-1)": lambda x: _translate(x, -1, -1),
    "translate(+1,+1)": lambda x: _translate(x, 1, 1),
    "mirror+translate(-1,-1)": lambda x: _translate(_mirror(x), -1, -1),
    "mirror+translate(+1,+1)": lambda x: _translate(_mirror(x), 1, 1),
}
TTA_POLICY_VIEWS = {policy: tuple(view for view, _ in pairs) for policy, pairs in TTA_POLICY_WEIGHTS.items()}


def with_tta(predict, policy="flip"):
    """Test-time augmentation: a weighted average of the predictions over the views of `policy`.

    `flip` averages each image and its mirror: CIFAR-10's classes are
    mirror-symmetric and the models train with random flips, so this is a free
    ensemble of two views, and its prediction is the same for an image and its
    mirror. `flip_translate` adds the image and its mirror moved by one pixel
    up-left and down-right (reflected borders): six views, each weighted alike.
    These two average probabilities.

    `flip_translate_weighted` (airbench94's) weighs the same six views 0.25
    for the image and its mirror and 0.125 for each moved view, and averages
    log-probabilities: it returns `softmax(sum_v w_v * log p_v)`. Since
    `log p_v = logits_v - logsumexp(logits_v)` and the weights sum to 1, that is
    `softmax(sum_v w_v * logits_v)` exactly: the prediction of the averaged
    logits (what airbench averages), computed from the probabilities every
    predictor here returns. `none` returns `predict` itself.

    Args:
        predict: `predict(uint8 images) -> probabilities`.
        policy: str. A key of `TTA_POLICY_WEIGHTS`. Defaults to `"flip"`.

    Returns:
        A function of the same signature, returning probabilities.
    """
    if policy not in TTA_POLICY_WEIGHTS:
        raise ValueError(f"Unknown test-time augmentation {policy!r}. Use one of: {', '.join(TTA_POLICY_WEIGHTS)}.")
    pairs = TTA_POLICY_WEIGHTS[policy]
    if len(pairs) == 1:
        return predict
    log_averaged = policy in TTA_LOG_AVERAGED

    def predict_tta(images):
        images = np.asarray(images)
        outputs = [np.asarray(predict(np.ascontiguousarray(TTA_VIEWS[view](images)))) for view, _ in pairs]
        if not log_averaged:
            return sum(weight * p for (_, weight), p in zip(pairs, outputs))
        # A probability of 0 (an underflowed softmax) counts as the smallest positive float32.
        tiny = np.finfo("float32").tiny
        total = sum(weight * np.log(np.maximum(p.astype("float64"), tiny)) for (_, weight), p in zip(pairs, outputs))
        total = np.exp(total - total.max(axis=-1, keepdims=True))
        return (total / total.sum(axis=-1, keepdims=True)).astype(outputs[0].dtype)

    return predict_tta


def _described(predict, class_names, image_shape):
    """`predict` with the model's `class_names` and `image_shape` `(height, width, 3)` as attributes."""
    predict.class_names = tuple(class_names)
    predict.image_shape = tuple(image_shape)
    return predict


def load_predictor(path, batch_size=256):
    """Returns `predict(uint8 images N x H x W x 3) -> float32 probabilities N x classes`.

    `path` is a `.keras` file (normalised here with `contract.normalize`),
    an exported SavedModel directory, or an exported `.onnx`, `.tflite` or
    OpenVINO `.xml` file (or the version folder holding one), run by its own
    runtime (`nfnet_keras.runtimes`); the exports normalise inside their graphs.
    The function's `class_names` and `image_shape` attributes say what the
    model classifies (the names a `.keras` file, a SavedModel or an export's
    `class_names.txt` carries) and the images it takes (its input's size:
    `(32, 32, 3)` for CIFAR-10).
    """
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise InputError(f"--model {path}: no such file.")
        import keras

        from nfnet_keras import load_framework

        load_framework()  # registers the package's layers with Keras

        if not zipfile.is_zipfile(path):
            raise InputError(f"--model {path} is not a loadable .keras model (not a zip archive); pass the "
                             "model.keras that fit writes in its run directory.")
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"--model {path} is not a loadable .keras model ({reason}).") from e
        names = read_class_names(path) or default_class_names(model.output_shape[-1])
        return _described(keras_predictor(model, batch_size), names, model.input_shape[1:])
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _saved_model_predictor(path, batch_size)
    from nfnet_keras import runtimes

    if runtimes.format_of(path)[0] is not None:
        return runtimes.load_runtime(path, batch_size=batch_size)  # its image_shape and class_names: the export's
    raise InputError(
        f"--model {path} is neither a .keras file, a SavedModel directory (a folder with saved_model.pb, e.g. "
        "saved_models/nfnet/1) nor an exported .onnx, .tflite or OpenVINO .xml model."
    )


def _saved_model_predictor(path, batch_size):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if SIGNATURE not in loaded.signatures:
        raise InputError(f"--model {path} has no {SIGNATURE} signature.")
    signature = loaded.signatures[SIGNATURE]
    image_shape = tuple(signature.structured_input_signature[1][INPUT].shape[1:])
    names = read_class_names_file(os.path.join(path, "assets", CLASS_NAMES_ASSET))

    def predict(images):
        out = [signature(**{INPUT: tf.constant(images[i:i + batch_size])})[PROBABILITIES].numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(predict.class_names)), np.float32)

    count = signature.structured_outputs[PROBABILITIES].shape[-1]
    return _described(predict, names or default_class_names(count), image_shape)


def read_images(path, flag="--images", image_shape=IMAGE_SHAPE):
    """Reads images to classify: a `.npy` uint8 array N x H x W x 3, an image file, or a folder.

    Args:
        path: str. The `.npy` file, image file or folder.
        flag: str. How the user gave `path`, named in the error messages
            (`"--images"`; `""` for a positional argument). Defaults to `"--images"`.
        image_shape: tuple. The model's `(height, width, 3)`: a `.npy` must
            have it, image files are resized to it. Defaults to `IMAGE_SHAPE`.

    Returns:
        `(names, images)`: one name per image (the file name, or the row index
        of a `.npy`) and a uint8 array N x H x W x 3. Image files of another
        size are resized to H x W.
    """
    given = f"{flag} {path}" if flag else path
    if not os.path.exists(path):
        raise InputError(f"{given}: no such file or folder.")
    if path.endswith(".npy"):
        try:
            images = np.load(path, allow_pickle=False)
        except Exception as e:
            raise InputError(f"{given} is not a readable .npy array ({e}).") from e
        return [str(i) for i in range(len(images))], check_images(images, path, shape=image_shape)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise InputError(f"{given}: no .png/.jpg/.jpeg files in the folder.")
        files = [os.path.join(path, f) for f in files]
    elif path.lower().endswith(IMAGE_EXTENSIONS):
        files = [path]
    else:
        raise InputError(f"{given}: expected a .npy array, a .png/.jpg file or a folder of them.")
    import tensorflow as tf

    images = []
    for f in files:
        try:
            image = tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
        except tf.errors.OpError as e:
            raise InputError(f"{f} is not a readable PNG/JPEG image.") from e
        if None not in image_shape[:2] and tuple(image.shape[:2]) != tuple(image_shape[:2]):
            resized = tf.image.resize(image, image_shape[:2], antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        images.append(image.numpy())
    return [os.path.basename(f) for f in files], np.stack(images)
