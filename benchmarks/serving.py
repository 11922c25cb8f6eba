"""Serving: the exported SavedModel's batch-1 latency and batch-256 throughput.

Builds `build_model(preset)` (untrained: speed does not depend on the weights)
or loads `--model`, exports it with `nfnet_keras.export.export_saved_model`,
loads the SavedModel with `tf.saved_model.load` and calls its
`serving_default` signature in-process on uint8 images, outputs fetched to
NumPy (no RPC or JSON cost). Interleaved in each round (ABC, CBA, ...):

- latency: `--latency-calls` batch-1 calls, each timed; p50 and p99 (ms);
- throughput: `--steps` calls at each of `--batch-sizes`; images/s;
- training: `--steps` Keras train steps of the same network at
  `--train-batch-size` (SGD momentum 0.9, no XLA, one in-memory batch); images/s.

Reported: min / median over `--repeats` rounds, and the serving/training
throughput ratio per round. Targets (perf issue): p50 <= 10 ms; batch-256
throughput >= 3x training throughput. Writes `benchmarks/results/serving.json`
and prints it.

Usage:
    python -m benchmarks.serving [--preset report_resnet] [--model PATH.keras] [--repeats 5] [--no-fold] [--smoke]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import nfnet_keras  # noqa: E402
from benchmarks import common  # noqa: E402
from nfnet_keras.export import export_saved_model  # noqa: E402

P50_TARGET_MS = 10.0
THROUGHPUT_TARGET_RATIO = 3.0
DEFAULTS = dict(preset="report_resnet", batch_sizes=[256], repeats=5, steps=4, warmup=2,
                latency_calls=200, train_batch_size=64)
SMOKE = dict(preset="tiny", batch_sizes=[16], repeats=2, steps=2, warmup=0,
             latency_calls=10, train_batch_size=8)


def _images(count):
    """CIFAR-10 test images if `load_cifar10` finds them, else random pixels (same speed)."""
    from nfnet_keras.data import DataError, load_cifar10

    try:
        (_, _), (x_test, _) = load_cifar10()
        return np.resize(x_test, (count,) + x_test.shape[1:]), "cifar10 test images"
    except DataError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), "random uint8 pixels"


class SignatureTimer:
    """Times calls of a loaded `serving_default` signature."""

    def __init__(self, signature, images):
        self.signature = signature
        self.images = images

    def call(self, x):
        self.signature(image=x)["probabilities"].numpy()

    def latency(self, calls):
        """(p50, p99) in ms of `calls` batch-1 calls."""
        times = []
        for i in range(calls):
            x = tf.constant(self.images[i % len(self.images)][None])
            start = time.perf_counter()
            self.call(x)
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.percentile(times, 50)), 1e3 * float(np.percentile(times, 99))

    def images_per_second(self, batch_size, calls):
        x = tf.constant(np.resize(self.images, (batch_size,) + self.images.shape[1:]))
        with common.Stopwatch() as sw:
            for _ in range(calls):
                self.call(x)
        return batch_size * calls / sw.seconds


def measure(model, args, images):
    """Interleaved latency, serving throughput and training throughput of `model`."""
    with tempfile.TemporaryDirectory() as base:
        path = export_saved_model(model, "bench", base_dir=base, fold=args.fold)
        loaded = tf.saved_model.load(path)  # keeps its own copy of the weights
    timer = SignatureTimer(loaded.signatures["serving_default"], images)
    keras.utils.set_random_seed(0)
    trainee = common.compile_for_benchmark(keras.models.clone_model(model), jit_compile=False)
    x, y = common.synthetic_batch(args.train_batch_size)
    trainer = common.TrainStepper(trainee, iter(common.repeated_batch_dataset(x, y)), args.train_batch_size)
    trainer.warm_up(args.warmup)

    measures = {"latency": lambda: timer.latency(args.latency_calls)}
    for b in args.batch_sizes:
        measures[f"serving_{b}"] = lambda b=b: timer.images_per_second(b, args.steps)
    measures["training"] = lambda: trainer.measure(args.steps)["rate"]
    values = common.interleave(measures, args.repeats)

    p50 = [v[0] for v in values["latency"]]
    result = {
        "params": int(model.count_params()),
        "macs_per_image": int(nfnet_keras.count_macs(model)),
        "latency_batch1_ms": {
            "p50": common.summarize(p50, 3),
            "p99": common.summarize([v[1] for v in values["latency"]], 3),
        },
        "serving_images_per_s": {str(b): common.summarize(values[f"serving_{b}"], 1) for b in args.batch_sizes},
        "training_images_per_s": common.summarize(values["training"], 1),
        "training_batch_size": args.train_batch_size,
        "serving_over_training": {
            str(b): common.paired_ratios(values[f"serving_{b}"], values["training"]) for b in args.batch_sizes
        },
    }
    largest = str(max(args.batch_sizes))
    result["targets"] = {"p50_ms": P50_TARGET_MS, f"serving_{largest}_over_training": THROUGHPUT_TARGET_RATIO}
    result["targets_met"] = {
        "p50": result["latency_batch1_ms"]["p50"]["median"] <= P50_TARGET_MS,
        "throughput": result["serving_over_training"][largest]["median"] >= THROUGHPUT_TARGET_RATIO,
    }
    common.release(trainee)
    return result


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--model", help="benchmark this .keras model instead of an untrained preset")
    parser.add_argument("--latency-calls", type=int, help="batch-1 calls per round (default 200)")
    parser.add_argument("--train-batch-size", type=int, help="training batch size (default 64, fit's)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="export the model as trained (nfnet-export --no-fold), not its folded inference twin")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    for flag in ("latency_calls", "train_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1.")
    if args.model and not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file.")

    with common.benchmark_run("serving", args) as payload:
        images, source = _images(max(args.latency_calls, *args.batch_sizes))
        keras.utils.set_random_seed(0)
        if args.model:
            model = keras.saving.load_model(args.model, compile=False)
        else:
            model = nfnet_keras.build_model(args.preset)
        common.log(args, f"{args.model or args.preset}: exporting, loading, measuring ...")
        result = measure(model, args, images)
        payload.update(model=args.model, preset=None if args.model else args.preset, images=source, **result)

    largest = str(max(args.batch_sizes))
    rows = [dict(
        model=args.model or args.preset,
        p50=f"{result['latency_batch1_ms']['p50']['min']:.2f} / {result['latency_batch1_ms']['p50']['median']:.2f}",
        p99=f"{result['latency_batch1_ms']['p99']['min']:.2f} / {result['latency_batch1_ms']['p99']['median']:.2f}",
        serve=f"{result['serving_images_per_s'][largest]['min']:.0f} / "
              f"{result['serving_images_per_s'][largest]['median']:.0f}",
        train=f"{result['training_images_per_s']['min']:.0f} / {result['training_images_per_s']['median']:.0f}",
        ratio=result["serving_over_training"][largest]["median"],
        met=all(result["targets_met"].values()),
    )]
    print(f"Serving the exported SavedModel in-process, min / median over {args.repeats} interleaved rounds:")
    print(common.format_table(rows, [
        ("model", "model"), ("p50", "batch-1 p50 ms"), ("p99", "batch-1 p99 ms"),
        ("serve", f"batch-{largest} img/s"), ("train", f"training img/s (batch {args.train_batch_size})"),
        ("ratio", "serving/training"), ("met", "targets met")]))
    print("Machine: " + common.describe_machine(payload["machine"]))
    if not args.quiet:
        print(json.dumps(payload, indent=2, default=str))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
