"""One optimizer for the conv kernels, another for the rest (gains, biases, the classifier).

`split_kernels(kernel_optimizer, rest_optimizer)` is Keras' `MultiOptimizer`
with an `OptimizerMap` that sends every variable whose path ends in `kernel`,
except the classifier's (`CONV_KERNELS`, matched against the whole path), to
`kernel_optimizer`. In the NF networks of this package those are the
(weight-standardized) conv kernels; a 2-D hidden dense kernel would go there too.
"""

import keras

from nfnet_keras.optimizers.groups import HEAD_LAYER

# Every kernel but the classifier's, as the full-match pattern of an `OptimizerMap`.
CONV_KERNELS = rf"(?!{HEAD_LAYER}/).*kernel"


def split_kernels(kernel_optimizer, rest_optimizer):
    """A `keras.optimizers.MultiOptimizer`: the conv kernels to `kernel_optimizer`, the rest to `rest_optimizer`.

    Args:
        kernel_optimizer: a Keras optimizer for the conv kernels (e.g.
            `RenormSGD`, `ConvMuon`), not yet built.
        rest_optimizer: a Keras optimizer for everything else, not yet built.

    Returns:
        A `MultiOptimizer`; `.optimizers` is `[kernel_optimizer, rest_optimizer]`.
    """
    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(rest_optimizer, {CONV_KERNELS: kernel_optimizer})
    )
