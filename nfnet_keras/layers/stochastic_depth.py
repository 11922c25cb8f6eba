"""Stochastic depth: dropping whole residual branches while training."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="nfnet_keras")
class StochasticDepth(keras.layers.Layer):
    """Drops a whole residual branch per example while training (Huang et al. 2016).

    Kept branches are scaled by `1 / (1 - rate)`; at inference it is the identity.

    Args:
        rate: float in [0, 1). Probability of dropping the branch. Defaults to `0`.
        seed: int or None. Seed of the drop mask.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"StochasticDepth rate must be in [0, 1), got {rate!r}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        mask = ops.floor(keep + noise)
        return inputs * mask / keep

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config
