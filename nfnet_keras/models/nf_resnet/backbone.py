"""The NF-ResNet family's builder: a typed config and the parts it is made of -> a Functional model.

`nf_resnet` lays out the network from three factories (convolution,
activation, block) and never asks which network it builds; `parts` chooses the
factories once: the Normalizer-Free ones (`ScaledActivation`, `NFBlock`
tracking the expected variance), or a normalized twin's (`NormActivation`,
`PreActBottleneck`).
"""

import functools

import keras

from nfnet_keras.layers import NormActivation, ScaledActivation
from nfnet_keras.models.nf_resnet.blocks import NFBlock, PreActBottleneck


class _NFBlocks:
    """Makes a backbone's NFBlocks in order, passing each the variance the one before predicts."""

    def __init__(self, config, conv_layer):
        self.config, self.conv_layer = config, conv_layer
        self.expected_var = 1.0  # the stem's output has unit variance for unit-variance input

    def __call__(self, filters, **kwargs):
        c = self.config
        block = NFBlock(filters, expected_var=self.expected_var, alpha=c.alpha, skip_gain_init=c.skip_gain_init,
                        beta=c.beta, conv_layer=self.conv_layer, **kwargs)
        self.expected_var = block.expected_output_var
        return block


def parts(config, conv_layer, norm_layer=None, norm_config=None):
    """The factories of a network of `config`: `(make_conv, make_activation, make_block)`.

    Args:
        config: NFResNetConfig.
        conv_layer: a `keras.layers.Conv2D` subclass for every convolution.
        norm_layer: None for the Normalizer-Free network, else the normalization
            layer class of its twin.
        norm_config: dict or None. Keyword arguments of `norm_layer`.
    """
    c = config

    def make_conv(filters, kernel_size, name, **kwargs):
        return conv_layer(filters, kernel_size, use_bias=c.conv_bias, kernel_initializer="he_normal", name=name,
                          **kwargs)

    if norm_layer is None:
        return make_conv, functools.partial(ScaledActivation, c.activation), _NFBlocks(c, conv_layer)
    make_block = functools.partial(PreActBottleneck, norm_layer=norm_layer, conv_layer=conv_layer,
                                   norm_config=norm_config)
    return make_conv, functools.partial(NormActivation, norm_layer, c.activation, norm_config), make_block


def nf_resnet(config, num_classes, input_shape, *, make_conv, make_activation, make_block, name):
    """The Functional model of `config` made of the given parts (see `parts`).

    Layers are named `stem_conv1`, `stage2_block3`, ..., `classifier`; the
    classifier is initialised N(0, 0.01) and computes in float32.
    """
    c = config
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, (width, stride) in enumerate(zip(c.stem_widths, c.stem_strides)):
        if i:
            x = make_activation(name=f"stem_act{i}")(x)
        x = make_conv(width, 3, f"stem_conv{i + 1}", strides=stride, padding="same")(x)

    total_blocks, index = sum(c.depths), 0
    for stage, (width, depth, stride) in enumerate(zip(c.widths, c.depths, c.strides)):
        for j in range(depth):
            x = make_block(
                width, strides=stride if j == 0 else 1, transition=j == 0, bottleneck_ratio=c.bottleneck_ratio,
                group_width=c.group_width, activation=c.activation, se_ratio=c.se_ratio, se_activation=c.se_activation,
                stochastic_depth_rate=c.stochastic_depth_rate * index / total_blocks,
                shortcut_pool=c.shortcut_pool, use_bias=c.conv_bias, name=f"stage{stage + 1}_block{j + 1}",
            )(x)
            index += 1

    if c.final_conv_multiplier:
        x = make_conv(c.final_conv_width, 1, "final_conv")(x)
    if c.head_activation:
        x = make_activation(name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if c.dropout:
        x = keras.layers.Dropout(c.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
        dtype="float32",  # logits in float32 under a mixed-precision policy
        name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def build(config, num_classes, input_shape, *, conv_layer, norm_layer, norm_config=None, name):
    """`nf_resnet` with the parts `parts` chooses: the family's entry in the model registry."""
    make_conv, make_activation, make_block = parts(config, conv_layer, norm_layer, norm_config)
    return nf_resnet(config, num_classes, input_shape, make_conv=make_conv, make_activation=make_activation,
                     make_block=make_block, name=name)
