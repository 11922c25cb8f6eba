"""Twins of a preset for the speed comparisons: the BatchNorm ResNet and NF without WS or biases.

Every twin is `build_model(preset, ...)` with other layer classes or preset keys
(`TWINS`):

- `nf`: the package's Normalizer-Free network.
- `bn`: the BatchNorm pre-activation ResNet of the same convolutions:
  `conv_layer=keras.layers.Conv2D`, `norm_layer=keras.layers.BatchNormalization`,
  `conv_bias=False`. Plain convolutions with the same kernels, widths,
  strides, groups and shortcuts; every scaled activation becomes BatchNorm ->
  plain activation (no gamma), so each block is `BN -> act -> 1x1 -> BN -> act ->
  3x3 (strided) -> BN -> act -> 3x3 -> BN -> act -> 1x1` and returns
  `shortcut + f(x)`, with no alpha/beta scaling and no skip gain; a BN +
  activation before the pooled head where the NF model has its head activation.
- `nf_plain_conv`: the NF network with `conv_layer=PlainConv2D`, a conv with
  bias and no standardization or gain that folds the block's scalars into its
  kernel as `WSConv2D` does: the difference in speed between it and `nf` is
  the cost of weight standardization.
- `nf_no_bias`: the NF network with `conv_bias=False` (the BN twin's
  convolutions have no bias either): the difference is the cost of the conv
  biases' gradients.

`python -m benchmarks.bn_baseline` prints the four side by side (parameters,
MACs, conv kernel shapes) and checks that the convolutions are the same.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from benchmarks import common  # noqa: E402
from nfnet_keras.layers import WSConv2D  # noqa: E402
from nfnet_keras.models import BATCHNORM_TWIN, build_model, count_macs, model_convs  # noqa: E402


@keras.saving.register_keras_serializable(package="nfnet_benchmarks")
class PlainConv2D(WSConv2D):
    """A `WSConv2D` without standardization or gain: a plain conv that folds scales (benchmarks only).

    `layer(x, input_scale=a, output_scale=s)` equals `Conv2D(x * a) * s`, with
    `a` and `s` multiplied into the kernel and bias as `WSConv2D` does, so
    that the block around it does the same work as around a `WSConv2D`.
    """

    def build(self, input_shape):
        keras.layers.Conv2D.build(self, tuple(input_shape))

    def standardized_kernel(self, kernel=None, scale=None):
        kernel = self._kernel if kernel is None else kernel
        return kernel if scale is None else kernel * keras.ops.cast(scale, kernel.dtype)

    def _own_variables(self):
        return [self._kernel] + ([self.bias] if self.use_bias else [])


# variant -> (build_model arguments, suffix of the model's name)
TWINS = {
    "nf": (dict(), ""),
    "bn": (BATCHNORM_TWIN, "_bn"),
    "nf_plain_conv": (dict(conv_layer=PlainConv2D), "_plain_conv"),
    "nf_no_bias": (dict(conv_bias=False), "_no_bias"),
}
VARIANTS = tuple(TWINS)


def build_variant(variant, preset="report_resnet", **kwargs):
    """Builds twin `variant` (a key of `TWINS`) of `preset`.

    Args:
        variant: str. `nf`, `bn`, `nf_plain_conv` or `nf_no_bias`.
        preset: str. A preset name or alias. Defaults to `"report_resnet"`.
        **kwargs: further `build_model` arguments (`num_classes`, `input_shape`,
            preset overrides).

    Returns:
        A `keras.Model` named `<preset><suffix>`, e.g. `report_resnet_bn`.
    """
    if variant not in TWINS:
        raise ValueError(f"Unknown variant {variant!r}. Use one of: {', '.join(VARIANTS)}.")
    twin_args, suffix = TWINS[variant]
    return build_model(preset, **{"name": preset + suffix, **twin_args, **kwargs})


def build_bn_model(preset="report_resnet", **kwargs):
    """The BatchNorm pre-activation ResNet with the convolutions of `build_model(preset)`."""
    return build_variant("bn", preset, **kwargs)


def conv_kernel_shapes(model):
    """The kernel shapes of every convolution, in order (NF blocks looked into)."""
    return [tuple(conv.kernel.shape) for conv in model_convs(model)]


def describe(preset):
    """Rows comparing the variants of `preset`, and whether their convs agree."""
    models = {variant: build_variant(variant, preset) for variant in VARIANTS}
    shapes = {variant: sorted(conv_kernel_shapes(m)) for variant, m in models.items()}
    return [
        dict(
            variant=variant,
            model=model.name,
            params=model.count_params(),
            convs=len(shapes[variant]),
            macs=count_macs(model),
            same_convs_as_nf=shapes[variant] == shapes["nf"],
            layers=len(model.layers),
        )
        for variant, model in models.items()
    ]


def main(argv=None):
    parser = common.base_parser(__doc__)
    args = common.resolve_args(parser.parse_args(argv), dict(preset="report_resnet"), dict(preset="tiny"))
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
