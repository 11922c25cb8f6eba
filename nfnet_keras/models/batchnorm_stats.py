"""BatchNorm moving statistics recomputed for a model's current weights.

A BatchNormalization layer's moving mean and variance follow the weights it
was trained with. When a model is evaluated with other weights, an
exponential moving average of them (`--ema`) for instance, those statistics
no longer describe the activations the layer sees: the larger the distance
between the two sets of weights, the worse. `recompute_batchnorm_statistics`
runs images through the model in training mode and sets each layer's
statistics to the exact mean and (biased, as Keras keeps it) variance of its
inputs over all of them, PyTorch's `torch.optim.swa_utils.update_bn` for
Keras, with the variance pooled over the images rather than averaged over
batches.
"""

import keras
import numpy as np


def batchnorm_layers(model):
    """The model's trainable `keras.layers.BatchNormalization` layers, nested ones included, in call order.

    A frozen BatchNorm (`trainable = False`) uses its moving statistics in
    training mode too and never updates them; it is left out.
    """
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def recompute_batchnorm_statistics(model, images, batch_size):
    """Sets every trainable BatchNorm layer's moving statistics to their values over `images`.

    The images go through `model(batch, training=True)` in batches of
    `batch_size`; each layer's moving mean becomes the mean of its input over
    all images and positions, and its moving variance the variance over the
    same (pooled across batches, so a smaller last batch counts for what it
    holds). The weights do not change, and neither do the layers' momenta
    (set to 0 for the passes, then restored). Other layers that act in
    training mode (dropout, stochastic depth) act so during the passes, as in
    PyTorch's `update_bn`.

    Args:
        model: keras.Model.
        images: float array `(N, H, W, C)`, preprocessed as the model's
            training inputs are.
        batch_size: int. Images per forward pass.

    Returns:
        The number of layers updated (0 for a model without BatchNorm).

    Raises:
        ValueError: no images, or `batch_size < 1`.
    """
    if len(images) == 0 or batch_size < 1:
        raise ValueError(f"Recomputing BatchNorm statistics needs images and a batch size >= 1, got {len(images)} "
                         f"images and batch size {batch_size}.")
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    # Per layer: sum over batches of n * mean and n * (variance + mean**2), in float64.
    sums = [[0.0, 0.0] for _ in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # the moving statistics become the batch's own
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            model(batch, training=True)
            n = len(batch)
            for layer_sums, (mean, var) in zip(sums, batchnorm_statistics(model), strict=True):
                mean, var = mean.astype(np.float64), var.astype(np.float64)
                layer_sums[0] += n * mean
                layer_sums[1] += n * (var + mean ** 2)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    total = len(images)
    pooled = []
    for (sum_mean, sum_square), layer in zip(sums, layers):
        mean = sum_mean / total
        var = np.maximum(sum_square / total - mean ** 2, 0.0)
        pooled.append((mean.astype(layer.moving_mean.dtype), var.astype(layer.moving_variance.dtype)))
    set_batchnorm_statistics(model, pooled)
    return len(layers)


def batchnorm_statistics(model):
    """`[(moving_mean, moving_variance), ...]` of `batchnorm_layers(model)`, as NumPy copies."""
    return [(keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance))
            for layer in batchnorm_layers(model)]


def set_batchnorm_statistics(model, statistics):
    """Assigns `statistics` (from `batchnorm_statistics`) back to `batchnorm_layers(model)`."""
    for layer, (mean, var) in zip(batchnorm_layers(model), statistics, strict=True):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(var)
