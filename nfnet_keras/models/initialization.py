"""Initialization of a built model's convolutions: identity (dirac) filters, as the CIFAR speed runs use."""

from keras import ops

from nfnet_keras.layers.initializers import dirac_mask
from nfnet_keras.models.signal_block import model_convs


def dirac_initialize(model):
    """Sets the identity part of every conv kernel of `model` (`PartialDirac`), in place.

    Every convolution of `model_convs(model)` (Keras
    `Conv2D`s, `WSConv2D`s included, and those inside blocks and conv groups)
    gets its identity filters (`dirac_mask`); its other filters keep their
    values (the conv's own initializer, He normal here). Skipped: a layer with
    an `adapt` method (the whitening stem, whose filters come from the data),
    and, in a model without one, the first conv (the stem conv on the RGB
    image). Call it on a built model before training (a resumed run then
    restores its checkpoint over it).

    Args:
        model: keras.Model. Built.

    Returns:
        The names (paths) of the kernels set.
    """
    convs = [conv for conv in model_convs(model) if not callable(getattr(conv, "adapt", None))]
    if convs and not any(callable(getattr(layer, "adapt", None)) for layer in model.layers):
        convs = convs[1:]
    names = []
    for conv in convs:
        kernel = conv.kernel
        mask, identity = dirac_mask(kernel.shape, conv.groups)
        kernel.assign(ops.where(mask, ops.cast(identity, kernel.dtype), kernel.value))
        names.append(kernel.path)
    return names
