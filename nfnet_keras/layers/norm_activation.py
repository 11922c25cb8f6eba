"""`NormActivation`: a normalization layer, then the plain activation (the normalized twins' pre-activation).

`NormLayerMixin`: the `norm_layer` and `norm_config` that `NormActivation` and the twins' blocks hold, checked,
turned into `NormActivation`s and saved in one place.
"""

import keras

from nfnet_keras.layers.activations import activate, check_activation
from nfnet_keras.layers.layer_classes import layer_class_name, resolve_layer_class


class NormLayerMixin:
    """A layer's normalization layer class and its keyword arguments: checked, used and saved alike.

    A layer mixing it in (before its `keras.layers.Layer` base) calls
    `_set_norm(norm_layer, norm_config)` in its `__init__`, and its
    `get_config` then holds `norm_layer` and a non-empty `norm_config`.
    `NormActivation` uses just that. The BatchNorm twins' blocks
    (`NormConvGroup`, `PreActBottleneck`) also build each pre-activation with
    `_make_activation(name)`: a `NormActivation` of their `activation`
    attribute, which they must set.
    """

    def _set_norm(self, norm_layer, norm_config):
        self.norm_layer = resolve_layer_class(norm_layer, keras.layers.Layer, "norm_layer")
        self.norm_config = check_norm_config(norm_config)

    def _make_activation(self, name):
        return NormActivation(self.norm_layer, self.activation, self.norm_config, name=name, dtype=self.dtype_policy)

    def get_config(self):
        config = super().get_config()
        config.update(norm_layer=layer_class_name(self.norm_layer, "norm_layer"))
        if self.norm_config:
            config.update(norm_config=dict(self.norm_config))
        return config


@keras.saving.register_keras_serializable(package="nfnet_keras")
class NormActivation(NormLayerMixin, keras.layers.Layer):
    """A normalization layer followed by the plain activation (no gamma).

    The pre-activation of a normalized network, used where a Normalizer-Free
    network has its scaled activation: the BatchNorm twins' blocks
    (`PreActBottleneck`, `NormConvGroup`) and stems are made of it.

    Args:
        norm_layer: class or str. A `keras.layers.Layer` subclass, e.g.
            `keras.layers.BatchNormalization`, or its registered name. Defaults
            to `"BatchNormalization"`.
        activation: str. A key of `nfnet_keras.GAMMAS`. Defaults to `"relu"`.
        norm_config: dict or None. Keyword arguments of `norm_layer` (JSON
            values, saved with the layer), e.g. `{"momentum": 0.4}`. Defaults to
            `None` (its defaults).

    Example:

    >>> layer = NormActivation(keras.layers.BatchNormalization, "relu")
    >>> layer(keras.ops.ones((2, 4, 4, 8))).shape
    (2, 4, 4, 8)
    """

    def __init__(self, norm_layer="BatchNormalization", activation="relu", norm_config=None, **kwargs):
        super().__init__(**kwargs)
        self._set_norm(norm_layer, norm_config)
        self.activation = check_activation(activation)

    def build(self, input_shape):
        self.norm = self.norm_layer(name="norm", **self.norm_config)
        self.norm.build(tuple(input_shape))

    def call(self, inputs, training=None):
        return activate(self.activation, self.norm(inputs, training=training), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation)
        return config


def check_norm_config(norm_config):
    """`norm_config` as a dict (None: empty); ValueError unless it is a dict of keyword arguments."""
    if norm_config is None:
        return {}
    if not (isinstance(norm_config, dict) and all(isinstance(key, str) for key in norm_config)):
        raise ValueError(f"norm_config must be a dict of the norm layer's keyword arguments, got {norm_config!r}.")
    if "name" in norm_config:
        raise ValueError("norm_config cannot set the norm layer's name: it is always 'norm'.")
    return dict(norm_config)
