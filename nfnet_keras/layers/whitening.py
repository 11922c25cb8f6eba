"""`PatchWhitening`: a fixed convolution stem that whitens small image patches.

Its filters are the eigenvectors of the second-moment matrix of the `p x p`
patches of training images, each divided by the square root of its eigenvalue
(plus `epsilon`), and each used with both signs. Every output channel then has
unit second moment over the patches it was adapted on, whatever the share of
the image's energy its direction carries: the network's first layer starts
with the scale the Normalizer-Free blocks after it assume, where a
weight-standardized stem (zero-mean filters) would remove the smooth part of
a natural image that carries most of its variance. The filters are set by
`adapt()` and not trained; the bias trains.
"""

import keras
import numpy as np
from keras import ops


def _patch_vectors(images, patch_size):
    """`(n_patches, p * p * c)`: every `p x p` patch of `images`, flattened in (row, column, channel) order."""
    n, h, w, c = images.shape
    oh, ow = h - patch_size + 1, w - patch_size + 1
    views = [images[:, dy:dy + oh, dx:dx + ow, :] for dy in range(patch_size) for dx in range(patch_size)]
    return np.stack(views, axis=3).reshape(-1, patch_size * patch_size * c)


def whitening_filters(images, patch_size=2, epsilon=5e-4, chunk=1000):
    """The whitening filters of `images`' `p x p` patches.

    Args:
        images: float array `(n, h, w, c)`: model inputs (preprocessed images).
        patch_size: int. `p`. Defaults to `2`.
        epsilon: float. Added to each eigenvalue before its square root. Defaults to `5e-4`.
        chunk: int. Images per step of the second-moment accumulation (bounds memory).

    Returns:
        `(eigenvalues, kernel)`: the eigenvalues in decreasing order, shape `(k,)`
        with `k = p * p * c`, and the kernel `(p, p, c, 2k)`: the scaled
        eigenvectors, then the same negated.
    """
    images = np.asarray(images, dtype="float32")
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"adapt needs images of shape (n, height, width, channels), got {images.shape}.")
    if min(images.shape[1:3]) < patch_size:
        raise ValueError(f"images of size {images.shape[1:3]} are smaller than the {patch_size}x{patch_size} patches.")
    k = patch_size * patch_size * images.shape[-1]
    moment = np.zeros((k, k), dtype="float64")
    count = 0
    for start in range(0, len(images), chunk):
        patches = _patch_vectors(images[start:start + chunk], patch_size).astype("float64")
        moment += patches.T @ patches
        count += len(patches)
    moment /= count
    eigenvalues, eigenvectors = np.linalg.eigh(moment)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + epsilon)
    kernel = np.concatenate([filters, -filters], axis=1)
    return eigenvalues, kernel.reshape(patch_size, patch_size, images.shape[-1], 2 * k).astype("float32")


@keras.saving.register_keras_serializable(package="nfnet_keras")
class PatchWhitening(keras.layers.Layer):
    """A `p x p` valid convolution whose filters whiten the patches of the training images.

    Call `adapt(images)` with preprocessed training images before training, as
    with Keras' preprocessing layers: it sets the filters from the eigenvectors
    of the patches' second-moment matrix (`whitening_filters`). Before that the
    filters are the identity on each patch position (each output channel is one
    input pixel, with either sign). The filters are a non-trainable weight, so
    the adapted stem is saved with the model (`.keras`, checkpoints, the
    SavedModel); the bias trains.

    Output channels: `2 * p * p * channels` (24 for RGB 2x2 patches); the output
    is `p - 1` pixels smaller than the input (`"valid"` padding).

    Args:
        patch_size: int. `p`. Defaults to `2`.
        epsilon: float. Added to each eigenvalue; bounds the gain of the
            directions with little energy. Defaults to `5e-4`.
        **kwargs: Standard `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:

    >>> stem = PatchWhitening(2)
    >>> stem.adapt(np.random.default_rng(0).normal(size=(8, 32, 32, 3)))
    >>> stem(np.zeros((1, 32, 32, 3), "float32")).shape
    (1, 31, 31, 24)
    """

    def __init__(self, patch_size=2, epsilon=5e-4, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(patch_size, int) and patch_size >= 1):
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}.")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}.")
        self.patch_size, self.epsilon = patch_size, float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        k = self.patch_size * self.patch_size * channels
        identity = np.eye(k, dtype="float32")
        initial = np.concatenate([identity, -identity], axis=1)
        initial = initial.reshape(self.patch_size, self.patch_size, channels, 2 * k)
        self.kernel = self.add_weight(
            name="kernel", shape=initial.shape, initializer=keras.initializers.Constant(initial), trainable=False
        )
        self.bias = self.add_weight(name="bias", shape=(2 * k,), initializer="zeros", trainable=True)
        self.eigenvalues = self.add_weight(name="eigenvalues", shape=(k,), initializer="ones", trainable=False)

    @property
    def filters(self):
        return 2 * self.patch_size * self.patch_size * self.kernel.shape[2]

    def adapt(self, images, max_images=5000):
        """Sets the filters from the patches of `images` (at most `max_images` of them).

        Args:
            images: float array `(n, h, w, c)` of model inputs (preprocessed
                training images), or an iterable of such batches (e.g. a
                `tf.data.Dataset` of images).
            max_images: int. The first `max_images` images are used. Defaults to `5000`.
        """
        if not hasattr(images, "shape"):
            batches, seen = [], 0
            for batch in images:
                batch = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch)
                batches.append(batch)
                seen += len(batch)
                if seen >= max_images:
                    break
            if not batches:
                raise ValueError("adapt got no images.")
            images = np.concatenate(batches)
        images = np.asarray(images, dtype="float32")[:max_images]
        if not self.built:
            self.build(images.shape)
        if images.ndim != 4 or images.shape[-1] != self.kernel.shape[2]:
            raise ValueError(
                f"adapt needs images of shape (n, height, width, {self.kernel.shape[2]}), got {images.shape}."
            )
        eigenvalues, kernel = whitening_filters(images, self.patch_size, self.epsilon)
        self.kernel.assign(kernel)
        self.eigenvalues.assign(eigenvalues.astype("float32"))

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        outputs = ops.conv(inputs, kernel, strides=1, padding="valid")
        return outputs + ops.cast(self.bias, outputs.dtype)

    def compute_output_shape(self, input_shape):
        shrink = lambda n: None if n is None else n - self.patch_size + 1
        return (input_shape[0], shrink(input_shape[1]), shrink(input_shape[2]), self.filters)

    def macs(self, input_shape):
        """`(multiply-adds, output_shape)` on one input `(height, width, channels)` (see `count_macs`)."""
        h, w, c = input_shape
        oh, ow = h - self.patch_size + 1, w - self.patch_size + 1
        return oh * ow * self.patch_size * self.patch_size * c * self.filters, (oh, ow, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, epsilon=self.epsilon)
        return config
