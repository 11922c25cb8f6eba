"""Squeeze-and-Excite channel gating, as NFNets use it."""

import keras
from keras import ops

from nfnet_keras.layers.activations import ScaledActivation, check_activation


@keras.saving.register_keras_serializable(package="nfnet_keras")
class SqueezeExcite(keras.layers.Layer):
    """Squeeze-and-Excite channel gating (Hu et al. 2018), as used in NFNets.

    Returns `2 * sigmoid(mlp(mean_hw(x))) * x`: the factor 2 keeps the signal's
    variance at initialisation, where the gates sit near 0.5.

    Args:
        ratio: float. Hidden width as a fraction of the channels. Defaults to `0.5`.
        activation: str. Hidden activation, a key of `GAMMAS`. Defaults to `"relu"`.
    """

    def __init__(self, ratio=0.5, activation="relu", **kwargs):
        super().__init__(**kwargs)
        if not 0 < ratio <= 1:
            raise ValueError(f"SqueezeExcite ratio must be in (0, 1], got {ratio!r}.")
        self.ratio = ratio
        self.activation = check_activation(activation)

    def build(self, input_shape):
        channels = tuple(input_shape)[-1]
        hidden = max(1, int(channels * self.ratio))
        policy = self.dtype_policy  # sublayers compute in the layer's own policy
        self.squeeze = keras.layers.Dense(hidden, name="squeeze", dtype=policy)
        self.act = ScaledActivation(self.activation, name="act", dtype=policy)
        self.excite = keras.layers.Dense(channels, name="excite", dtype=policy)
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def call(self, inputs):
        s = ops.mean(inputs, axis=(1, 2))
        s = self.excite(self.act(self.squeeze(s)))
        gate = ops.sigmoid(s)[:, None, None, :]
        return 2.0 * gate * inputs

    def macs(self, input_shape):
        """Multiply-adds of the two dense layers on one `(height, width, channels)` input.

        Returns:
            `(macs, output_shape)`; the output shape is the input shape.
        """
        if not self.built:
            raise ValueError(f"SqueezeExcite {self.name!r} must be built before counting its MACs.")
        return 2 * tuple(input_shape)[-1] * self.squeeze.units, tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(ratio=self.ratio, activation=self.activation)
        return config
