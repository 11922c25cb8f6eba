"""Every export format in its own runtime: batch-1 latency and batch-256 throughput, folded and not.

Builds `build_model(preset)` (random weights: speed does not depend on them;
the whitening stem adapted to CIFAR-10 training images when `$NFNET_DATA_DIR`
holds them, else to random images), exports it once per format with
`nfnet_keras.export_formats.export_model`, both as the folded inference twin
(`fold_for_inference`) and as trained (`fold=False`), and runs each in its
runtime in this process on the same uint8 images:

- saved_model: `tf.saved_model.load` and its `serving_default` signature;
- onnx: onnxruntime (CPU); litert: the ai-edge-litert interpreter;
- openvino: the OpenVINO CPU plugin in float32.

Each runtime is limited to `--threads` CPU threads (TensorFlow's too).
Interleaved rounds (ABC, CBA, ...) measure each variant's batch-1 latency
(`--latency-calls` timed calls; p50 and p99 in ms) and batch-256 throughput
(`--steps` calls; images/s). Also reported: each variant's largest
probability difference from the Keras model on those images. Writes
`benchmarks/results/export_formats.json` and prints a table.

Usage:
    python -m benchmarks.export_formats [--preset cifar_speed] [--threads 1] [--repeats 3] [--smoke]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from nfnet_keras.contract import INPUT, PROBABILITIES, SIGNATURE  # noqa: E402
from nfnet_keras.data import preprocess  # noqa: E402
from nfnet_keras.export_formats import FORMATS, export_model, missing_packages  # noqa: E402
from nfnet_keras.models.registry import build_model  # noqa: E402
from nfnet_keras.models.signal_block import adapt_model  # noqa: E402
from nfnet_keras.runtimes import load_runtime  # noqa: E402

DEFAULTS = dict(preset="cifar_speed", batch_sizes=[256], repeats=3, steps=2, warmup=1, latency_calls=100,
                threads=1, formats=list(FORMATS))
SMOKE = dict(preset="tiny_speed", batch_sizes=[16], repeats=2, steps=2, warmup=0, latency_calls=10)


def _images(count):
    """`(test images, training images, description)`: CIFAR-10 if found, else random pixels (same speed)."""
    from nfnet_keras.data import DataError, load_cifar10

    try:
        (x_train, _), (x_test, _) = load_cifar10()
        return np.resize(x_test, (count,) + x_test.shape[1:]), x_train[:2000], "cifar10 test images"
    except DataError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (count + 2000, 32, 32, 3), dtype=np.uint8)
        return images[:count], images[count:], "random uint8 pixels"


def _saved_model_runner(path):
    signature = tf.saved_model.load(path).signatures[SIGNATURE]
    return lambda images: signature(**{INPUT: tf.constant(images)})[PROBABILITIES].numpy()


class Runner:
    """Times `predict(uint8 images) -> probabilities` of one exported variant."""

    def __init__(self, predict, images):
        self.predict, self.images = predict, images

    def latency(self, calls):
        """(p50, p99) in ms of `calls` batch-1 calls."""
        times = []
        for i in range(calls):
            x = np.ascontiguousarray(self.images[i % len(self.images)][None])
            start = time.perf_counter()
            self.predict(x)
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.percentile(times, 50)), 1e3 * float(np.percentile(times, 99))

    def images_per_second(self, batch_size, calls):
        x = np.ascontiguousarray(np.resize(self.images, (batch_size,) + self.images.shape[1:]))
        self.predict(x)  # a runtime may re-plan for a new batch size: not timed
        start = time.perf_counter()
        for _ in range(calls):
            self.predict(x)
        return batch_size * calls / (time.perf_counter() - start)


def measure_runners(args, runners):
    """Interleaved rounds of each runner's batch-1 latency (`<name>/latency`) and throughput at each of
    `args.batch_sizes` (`<name>/<batch>`); returns `common.interleave`'s values."""
    measures = {}
    for name, runner in runners.items():
        measures[f"{name}/latency"] = lambda r=runner: r.latency(args.latency_calls)
        for b in args.batch_sizes:
            measures[f"{name}/{b}"] = lambda r=runner, b=b: r.images_per_second(b, args.steps)
    common.log(args, f"measuring {len(runners)} variants, {args.repeats} interleaved rounds ...")
    return common.interleave(measures, args.repeats, warmup_rounds=args.warmup)


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--latency-calls", type=int, help="batch-1 calls per round (default 100)")
    parser.add_argument("--threads", type=int, help="CPU threads of every runtime (default 1)")
    parser.add_argument("--formats", type=common.str_list, help=f"comma-separated, of {', '.join(FORMATS)}")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)}; use {', '.join(FORMATS)}.")
    for flag in ("latency_calls", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1.")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    with common.benchmark_run("export_formats", args) as payload:
        images, train_images, source = _images(max(args.latency_calls, *args.batch_sizes))
        keras.utils.set_random_seed(0)
        model = build_model(args.preset)
        adapt_model(model, preprocess(train_images).numpy())
        expected = tf.nn.softmax(model.predict(preprocess(images), batch_size=256, verbose=0)).numpy()
        runners, skipped, errors, export_seconds = {}, {}, {}, {}
        with tempfile.TemporaryDirectory(prefix="nfnet-bench-") as base:
            for fmt in args.formats:
                missing = missing_packages(fmt)
                if missing:
                    skipped[fmt] = f"needs {', '.join(missing)}"
                    continue
                for fold in (True, False):
                    name = f"{fmt}{'' if fold else '_unfolded'}"
                    common.log(args, f"exporting {name} ...")
                    start = time.perf_counter()
                    path = export_model(model, name, fmt, base_dir=base, verify=False, fold=fold)
                    export_seconds[name] = round(time.perf_counter() - start, 1)
                    if fmt == "saved_model":
                        predict = _saved_model_runner(path)
                    else:
                        predict = load_runtime(path, threads=args.threads, batch_size=max(args.batch_sizes))
                    errors[name] = float(np.max(np.abs(predict(images) - expected)))
                    runners[name] = Runner(predict, images)
            values = measure_runners(args, runners)

        results = {}
        for name in runners:
            latencies = values[f"{name}/latency"]
            results[name] = {
                "latency_batch1_ms": {"p50": common.summarize([v[0] for v in latencies], 3),
                                      "p99": common.summarize([v[1] for v in latencies], 3)},
                "images_per_s": {str(b): common.summarize(values[f"{name}/{b}"], 1) for b in args.batch_sizes},
                "max_probability_difference_from_keras": errors[name],
                "export_seconds": export_seconds[name],
            }
        payload.update(preset=args.preset, images=source, threads=args.threads, results=results, skipped=skipped,
                       params=int(model.count_params()))

    largest = str(max(args.batch_sizes))
    rows = [dict(variant=name,
                 p50=r["latency_batch1_ms"]["p50"]["median"], p99=r["latency_batch1_ms"]["p99"]["median"],
                 throughput=r["images_per_s"][largest]["median"],
                 error=f"{r['max_probability_difference_from_keras']:.1e}")
            for name, r in results.items()]
    print(f"{args.preset}, {args.threads} thread(s), medians of {args.repeats} interleaved rounds:")
    print(common.format_table(rows, [("variant", "format"), ("p50", "batch-1 p50 ms"), ("p99", "batch-1 p99 ms"),
                                     ("throughput", f"batch-{largest} img/s"), ("error", "max |p - p_keras|")]))
    for fmt, why in skipped.items():
        print(f"{fmt}: skipped ({why})")
    print("Machine: " + common.describe_machine(payload["machine"]))
    if not args.quiet:
        print(json.dumps({k: payload[k] for k in ("results", "skipped", "wall_seconds")}, indent=2, default=str))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
