"""The speed network's builder: a typed config and its group factory -> a Functional model.

The shape of the BatchNorm CIFAR-10 speed runs (e.g. airbench94: a 2x2
patch-whitening stem, then three groups `conv3x3 -> max-pool -> BN -> GELU ->
conv3x3 -> BN -> GELU` of widths 64/256/256, max-pool, a linear head with
scaled logits), built Normalizer-Free: weight-standardized convolutions and
scaled activations where the BatchNorms were, and the whitening stem giving
the first group unit-variance input. `parts` chooses `ConvGroup` or its twin
`NormConvGroup` once; `conv_groups` never asks which.
"""

import functools

import keras

from nfnet_keras.layers import PatchWhitening, ScaledActivation
from nfnet_keras.models.conv_groups.conv_group import ConvGroup, NormConvGroup


def parts(config, conv_layer, norm_layer=None, norm_config=None):
    """The group factory of a network of `config`: `ConvGroup`s, or a normalized twin's `NormConvGroup`s
    (`norm_config`: the keyword arguments of their `norm_layer`)."""
    if norm_layer is None:
        return functools.partial(ConvGroup, conv_layer=conv_layer,
                                 conv_config=None if config.center_filters else {"center": False})
    if not config.center_filters:
        raise ValueError("center_filters=False sets the WS convs of the network without normalization; its "
                         "normalized twin (--norm batch, norm_layer) has plain convs: drop one of the two.")
    return functools.partial(NormConvGroup, norm_layer=norm_layer, conv_layer=conv_layer, norm_config=norm_config)


def conv_groups(config, num_classes, input_shape, *, make_group, name):
    """The Functional speed network of `config`, its groups made by `make_group`."""
    c = config
    inputs = keras.Input(input_shape, name="image")
    x = PatchWhitening(c.whitening_patch, c.whitening_epsilon, name="stem_whitening")(inputs)
    # No normalization after the stem in either network (a constant gamma changes nothing before BN).
    x = ScaledActivation(c.activation, name="stem_act")(x)
    for stage, width in enumerate(c.widths, start=1):
        x = make_group(width, c.activation, pool_size=2, use_bias=c.conv_bias, name=f"stage{stage}_group")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    if c.dropout:
        x = keras.layers.Dropout(c.dropout, name="dropout")(x)
    x = keras.layers.Dense(num_classes, use_bias=False, dtype="float32", name="classifier")(x)
    outputs = keras.layers.Rescaling(c.logit_scale, dtype="float32", name="logit_scale")(x)
    return keras.Model(inputs, outputs, name=name)


def build(config, num_classes, input_shape, *, conv_layer, norm_layer, norm_config=None, name):
    """`conv_groups` with the groups `parts` chooses: the family's entry in the model registry."""
    return conv_groups(config, num_classes, input_shape,
                       make_group=parts(config, conv_layer, norm_layer, norm_config), name=name)
