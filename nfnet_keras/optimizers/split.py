"""One optimizer for the conv kernels, another for the rest (gains, biases, the classifier).

`split_kernels(kernel_optimizer, rest_optimizer)` is Keras' `MultiOptimizer`
with an `OptimizerMap` that sends every variable whose path ends in `kernel`,
except the classifier's (`CONV_KERNELS`, matched against the whole path), to
`kernel_optimizer`. In the NF networks of this package those are the
(weight-standardized) conv kernels; a 2-D hidden dense kernel would go there too.

Keras 3.15's `MultiOptimizer.apply` refuses a gradient list shorter than the
variables it was built on ("Gradients must match trainable variables
one-to-one"), while every other Keras optimizer updates the subset it is given.
A layer frozen after the optimizer is built (`callbacks.FreezeAfterEpochs`,
`--whitening-bias-epochs`) then stops training. `SplitOptimizer` is the
`MultiOptimizer` that takes a subset, the one place this is worked around
(`tests/test_optimizers.py`).
"""

import keras

from nfnet_keras.optimizers.groups import HEAD_LAYER

# Every kernel but the classifier's, as the full-match pattern of an `OptimizerMap`.
CONV_KERNELS = rf"(?!{HEAD_LAYER}/).*kernel"


@keras.saving.register_keras_serializable(package="nfnet_keras")
class SplitOptimizer(keras.optimizers.MultiOptimizer):
    """Keras' `MultiOptimizer`, whose `apply` also takes gradients for a subset of its variables."""

    def apply(self, grads, trainable_variables=None):
        if not self.built or trainable_variables is None or len(grads) == len(self._trainable_variables_indices):
            return super().apply(grads, trainable_variables)
        grads, trainable_variables = list(grads), list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(f"Received {len(grads)} gradients for {len(trainable_variables)} variables.")
        by_optimizer = [[] for _ in self._inner_optimizers]
        for grad, variable in zip(grads, trainable_variables):
            by_optimizer[self._var_to_optimizer_idx[self._var_key(variable)]].append((grad, variable))
        for optimizer, pairs in zip(self._inner_optimizers, by_optimizer):
            if pairs:
                optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        self._iterations.assign_add(1)


def split_kernels(kernel_optimizer, rest_optimizer):
    """A `MultiOptimizer` (`SplitOptimizer`): the conv kernels to `kernel_optimizer`, the rest to `rest_optimizer`.

    Args:
        kernel_optimizer: a Keras optimizer for the conv kernels (e.g.
            `RenormSGD`, `ConvMuon`), not yet built.
        rest_optimizer: a Keras optimizer for everything else, not yet built.

    Returns:
        A `SplitOptimizer` (a `MultiOptimizer`); `.optimizers` is `[kernel_optimizer, rest_optimizer]`.
    """
    return SplitOptimizer(
        keras.optimizers.OptimizerMap(rest_optimizer, {CONV_KERNELS: kernel_optimizer})
    )
