"""Nominal multiply-add counts of a model from `build_model` (convs and dense layers)."""

import keras


def conv_macs(conv, input_shape):
    """Multiply-adds of a `keras.layers.Conv2D` (or subclass) on one input.

    Args:
        conv: a `keras.layers.Conv2D`, channels last.
        input_shape: tuple of 3 ints. `(height, width, channels)`, no batch axis.

    Returns:
        `(macs, output_shape)`, the output shape as `(height, width, filters)`.
    """
    h, w, c = input_shape
    sh, sw = conv.strides
    kh, kw = conv.kernel_size
    if conv.padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
    else:
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    macs = oh * ow * kh * kw * (c // conv.groups) * conv.filters
    return macs, (oh, ow, conv.filters)


def count_macs(model):
    """Returns the multiply-adds of one forward pass of one image through `model`.

    Walks the model's layers in order: a layer with a `macs(input_shape)`
    method (every `SignalBlock`) counts itself; convolutions and dense layers are
    counted here; every other layer counts 0 and keeps the shape (the
    activations, normalization, dropout), except global pooling, which drops
    the spatial axes. Element-wise ops, pooling and the weight standardization
    itself are not counted. Needs a fixed input size.

    Args:
        model: a `keras.Model` from `nfnet_keras.build_model`.

    Returns:
        int. Multiply-adds per image.

    Example:

    >>> count_macs(build_model("tiny"))
    1368384
    """
    shape = tuple(model.input_shape[1:])
    if None in shape:
        raise ValueError("count_macs needs a model built with a fixed input_shape.")
    total = 0
    for layer in model.layers:
        macs = 0
        if callable(getattr(layer, "macs", None)):
            macs, shape = layer.macs(shape)
        elif isinstance(layer, keras.layers.Conv2D):
            macs, shape = conv_macs(layer, shape)
        elif isinstance(layer, keras.layers.Dense):
            macs, shape = shape[-1] * layer.units, (layer.units,)
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            shape = (shape[-1],)
        total += macs
    return total


def training_flops_per_image(model):
    """Nominal training FLOPs per image: 2 x multiply-adds x 3 (forward + backward)."""
    return 6 * count_macs(model)
