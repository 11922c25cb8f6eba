"""Nominal multiply-add counts of a model from `build_model` (convs and dense layers)."""

import keras

from nfnet_keras.blocks import NFBlock


def _conv_macs(conv, in_shape):
    """(macs, output shape) of a Conv2D on an input `(h, w, c)`."""
    h, w, c = in_shape
    sh, sw = conv.strides
    if conv.padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
    else:
        kh, kw = conv.kernel_size
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    kh, kw = conv.kernel_size
    macs = oh * ow * kh * kw * (c // conv.groups) * conv.filters
    return macs, (oh, ow, conv.filters)


def _block_macs(block, in_shape):
    macs, shape = _conv_macs(block.conv0, in_shape)
    for conv in (block.conv1, block.conv1b, block.conv2):
        m, shape = _conv_macs(conv, shape)
        macs += m
    if block.se is not None:
        c, hidden = block.filters, block.se.squeeze.units
        macs += 2 * c * hidden
    if block.shortcut_conv is not None:
        # After a pool the conv sees the output resolution; else it strides itself.
        conv_in = shape[:2] + (in_shape[2],) if block.pool is not None else in_shape
        m, _ = _conv_macs(block.shortcut_conv, conv_in)
        macs += m
    return macs, shape


def count_macs(model):
    """Returns the multiply-adds of one forward pass of one image through `model`.

    Counts every convolution and dense layer (element-wise ops, pooling and the
    weight standardization itself are not counted). Needs a fixed input size.
    """
    shape = tuple(model.input_shape[1:])
    if None in shape:
        raise ValueError("count_macs needs a model built with a fixed input_shape.")
    total = 0
    for layer in model.layers:
        if isinstance(layer, NFBlock):
            macs, shape = _block_macs(layer, shape)
        elif isinstance(layer, keras.layers.Conv2D):
            macs, shape = _conv_macs(layer, shape)
        elif isinstance(layer, keras.layers.Dense):
            macs = shape[-1] * layer.units
            shape = (layer.units,)
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            macs, shape = 0, (shape[-1],)
        else:
            macs = 0
        total += macs
    return total


def training_flops_per_image(model):
    """Nominal training FLOPs per image: 2 x multiply-adds x 3 (forward + backward)."""
    return 6 * count_macs(model)
