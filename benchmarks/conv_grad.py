"""A conv's filter gradient: TensorFlow's op against the tap matmuls of `WSConv2D`, per map size and width.

`nfnet_keras.layers.wsconv.conv2d` takes the filter gradient of a stride-1
conv as one matmul per kernel tap (`tap_matmul_filter_gradient`) where
`uses_tap_matmul` says so: a low-precision conv on small maps with many
channels. This benchmark measures the two on the shapes of the speed networks
(3x3 convs, `same` padding), interleaved in one process, and prints which one
is faster and whether the rule picks it.

Usage:
    python -m benchmarks.conv_grad [--batch-size 512] [--dtypes bfloat16,float32] [--repeats 5] [--steps 3]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

from benchmarks import common  # noqa: E402

# (positions per side, channels in, channels out): cifar_speed's convs, cifar_speed_wide's, and more.
SHAPES = [(31, 24, 64), (15, 64, 64), (15, 64, 256), (15, 128, 384), (11, 256, 256), (8, 64, 64),
          (8, 256, 256), (7, 256, 256), (7, 384, 384), (4, 256, 256), (3, 256, 256), (3, 384, 384)]
DEFAULTS = dict(batch_size=512, dtypes=["bfloat16", "float32"], repeats=5, steps=3, shapes=SHAPES)
SMOKE = dict(batch_size=4, dtypes=["bfloat16"], repeats=2, steps=1, shapes=[(4, 128, 128), (6, 8, 8)])


class FilterGradient:
    """One way of computing one shape's filter gradient, run `steps` times a window."""

    def __init__(self, tap_matmul, x, upstream, kernel_shape):
        import tensorflow as tf

        from nfnet_keras.layers.wsconv import tap_matmul_filter_gradient

        if tap_matmul:
            self.fn = tf.function(lambda: tap_matmul_filter_gradient(x, upstream, kernel_shape, "same"))
        else:
            self.fn = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=kernel_shape, out_backprop=upstream, strides=[1, 1, 1, 1], padding="SAME"))
        self.fn().numpy()  # trace

    def measure(self, steps):
        with common.Stopwatch() as sw:
            for _ in range(steps):
                self.fn().numpy()
        return sw.sample(steps)


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--batch-size", type=int, help="images per gradient (default 512)")
    parser.add_argument("--dtypes", type=common.str_list, help="bfloat16, float16 and/or float32")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    bad = [d for d in args.dtypes if d not in ("bfloat16", "float16", "float32")]
    if bad or args.batch_size < 1:
        raise SystemExit(f"--dtypes takes bfloat16, float16, float32 and --batch-size >= 1; got {args.dtypes} "
                         f"and {args.batch_size}.")
    import numpy as np
    import tensorflow as tf

    from nfnet_keras.layers.wsconv import uses_tap_matmul

    rows = []
    with common.benchmark_run("conv_grad", args) as payload:
        rng = np.random.default_rng(0)
        for dtype in args.dtypes:
            for side, c_in, c_out in args.shapes:
                common.log(args, f"{dtype} {side}x{side} {c_in}->{c_out} ...")
                x = tf.constant(rng.standard_normal((args.batch_size, side, side, c_in)), dtype)
                upstream = tf.constant(rng.standard_normal((args.batch_size, side, side, c_out)), dtype)
                kernel_shape = (3, 3, c_in, c_out)
                ways = {"tensorflow": FilterGradient(False, x, upstream, kernel_shape),
                        "tap_matmul": FilterGradient(True, x, upstream, kernel_shape)}
                samples = common.interleave({k: (lambda w=w: w.measure(args.steps)) for k, w in ways.items()},
                                            args.repeats)
                ms = {k: common.summarize([1e3 / r for r in common.rates(samples[k])], 4) for k in ways}
                ratio = common.paired_ratios(common.rates(samples["tensorflow"]), common.rates(samples["tap_matmul"]))
                chosen = uses_tap_matmul((None, side, side, c_in), kernel_shape, dtype)
                rows.append(dict(dtype=dtype, positions=f"{side}x{side}", c_in=c_in, c_out=c_out,
                                 tensorflow_ms=ms["tensorflow"], tap_matmul_ms=ms["tap_matmul"],
                                 tap_time_over_tensorflow=ratio, rule_takes_taps=chosen,
                                 rule_picks_faster=chosen == (ratio["median"] < 1)))
        payload.update(command="python -m benchmarks.conv_grad " + " ".join(sys.argv[1:] if argv is None else argv),
                       batch_size=args.batch_size, rows=rows)
    print(f"Filter gradient of a 3x3 'same' conv, batch {args.batch_size}, ms (median of {args.repeats} windows):")
    print(common.format_table([dict(
        dtype=r["dtype"], shape=f"{r['positions']} {r['c_in']}->{r['c_out']}", tf=r["tensorflow_ms"]["median"],
        taps=r["tap_matmul_ms"]["median"], ratio=r["tap_time_over_tensorflow"]["median"],
        rule="taps" if r["rule_takes_taps"] else "tensorflow", ok="yes" if r["rule_picks_faster"] else "no")
        for r in rows],
        [("dtype", "dtype"), ("shape", "map, channels"), ("tf", "TensorFlow ms"), ("taps", "tap matmuls ms"),
         ("ratio", "taps / TensorFlow"), ("rule", "uses_tap_matmul takes"), ("ok", "the faster one")]))
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
