"""`build_model(name)`: a preset name -> its family's builder, with no branches on the network.

`PRESETS` (`nfnet_keras.models.presets`) maps every name to a typed config
(`NFResNetConfig`, `ConvGroupsConfig`); `BUILDERS` maps each config type to its
family's builder. A new family adds a config type, its presets (in both
tables) and one `BUILDERS` entry.
"""

import numbers
import os

import keras

from nfnet_keras.layers import WSConv2D, check_norm_config, resolve_layer_class
from nfnet_keras.models.conv_groups import backbone as conv_groups_backbone
from nfnet_keras.models.conv_groups.presets import ConvGroupsConfig
from nfnet_keras.models.nf_resnet import backbone as nf_resnet_backbone
from nfnet_keras.models.nf_resnet.presets import NFResNetConfig
from nfnet_keras.models.presets import PRESETS, check_preset, resolve_config  # noqa: F401  (re-exported)
from nfnet_keras.models.transfer import POOLINGS, backbone, copy_weights

BUILDERS = {NFResNetConfig: nf_resnet_backbone.build, ConvGroupsConfig: conv_groups_backbone.build}
# `build_model` arguments that give a network's BatchNorm twin: BatchNorm -> activation where the
# Normalizer-Free network has its scaled activations, plain convolutions without biases.
BATCHNORM_TWIN = dict(conv_layer=keras.layers.Conv2D, norm_layer=keras.layers.BatchNormalization, conv_bias=False)


def load_weights_into(model, path):
    """Loads the weights of a `.keras` or `.weights.h5` file into `model` (the same network); returns `model`.

    E.g. the file `nfnet-convert` writes from timm's NFNet-F weights, into
    `build_model("nfnet_f0", num_classes=1000)`.

    Raises:
        ValueError: one line, if the file is missing, of another kind, or holds
            the weights of another network (other layers or shapes).
    """
    path = os.fspath(path)
    if not path.endswith((".keras", ".weights.h5")):
        raise ValueError(f"Weights file {path!r} must be a .keras or .weights.h5 file.")
    if not os.path.isfile(path):
        raise ValueError(f"Weights file {path!r} does not exist.")
    try:
        model.load_weights(path)
    except Exception as e:  # Keras' errors on another network, made one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Weights file {path!r} does not fit model {model.name!r}: {reason}") from e
    return model


def build_model(preset="report_resnet", num_classes=10, input_shape=(32, 32, 3), *, conv_layer=WSConv2D,
                norm_layer=None, norm_config=None, name=None, weights=None, include_top=True, pooling="avg",
                **overrides):
    """Builds a network from a preset: an NF-ResNet (NFNets included) or the CIFAR speed network.

    The model takes normalised float images (see `nfnet_keras.preprocess`) and
    returns logits.

    The layer classes it is made of are arguments, so that a twin of the same
    network is one argument away: `conv_layer=keras.layers.Conv2D` gives the
    network without weight standardization, and `**BATCHNORM_TWIN`
    (`conv_layer=keras.layers.Conv2D`, `norm_layer=keras.layers.BatchNormalization`,
    `conv_bias=False`) its BatchNorm twin: each scaled activation becomes
    `BatchNorm -> activation`, and the blocks are the family's normalized blocks
    (`PreActBottleneck`, `NormConvGroup`), with no alpha, `1 / beta` or skip gain.

    Args:
        preset: str. A key of `nfnet_keras.PRESETS`. Defaults to `"report_resnet"`.
        num_classes: int. Number of classes. Defaults to `10`.
        input_shape: tuple of 3 ints. `(height, width, channels)`; height and
            width may be `None`. Defaults to `(32, 32, 3)`.
        conv_layer: class or str. A `keras.layers.Conv2D` subclass (or its
            registered name) for every convolution. Defaults to `WSConv2D`.
        norm_layer: class, str or None. `None` for the Normalizer-Free network;
            a normalization layer class (or its registered name) for the
            normalized twin. Defaults to `None`.
        norm_config: dict or None. Keyword arguments of `norm_layer`, saved with
            the model, e.g. `{"momentum": 0.4, "epsilon": 1e-5}` for a BatchNorm
            with faster moving statistics. Only with `norm_layer`. Defaults to
            `None` (the layer's defaults).
        name: str or None. The model's name. Defaults to the preset name.
        weights: str, path or None. A `.keras` or `.weights.h5` file of the same
            network to load (see `load_weights_into`), e.g. one `nfnet-convert`
            wrote from timm's NFNet-F weights. With `include_top=False`: a
            `.keras` file of the same network with any head, whose body weights
            are copied (`models.transfer.copy_weights`). Defaults to `None`
            (initialised).
        include_top: bool. False: the backbone, the network without its head
            (`models.transfer.backbone`), for transfer learning. Defaults to `True`.
        pooling: `"avg"`, `"max"` or None. With `include_top=False`: the global
            pooling of the last feature map (None: the map itself). Defaults to `"avg"`.
        **overrides: config fields to replace, e.g. `depths=(2, 2, 2)`.

    Returns:
        A `keras.Model`.

    Example:

    >>> model = build_model("tiny")
    >>> model.output_shape
    (None, 10)
    >>> bn_twin = build_model("tiny", **BATCHNORM_TWIN)
    >>> build_model("tiny", include_top=False).output_shape
    (None, 32)
    """
    config = resolve_config(preset, overrides)
    if not (isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool) and num_classes > 0):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of 'avg', 'max' or None, got {pooling!r}.")
    conv_layer = resolve_layer_class(conv_layer, keras.layers.Conv2D, "conv_layer")
    if norm_layer is not None:
        norm_layer = resolve_layer_class(norm_layer, keras.layers.Layer, "norm_layer")
    norm_config = check_norm_config(norm_config)
    if norm_config and norm_layer is None:
        raise ValueError(f"norm_config {norm_config!r} needs a norm_layer (e.g. **BATCHNORM_TWIN); the "
                         "Normalizer-Free network has no normalization layer.")
    model = BUILDERS[type(config)](config, num_classes, input_shape, conv_layer=conv_layer, norm_layer=norm_layer,
                                   norm_config=norm_config or None, name=preset if name is None else name)
    if include_top:
        return model if weights is None else load_weights_into(model, weights)
    features = backbone(model, pooling, name=model.name)
    if weights is not None:
        copy_weights(features, weights)
    return features
