"""`fold_for_inference(model)`: the same network as plain Keras layers, every constant folded into a kernel.

A trained model of this package standardizes each `WSConv2D` kernel on every
call and multiplies in scalars (each scaled activation's gamma, an NFBlock's
`1 / beta` and `alpha * skip_gain`, the speed network's logit scale): work
that is the same for every image. The inference twin does it once:

* a `WSConv2D` becomes a plain `keras.layers.Conv2D` whose kernel is
  `standardized_kernel()` times every scalar that multiplies its input or
  output (its bias times the output scalars);
* a scaled activation's gamma goes into the next linear layer's kernel (a conv,
  the classifier through a global pooling, which commutes with a positive scale);
* a BatchNorm twin's BatchNorm that directly follows a conv (`conv -> BN -> act`)
  goes into that conv's kernel and bias; one after a max-pool too when every
  channel's BN scale is positive (a max-pool commutes with a positive per-channel
  affine map, not with a negative one).

What cannot fold stays, as a plain `keras.layers.BatchNormalization` in
inference mode: a pre-activation BatchNorm whose input is a residual sum (every
block of the BatchNorm NF-ResNet twin but a stage's first, and its head
BatchNorm without a final conv) feeds an activation before any conv and, through
the identity shortcut, the sum itself; a max-pooled BN with a negative scale.

The twin is a new Functional graph of stock Keras layers and `keras.ops`
(activations, channel splits of grouped convs), not of this package's blocks
with a plain conv class: it loads, exports and converts (ONNX, LiteRT,
OpenVINO) without `nfnet_keras` registered, and its graph has no
standardization, no scalar multiplies and no dead branches (dropout, stochastic
depth). A grouped conv is one plain conv per group on a channel slice,
concatenated, as `WSConv2D` runs it: Keras' own grouped `Conv2D` is
XLA-compiled under TensorFlow, which TF Serving refuses.
"""

import keras
import numpy as np

from nfnet_keras.layers.activations import ACTIVATIONS, ScaledActivation
from nfnet_keras.layers.norm_activation import NormActivation
from nfnet_keras.layers.whitening import PatchWhitening
from nfnet_keras.layers.wsconv import WSConv2D
from nfnet_keras.models.conv_groups.conv_group import ConvGroup, NormConvGroup
from nfnet_keras.models.nf_resnet.blocks import NFBlock, PreActBottleneck


class _Linear:
    """A conv or dense layer not yet added to the graph: its float64 weights can still absorb constants."""

    def __init__(self, inputs, kernel, bias, name, **conv_args):
        self.inputs, self.kernel, self.bias, self.name = inputs, kernel, bias, name
        self.conv_args = conv_args  # empty for a dense layer

    def scale_output(self, scale, shift=None):
        """Makes the layer compute `scale * out + shift` (scalars or per-output-channel vectors)."""
        self.kernel = self.kernel * scale
        if self.bias is not None:
            self.bias = self.bias * scale
        if shift is not None:
            self.bias = np.broadcast_to((0.0 if self.bias is None else self.bias) + shift, self.kernel.shape[-1:])

    def build(self):
        """Adds the layer to the graph and returns its output tensor."""
        use_bias = self.bias is not None
        weights = [self.kernel.astype("float32")] + ([self.bias.astype("float32")] if use_bias else [])
        if not self.conv_args:
            layer = keras.layers.Dense(self.kernel.shape[-1], use_bias=use_bias, name=self.name)
            layer.build((None, self.kernel.shape[0]))
            layer.set_weights(weights)
            return layer(self.inputs)
        groups = self.conv_args.pop("groups", 1)
        filters = self.kernel.shape[-1]
        per_group = filters // groups
        xs = [self.inputs] if groups == 1 else keras.ops.split(self.inputs, groups, axis=-1)
        outs = []
        for g, x in enumerate(xs):
            part = slice(g * per_group, (g + 1) * per_group)
            name = self.name if groups == 1 else f"{self.name}_g{g}"
            layer = keras.layers.Conv2D(per_group, self.kernel.shape[:2], use_bias=use_bias, name=name,
                                        **self.conv_args)
            layer.build(tuple(x.shape))
            layer.set_weights([weights[0][..., part]] + ([weights[1][part]] if use_bias else []))
            outs.append(layer(x))
        return outs[0] if groups == 1 else keras.ops.concatenate(outs, axis=-1)


