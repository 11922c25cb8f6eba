"""Signal-propagation measurements (Brock et al. 2021, arXiv 2101.08692, Section 3)."""

import keras
from keras import ops

from nfnet_keras.models.signal_block import signal_blocks


def _stats(x):
    x = ops.cast(x, "float32")
    mean = ops.mean(x, axis=(0, 1, 2))  # per channel, over batch and space
    var = ops.var(x, axis=(0, 1, 2))
    # convert_to_numpy: a plain float() of a PyTorch tensor that carries a gradient warns.
    return (float(ops.convert_to_numpy(ops.mean(ops.square(mean)))),
            float(ops.convert_to_numpy(ops.mean(var))))


def signal_propagation(model, images):
    """Measures per-block signal statistics of `model` on a batch of `images`.

    For each block (each `SignalBlock`: an `NFBlock`, a `ConvGroup`, their
    normalized twins), in order, it reports, in inference mode:
    `avg_sq_mean`, the average over channels of the squared channel mean of the
    block's output; `avg_var`, the average channel variance of the output;
    `residual_var`, the average channel variance of the residual branch
    `f(act(x) * gamma / beta)` before skip gain and alpha; and
    `expected_var`, the variance the tracking rule predicts for the output.

    Args:
        model: a model from `nfnet_keras.build_model`.
        images: float array `(batch, h, w, c)` of model inputs.

    Returns:
        A list of dicts, one per block, with the keys above and `block` (its name).
    """
    blocks = signal_blocks(model)
    if not blocks:
        raise ValueError(
            f"Model {model.name!r} has no blocks to measure: signal_propagation reads layers that "
            "subclass nfnet_keras.models.SignalBlock (NFBlock, ConvGroup, ...)."
        )
    probe = keras.Model(model.input, [b.input for b in blocks] + [blocks[-1].output])
    tensors = probe(images, training=False)
    inputs = tensors[: len(blocks)]
    outputs = inputs[1:] + [tensors[-1]]
    stats = []
    for block, x, y in zip(blocks, inputs, outputs):
        avg_sq_mean, avg_var = _stats(y)
        _, residual_var = _stats(block.residual_branch(x))
        stats.append(
            dict(
                block=block.name,
                avg_sq_mean=avg_sq_mean,
                avg_var=avg_var,
                residual_var=residual_var,
                expected_var=block.expected_output_var,
            )
        )
    return stats
