"""`SignalBlock`: what a network's blocks declare for the signal-propagation tools.

`signal_propagation`, the TensorBoard signal plot, `count_macs` and
`model_convs` read a model block by block. Every block of every network family
(the NF-ResNets' bottlenecks, the speed network's conv groups, and their
BatchNorm twins) subclasses `SignalBlock` and says, in the same terms, what it
computes and what variance it expects.
"""

import keras


class SignalBlock(keras.layers.Layer):
    """A block the signal-propagation tools can measure.

    A subclass sets, once built or constructed:

    - `expected_var`: float or None. The variance the block expects at its
      input (None: no prediction, e.g. a normalized block).
    - `expected_output_var`: float or None. What the variance-tracking rule
      predicts for its output with every gain at 1.
    - `skip_gain`: a scalar variable, or None for a block without one.
    - `transition`: bool. Whether the block starts a stage (its output's
      expected variance restarts).

    and implements `residual_branch`, `conv_sublayers` and `macs`.
    `output_var_for(input_var)` predicts the output variance with the current
    gains; a block without a tracking rule keeps the default (None).
    """

    expected_var = None
    expected_output_var = None
    skip_gain = None
    transition = False

    def residual_branch(self, inputs):
        """The block's residual branch on `inputs` in inference mode, before any skip gain.

        A block without a skip path returns its whole output.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement SignalBlock.residual_branch.")

    def conv_sublayers(self):
        """The block's convolutions in order (needs a built block)."""
        raise NotImplementedError(f"{type(self).__name__} must implement SignalBlock.conv_sublayers.")

    def macs(self, input_shape):
        """`(multiply-adds, output_shape)` on one `(height, width, channels)` input (see `count_macs`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement SignalBlock.macs.")

    def output_var_for(self, input_var):
        """The output variance the tracking rule predicts for input variance `input_var`
        with the block's current gains, or None where the block has no such rule."""
        return None


def legacy_twin_message(saved_as, now):
    """The error for a BatchNorm twin saved by nfnet-keras 0.1, whose twin blocks were NF blocks with a
    `norm_layer`; their weights sit under another layer path than the twin blocks of today."""
    return (
        f"This .keras file was written by nfnet-keras 0.1: its BatchNorm twin's blocks are {saved_as}s with a "
        f"norm_layer, which are {now}s since nfnet-keras 0.2. Load it with nfnet-keras 0.1, or rebuild the twin "
        "(build_model(preset, **BATCHNORM_TWIN), or nfnet-fit --norm batch) and train it again."
    )


def signal_blocks(model):
    """The model's `SignalBlock`s in order."""
    return [layer for layer in model.layers if isinstance(layer, SignalBlock)]


def model_convs(model):
    """Every convolution of the model in order, those inside its blocks included."""
    convs = []
    for layer in model.layers:
        if isinstance(layer, SignalBlock):
            convs += layer.conv_sublayers()
        elif isinstance(layer, keras.layers.Conv2D):
            convs.append(layer)
    return convs


def adapt_model(model, images):
    """Adapts every layer of `model` that has an `adapt` method (the whitening stem) to `images`.

    Args:
        model: keras.Model.
        images: float array `(n, h, w, c)` of preprocessed training images.

    Returns:
        The names of the layers adapted.
    """
    adapted = []
    for layer in model.layers:
        if callable(getattr(layer, "adapt", None)):
            layer.adapt(images)
            adapted.append(layer.name)
    return adapted