class _Signal:
    """A value of the graph being built: `tensor * scale`, the tensor possibly a `_Linear` not yet built.

    The pending `scale` (a positive scalar) and a pending `_Linear` let the next
    layer take constants into its own weights instead of a pass over the
    feature maps.
    """

    def __init__(self, tensor, scale=1.0):
        self.tensor, self.scale = tensor, float(scale)

    @property
    def pending(self):
        return isinstance(self.tensor, _Linear)

    def unscaled(self):
        """The tensor without the pending scale (the caller takes `self.scale` over)."""
        if self.pending:
            self.tensor = self.tensor.build()
        return self.tensor

    def value(self):
        """The tensor with the scale applied: folded into a pending layer, else one multiply."""
        if self.pending and self.scale != 1.0:
            self.tensor.scale_output(self.scale)
            self.scale = 1.0
        tensor = self.unscaled()
        if self.scale != 1.0:
            tensor = keras.layers.Rescaling(self.scale)(tensor)
            self.tensor, self.scale = tensor, 1.0
        return tensor


def _array(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype="float64")


def _conv_kernel(conv):
    """The kernel `conv` convolves with (standardized and gained for a `WSConv2D`), float64."""
    if isinstance(conv, WSConv2D):
        kernel = _array(conv._kernel)
        if conv.center:
            kernel = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
        squares = np.square(kernel).sum(axis=(0, 1, 2), keepdims=True)
        return kernel / np.sqrt(np.maximum(squares, conv.eps)) * _array(conv.gain)
    return _array(conv.kernel)


def _conv(conv, signal, input_scale=1.0, output_scale=1.0, prefix=""):
    """`conv(signal * input_scale) * output_scale` as a pending plain conv named `prefix + conv.name`."""
    if conv.activation not in (None, keras.activations.linear):
        raise ValueError(f"fold_for_inference cannot fold conv {conv.name!r} with a built-in activation.")
    scale = signal.scale * input_scale
    bias = _array(conv.bias) * output_scale if conv.use_bias else None
    inputs = signal.unscaled()
    return _Linear(inputs, _conv_kernel(conv) * scale * output_scale, bias, prefix + conv.name, strides=conv.strides,
                   padding=conv.padding, dilation_rate=conv.dilation_rate, groups=conv.groups)


def _bn_affine(norm):
    """`(scale, shift)` of a BatchNormalization in inference mode, per channel (float64)."""
    if not isinstance(norm, keras.layers.BatchNormalization) or norm.axis not in (-1, 3):
        raise ValueError(f"fold_for_inference folds BatchNormalization over the last axis only, got {norm.name!r}.")
    gamma = _array(norm.gamma) if norm.scale else 1.0
    beta = _array(norm.beta) if norm.center else 0.0
    scale = gamma / np.sqrt(_array(norm.moving_variance) + norm.epsilon)
    return scale, beta - _array(norm.moving_mean) * scale


def _norm(norm, signal, name, fold=True):
    """`norm(signal)`: into the pending conv before it where `fold`, else a plain BatchNormalization."""
    if fold and signal.pending:
        scale, shift = _bn_affine(norm)
        signal.tensor.scale_output(scale * signal.scale, shift)
        signal.scale = 1.0
        return _Signal(signal.value())
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=norm.epsilon, center=norm.center, scale=norm.scale,
                                            name=name)
    x = signal.value()
    layer.build(tuple(x.shape))
    layer.set_weights(norm.get_weights())
    return _Signal(layer(x))


def _act(name, signal_or_tensor, gamma=1.0):
    """The plain activation `name` of a value; `gamma` stays pending on the result."""
    x = signal_or_tensor.value() if isinstance(signal_or_tensor, _Signal) else signal_or_tensor
    return _Signal(ACTIVATIONS[name](x), gamma)


def _norm_act(layer, signal, fold=True, prefix=""):
    """A `NormActivation` (BN -> activation) or `ScaledActivation` (activation, gamma pending)."""
    if isinstance(layer, NormActivation):
        return _act(layer.activation, _norm(layer.norm, signal, f"{prefix}{layer.name}_norm", fold))
    return _act(layer.activation, signal, layer.gamma)


