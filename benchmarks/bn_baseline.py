"""Twins of a preset for the speed comparisons: the BatchNorm ResNet and NF without WS.

`build_bn_model(preset)` is the same network as `build_model(preset)` with
BatchNorm in place of the Normalizer-Free machinery: plain
`Conv2D(use_bias=False)` layers with the same kernels, widths, strides and
groups; pre-activation bottleneck blocks `BN -> act -> 1x1 -> BN -> act -> 3x3
(strided) -> BN -> act -> 3x3 -> BN -> act -> 1x1`; the same projection
shortcuts (2x2 average pool if strided, then a 1x1 conv, taken from the
block's activated input); the plain activation (no gamma), no alpha/beta
scaling and no skip gain; a BN + activation before the pooled head where the
NF model has its head activation.

`build_nf_plain_conv_model(preset)` is the NF network itself with every
`WSConv2D` replaced by a plain `Conv2D` (bias, no standardization, no gain): the
difference in speed between it and `build_model` is the cost of weight
standardization.

`build_nf_no_bias_model(preset)` is the NF network with bias-free `WSConv2D`s
(the BN twin's convolutions have no bias either): the difference is the cost
of the conv biases' gradients.

`python -m benchmarks.bn_baseline` prints the four side by side (parameters,
MACs, conv kernel shapes) and checks that the convolutions are the same.
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from benchmarks import common  # noqa: E402
from nfnet_keras import blocks as blocks_lib  # noqa: E402
from nfnet_keras import model as model_lib  # noqa: E402
from nfnet_keras.activations import ACTIVATIONS  # noqa: E402
from nfnet_keras.blocks import SqueezeExcite, StochasticDepth  # noqa: E402
from nfnet_keras.flops import count_macs  # noqa: E402
from nfnet_keras.model import build_model, resolve_config  # noqa: E402
from nfnet_keras.wsconv import WSConv2D  # noqa: E402

VARIANTS = ("nf", "bn", "nf_plain_conv", "nf_no_bias")


# === BatchNorm twin ===


def _bn_act(x, activation, name):
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation(ACTIVATIONS[activation], name=f"{name}_act")(x)


def _conv(filters, kernel_size, name, strides=1, groups=1):
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", groups=groups,
                               use_bias=False, kernel_initializer="he_normal", name=name)


def _bn_block(x, filters, strides, transition, config, drop_rate, name):
    width = max(1, int(round(filters * config["bottleneck_ratio"])))
    groups = 1 if config["group_width"] is None else width // config["group_width"]
    act = config["activation"]
    h = _bn_act(x, act, f"{name}_pre")
    shortcut = x
    if transition:
        s = h
        if strides > 1:
            s = keras.layers.AveragePooling2D(strides, strides, padding="same", name=f"{name}_pool")(h)
        shortcut = _conv(filters, 1, f"{name}_shortcut_conv")(s)
    out = _conv(width, 1, f"{name}_conv0")(h)
    out = _conv(width, 3, f"{name}_conv1", strides=strides, groups=groups)(_bn_act(out, act, f"{name}_1"))
    out = _conv(width, 3, f"{name}_conv1b", groups=groups)(_bn_act(out, act, f"{name}_2"))
    out = _conv(filters, 1, f"{name}_conv2")(_bn_act(out, act, f"{name}_3"))
    if config["se_ratio"] > 0:
        out = SqueezeExcite(config["se_ratio"], act, name=f"{name}_se")(out)
    if drop_rate > 0:
        out = StochasticDepth(drop_rate, name=f"{name}_drop_path")(out)
    return keras.layers.Add(name=f"{name}_add")([shortcut, out])


def build_bn_model(preset="seed", num_classes=10, input_shape=(32, 32, 3), **overrides):
    """The BatchNorm pre-activation ResNet with the shapes of `build_model(preset)`.

    Args:
        preset: str. A key of `nfnet_keras.PRESETS`. Defaults to `"seed"`.
        num_classes: int. Defaults to `10`.
        input_shape: tuple of 3 ints. Defaults to `(32, 32, 3)`.
        **overrides: preset keys to replace, as for `build_model`.

    Returns:
        A `keras.Model` named `<preset>_bn`.
    """
    config = resolve_config(preset, overrides)
    act = config["activation"]

    # === Functional Model ===
    inputs = keras.Input(tuple(input_shape), name="image")
    x = inputs
    for i, (width, stride) in enumerate(zip(config["stem_widths"], config["stem_strides"])):
        if i:
            x = _bn_act(x, act, f"stem_{i}")
        x = _conv(width, 3, f"stem_conv{i + 1}", strides=stride)(x)
    total_blocks = sum(config["depths"])
    index = 0
    for stage, (width, depth, stride) in enumerate(zip(config["widths"], config["depths"], config["strides"])):
        for j in range(depth):
            x = _bn_block(x, width, stride if j == 0 else 1, j == 0, config,
                          config["stochastic_depth_rate"] * index / total_blocks, f"stage{stage + 1}_block{j + 1}")
            index += 1
    if config["final_conv_multiplier"]:
        x = _conv(int(config["widths"][-1] * config["final_conv_multiplier"]), 1, "final_conv")(x)
    if config["head_activation"]:
        x = _bn_act(x, act, "final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if config["dropout"]:
        x = keras.layers.Dropout(config["dropout"], name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                                 dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name=f"{preset}_bn")


# === NF without weight standardization ===


class PlainConv2D(WSConv2D):
    """A `WSConv2D` that is a plain `Conv2D`: no standardization, no gain (benchmarks only)."""

    def build(self, input_shape):
        keras.layers.Conv2D.build(self, tuple(input_shape))

    def standardized_kernel(self, kernel=None, scale=None):
        kernel = self._kernel if kernel is None else kernel
        return kernel if scale is None else kernel * keras.ops.cast(scale, kernel.dtype)


@contextlib.contextmanager
def _conv_class(cls):
    """Makes `build_model` (and the NFBlocks it builds) use `cls` for its convolutions."""
    saved = model_lib.WSConv2D, blocks_lib.WSConv2D
    model_lib.WSConv2D = blocks_lib.WSConv2D = cls
    try:
        yield
    finally:
        model_lib.WSConv2D, blocks_lib.WSConv2D = saved


def build_nf_plain_conv_model(preset="seed", num_classes=10, input_shape=(32, 32, 3), **overrides):
    """`build_model(preset)` with plain convolutions in place of every `WSConv2D`."""
    with _conv_class(PlainConv2D):
        model = build_model(preset, num_classes=num_classes, input_shape=input_shape, **overrides)
    return keras.Model(model.inputs, model.outputs, name=f"{preset}_plain_conv")


class NoBiasWSConv2D(WSConv2D):
    """A `WSConv2D` without bias (benchmarks only)."""

    def __init__(self, *args, **kwargs):
        kwargs["use_bias"] = False
        super().__init__(*args, **kwargs)


def build_nf_no_bias_model(preset="seed", num_classes=10, input_shape=(32, 32, 3), **overrides):
    """`build_model(preset)` with bias-free `WSConv2D`s, as the BN twin's convolutions.

    What the biases cost. (Added the Keras way, oneDNN fuses their gradient
    into `_MklNativeConv2DBackpropFilterWithBias`, about twice the plain filter
    gradient here; `WSConv2D` now computes it as a separate sum.)
    """
    with _conv_class(NoBiasWSConv2D):
        model = build_model(preset, num_classes=num_classes, input_shape=input_shape, **overrides)
    return keras.Model(model.inputs, model.outputs, name=f"{preset}_no_bias")


def build_variant(variant, preset="seed", **kwargs):
    """`nf` (the package's model), `bn` (the BatchNorm twin), `nf_plain_conv` or `nf_no_bias`."""
    builders = {"nf": build_model, "bn": build_bn_model, "nf_plain_conv": build_nf_plain_conv_model,
                "nf_no_bias": build_nf_no_bias_model}
    if variant not in builders:
        raise ValueError(f"Unknown variant {variant!r}. Use one of: {', '.join(VARIANTS)}.")
    return builders[variant](preset, **kwargs)


def conv_kernel_shapes(model):
    """The kernel shapes of every convolution, in order (NF blocks looked into)."""
    shapes = []
    for layer in model.layers:
        sub = [layer] if isinstance(layer, keras.layers.Conv2D) else [
            getattr(layer, n) for n in ("conv0", "conv1", "conv1b", "conv2", "shortcut_conv")
            if getattr(layer, n, None) is not None]
        shapes += [tuple(conv.kernel.shape) for conv in sub]
    return shapes


def describe(preset):
    """Rows comparing the three variants of `preset`, and whether their convs agree."""
    models = {variant: build_variant(variant, preset) for variant in VARIANTS}
    shapes = {variant: sorted(conv_kernel_shapes(m)) for variant, m in models.items()}
    return [
        dict(
            variant=variant,
            model=model.name,
            params=model.count_params(),
            convs=len(shapes[variant]),
            macs=_layerwise_macs(model) if variant == "bn" else count_macs(model),
            same_convs_as_nf=shapes[variant] == shapes["nf"],
            layers=len(model.layers),
        )
        for variant, model in models.items()
    ]


def _layerwise_macs(model):
    """Conv and dense multiply-adds of a model of plain layers (the BN twin is not a chain)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            kh, kw, cin, cout = layer.kernel.shape
            total += h * w * kh * kw * cin * cout
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


def main(argv=None):
    parser = common.base_parser(__doc__)
    args = common.resolve_args(parser.parse_args(argv), dict(preset="seed"), dict(preset="tiny"))
    with common.benchmark_run("bn_baseline", args) as payload:
        rows = describe(args.preset)
        payload.update(preset=args.preset, variants=rows,
                       all_convs_match=all(row["same_convs_as_nf"] for row in rows))
    print(f"Twins of preset {args.preset!r} (convolutions compared by kernel shape):")
    print(common.format_table(rows, [
        ("variant", "variant"), ("params", "parameters"), ("convs", "convs"), ("macs", "MACs / image"),
        ("same_convs_as_nf", "same convs as NF"), ("layers", "Keras layers")]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
