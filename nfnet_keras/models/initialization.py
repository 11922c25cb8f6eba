"""Initialization of a built model's convolutions: identity (dirac) filters, as the CIFAR speed runs use, and
gains and biases set from data."""

import keras
import numpy as np
from keras import ops

from nfnet_keras.layers.initializers import dirac_mask
from nfnet_keras.models.signal_block import model_convs


def dirac_initialize(model):
    """Sets the identity part of every conv kernel of `model` (`PartialDirac`), in place.

    Every convolution of `model_convs(model)` (Keras
    `Conv2D`s, `WSConv2D`s included, and those inside blocks and conv groups)
    gets its identity filters (`dirac_mask`); its other filters keep their
    values (the conv's own initializer, He normal here). Skipped: a layer with
    an `adapt` method (the whitening stem, whose filters come from the data),
    and, in a model without one, the first conv (the stem conv on the RGB
    image). Call it on a built model before training (a resumed run then
    restores its checkpoint over it).

    Args:
        model: keras.Model. Built.

    Returns:
        The names (paths) of the kernels set.
    """
    convs = [conv for conv in model_convs(model) if not callable(getattr(conv, "adapt", None))]
    if convs and not any(callable(getattr(layer, "adapt", None)) for layer in model.layers):
        convs = convs[1:]
    names = []
    for conv in convs:
        kernel = conv.kernel
        mask, identity = dirac_mask(kernel.shape, conv.groups)
        kernel.assign(ops.where(mask, ops.cast(identity, kernel.dtype), kernel.value))
        names.append(kernel.path)
    return names


def channel_moments(fn, inputs, batch_size=256):
    """Per-channel mean and variance (float64 NumPy) of `fn(batch)` over `inputs`, every axis but the last pooled.

    `fn` runs on `batch_size` inputs at a time; the sums are taken in float64
    whatever the outputs' dtype.
    """
    count, total, squares = 0, 0.0, 0.0
    for start in range(0, len(inputs), batch_size):
        y = np.asarray(ops.convert_to_numpy(fn(ops.convert_to_tensor(inputs[start:start + batch_size]))), "float64")
        y = y.reshape(-1, y.shape[-1])
        count, total, squares = count + len(y), total + y.sum(0), squares + np.square(y).sum(0)
    mean = total / count
    return mean, np.maximum(squares / count - np.square(mean), 0.0)


def data_initialize(model, images, batch_size=256):
    """Data-dependent initialization: each layer with a `data_initialize` method standardizes its activations.

    In the order of `model.layers`, each such layer (`ConvGroup`) gets its
    inputs on `images` from the model as initialized so far and sets its
    convs' gains and biases so that every activation's input has mean 0 and
    variance 1 per channel on them (the data-dependent initialization of
    weight normalization, Salimans & Kingma 2016): a network without
    normalization starts with the signal a BatchNorm network has at its first
    step. Call it on a built model after its whitening stem is adapted.

    Args:
        model: keras.Model. A Functional model.
        images: array `(n, h, w, c)` of preprocessed images.
        batch_size: int. Images per forward pass.

    Returns:
        The paths of the gains set.

    Raises:
        ValueError: if no layer of `model` can be initialized from data.
    """
    layers = [layer for layer in model.layers if callable(getattr(layer, "data_initialize", None))]
    if not layers:
        raise ValueError(f"Model {model.name!r} has no layer initialized from data (the speed network's conv "
                         "groups without normalization have).")
    names = []
    for layer in layers:
        inputs = keras.Model(model.input, layer.input).predict(images, batch_size=batch_size, verbose=0)
        names += layer.data_initialize(inputs, batch_size)
    return names