def _squeeze_excite(se, x, input_scale, prefix):
    """`x` gated by a squeeze-excite, where `x = c * y` is `input_scale` times the SE's own input `y`.

    `SqueezeExcite(y) = 2 * sigmoid(mlp(mean(y))) * y`, and the block scales
    it further; with the factor 2 and that scale folded into the conv before
    (`c`), the gated output is `sigmoid(mlp(mean(x) / c)) * x`: the squeeze
    kernel takes `1 / c`, the excite kernel the activation's gamma. `c = 0`
    makes `x` zero and the output zero whatever the gate.
    """
    squeeze_kernel = _array(se.squeeze.kernel) / (input_scale if input_scale else 1.0)
    pooled = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_se_pool")(x)
    h = _Linear(pooled, squeeze_kernel, _array(se.squeeze.bias), f"{prefix}_se_squeeze").build()
    h = ACTIVATIONS[se.act.activation](h)
    g = _Linear(h, _array(se.excite.kernel) * se.act.gamma, _array(se.excite.bias), f"{prefix}_se_excite").build()
    g = keras.layers.Reshape((1, 1, g.shape[-1]), name=f"{prefix}_se_gate")(keras.ops.sigmoid(g))
    return keras.layers.Multiply(name=f"{prefix}_se_scale")([x, g])


def _nf_block(block, signal):
    pre = f"{block.name}_"
    x = signal.value()  # the shortcut and the activation both need it
    a = _act(block.activation, x)
    in_scale = block.act0.gamma / block.beta
    if block.transition:
        s = _Signal(a.unscaled())
        if block.pool is not None:
            s = _Signal(_pool(block.pool, s.tensor, f"{block.name}_shortcut_pool"))
        shortcut = _Signal(_conv(block.shortcut_conv, s, in_scale, prefix=pre)).value()
    else:
        shortcut = x
    skip = float(keras.ops.convert_to_numpy(block.skip_gain)) * block.alpha
    out = _Signal(_conv(block.conv0, a, in_scale, prefix=pre))
    for act, conv in ((block.act1, block.conv1), (block.act2, block.conv1b)):
        out = _Signal(_conv(conv, _act(act.activation, out), act.gamma, prefix=pre))
    factor = skip if block.se is None else 2.0 * skip
    out = _Signal(_conv(block.conv2, _act(block.act3.activation, out), block.act3.gamma, factor, prefix=pre)).value()
    if block.se is not None:
        out = _squeeze_excite(block.se, out, factor, block.name)
    return _Signal(keras.layers.Add(name=f"{block.name}_add")([shortcut, out]))


def _preact_block(block, signal):
    pre = f"{block.name}_"
    if block.transition:  # the input feeds only the BN: it folds into a conv before it
        a = _norm_act(block.act0, signal, prefix=pre)
        s = _Signal(a.value())
        if block.pool is not None:
            s = _Signal(_pool(block.pool, s.tensor, f"{block.name}_shortcut_pool"))
        shortcut = _Signal(_conv(block.shortcut_conv, s, prefix=pre)).value()
    else:  # the input is the shortcut too: the BN stays
        shortcut = signal.value()
        a = _norm_act(block.act0, _Signal(shortcut), fold=False, prefix=pre)
    out = _Signal(_conv(block.conv0, a, prefix=pre))
    for act, conv in ((block.act1, block.conv1), (block.act2, block.conv1b)):
        out = _Signal(_conv(conv, _norm_act(act, out, prefix=pre), prefix=pre))
    factor = 1.0 if block.se is None else 2.0
    out = _Signal(_conv(block.conv2, _norm_act(block.act3, out, prefix=pre), output_scale=factor, prefix=pre)).value()
    if block.se is not None:
        out = _squeeze_excite(block.se, out, factor, block.name)
    return _Signal(keras.layers.Add(name=f"{block.name}_add")([shortcut, out]))


def _pool(pool, x, name):
    cls = type(pool)
    return cls(pool.pool_size, pool.strides, padding=pool.padding, name=name)(x)


def _conv_group(group, signal):
    pre = f"{group.name}_"
    out = _Signal(_conv(group.conv1, signal, prefix=pre))
    if isinstance(group, NormConvGroup):
        scale, _ = _bn_affine(group.act1.norm)
        positive = bool(np.all(scale > 0))  # a max-pool commutes with a positive per-channel affine map only
        if positive:
            out = _Signal(_norm(group.act1.norm, out, f"{group.name}_act1_norm").value())
        if group.pool is not None:
            out = _Signal(_pool(group.pool, out.value(), f"{group.name}_pool"))
        if not positive:
            out = _norm(group.act1.norm, out, f"{group.name}_act1_norm", fold=False)
        out = _act(group.activation, out)
    else:
        if group.pool is not None:
            out = _Signal(_pool(group.pool, out.value(), f"{group.name}_pool"))
        out = _act(group.activation, out, group.act1.gamma)
    out = _Signal(_conv(group.conv2, out, prefix=pre))
    return _norm_act(group.act2, out, prefix=pre)


def _whitening(stem, signal):
    return _Signal(_Linear(signal.unscaled(), _array(stem.kernel) * signal.scale, _array(stem.bias), stem.name,
                           strides=1, padding="valid"))


def _dense(dense, signal):
    if dense.activation not in (None, keras.activations.linear):
        raise ValueError(f"fold_for_inference cannot fold dense layer {dense.name!r} with an activation.")
    bias = _array(dense.bias) if dense.use_bias else None
    return _Signal(_Linear(signal.unscaled(), _array(dense.kernel) * signal.scale, bias, dense.name))


def _global_pool(layer, signal):
    # Mean and max commute with a positive scalar: the scale stays pending past the pooling.
    if signal.scale <= 0:
        return _Signal(type(layer)(keepdims=layer.keepdims, name=layer.name)(signal.value()))
    return _Signal(type(layer)(keepdims=layer.keepdims, name=layer.name)(signal.unscaled()), signal.scale)


def _rescaling(layer, signal):
    if np.any(np.asarray(layer.offset)) or np.ndim(layer.scale) or not layer.scale > 0:
        return _Signal(keras.layers.Rescaling(layer.scale, layer.offset, name=layer.name)(signal.value()))
    return _Signal(signal.tensor, signal.scale * float(layer.scale))


def _layer_handler(layer):
    handlers = (
        (NFBlock, _nf_block),
        (PreActBottleneck, _preact_block),
        (ConvGroup, _conv_group),  # NormConvGroup too
        (PatchWhitening, _whitening),
        (keras.layers.Conv2D, lambda layer, s: _Signal(_conv(layer, s))),
        ((ScaledActivation, NormActivation), lambda layer, s: _norm_act(layer, s)),
        ((keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D), _global_pool),
        (keras.layers.Dense, _dense),
        (keras.layers.Rescaling, _rescaling),
        ((keras.layers.Dropout, keras.layers.InputLayer), lambda layer, s: s),
    )
    for cls, handler in handlers:
        if isinstance(layer, cls):
            return handler
    raise ValueError(
        f"fold_for_inference does not know layer {layer.name!r} ({type(layer).__name__}); it folds the "
        "networks of nfnet_keras.models.registry.build_model."
    )


def _chain(model):
    """The model's layers in order, checking that each takes the previous one's output only."""
    if not isinstance(model, keras.Model) or not hasattr(model, "_operations") or len(model.inputs) != 1:
        raise ValueError(
            f"fold_for_inference takes a single-input Functional model of build_model, got {type(model).__name__}."
        )
    layers = model.layers
    for prev, layer in zip(layers, layers[1:]):
        node = layer._inbound_nodes[0]
        parents = [t._keras_history.operation for t in node.input_tensors]
        if len(layer._inbound_nodes) != 1 or parents != [prev]:
            raise ValueError(
                f"fold_for_inference folds chains of layers (as build_model makes); layer {layer.name!r} "
                f"does not take the output of {prev.name!r} alone."
            )
    return layers


def fold_for_inference(model):
    """The inference twin of `model`: plain Keras layers, every constant folded in.

    Args:
        model: keras.Model. A network of `build_model` (an NF-ResNet, the
            speed network, or either's BatchNorm twin), built, with any
            weights. Mixed-precision models give a float32 twin.

    Returns:
        A new Functional `keras.Model` (named `<model.name>_folded`) of stock
        Keras layers and `keras.ops` that computes the same logits as
        `model(x, training=False)` (to float32 rounding), without weight
        standardization: `WSConv2D` kernels become plain `Conv2D` kernels with
        gains and every scalar folded in, BatchNorms after convs fold into
        them, dropout and stochastic depth are gone. Input and output shapes
        are `model`'s; the input is named `image`.

    Raises:
        ValueError: a model not made by `build_model` (not a chain of its
            layers), or a layer the folding does not know.

    Example:

    >>> folded = fold_for_inference(build_model("tiny"))
    >>> any(isinstance(layer, WSConv2D) for layer in folded.layers)
    False
    """
    layers = _chain(model)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # the twin computes in float32 whatever the model did
    try:
        inputs = keras.Input(tuple(model.input_shape[1:]), name="image", dtype="float32")
        signal = _Signal(inputs)
        for layer in layers[1:]:
            signal = _layer_handler(layer)(layer, signal)
        return keras.Model(inputs, signal.value(), name=f"{model.name}_folded")
    finally:
        keras.mixed_precision.set_global_policy(policy)
