"""Int8 against float32: CIFAR-10 test accuracy, batch-1 latency and batch-256 throughput of each format.

Loads a trained `--model` (a `.keras` file written by `nfnet-fit`; int8 is
verified against trained weights, see `nfnet_keras.export_formats`), exports it with
`nfnet_keras.export_formats.export_model` (folded, verified as `nfnet-export`
verifies) as

- saved_model (float32), onnx and onnx int8, litert and litert int8,
  openvino (float32),

and runs each in its runtime in this process:

- accuracy: the first `--limit` CIFAR-10 test images (default all 10,000;
  `$NFNET_DATA_DIR`), top-1 against the labels, and the share of images
  whose class id equals the Keras model's;
- speed: interleaved rounds (ABC, CBA, ...) of `--latency-calls` timed
  batch-1 calls (p50 and p99 in ms) and `--steps` calls at each of
  `--batch-sizes` (images/s), every runtime and TensorFlow limited to
  `--threads` CPU threads.

The ONNX int8 export calibrates on 512 CIFAR-10 training images; the LiteRT
one is dynamic-range (see `nfnet_keras.export_formats`). Writes
`benchmarks/results/quantization.json` and prints a table.

Usage:
    NFNET_DATA_DIR=... python -m benchmarks.quantization --model runs/<run>/model.keras [--limit 10000]
        [--variants saved_model,onnx,onnx_int8,litert,litert_int8,openvino] [--threads 1] [--smoke]
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
from benchmarks.export_formats import Runner, _saved_model_runner, measure_runners  # noqa: E402
from nfnet_keras.data import preprocess  # noqa: E402
from nfnet_keras.export_formats import export_model, missing_packages  # noqa: E402
from nfnet_keras.runtimes import load_runtime  # noqa: E402

# variant -> (format, quantize)
VARIANTS = {
    "saved_model": ("saved_model", None),
    "onnx": ("onnx", None),
    "onnx_int8": ("onnx", "int8"),
    "litert": ("litert", None),
    "litert_int8": ("litert", "int8"),
    "openvino": ("openvino", None),
}
DEFAULTS = dict(batch_sizes=[256], repeats=3, steps=2, warmup=1, latency_calls=100,
                threads=1, limit=10000, variants=list(VARIANTS))
SMOKE = dict(batch_sizes=[16], repeats=2, steps=2, warmup=0, latency_calls=10, limit=256)


def _parse(argv):
    parser = common.base_parser(__doc__)
    parser.add_argument("--model", help="the trained .keras model (required)")
    parser.add_argument("--limit", type=int, help="CIFAR-10 test images for accuracy (default 10000)")
    parser.add_argument("--latency-calls", type=int, help="batch-1 calls per round (default 100)")
    parser.add_argument("--threads", type=int, help="CPU threads of every runtime (default 1)")
    parser.add_argument("--variants", type=common.str_list, help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}.")
    for flag in ("latency_calls", "threads", "limit"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1.")
    if not args.model:
        parser.error("--model is required: pass a trained .keras file (e.g. runs/<run>/model.keras).")
    if not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file; pass a .keras file written by nfnet-fit.")
    if not os.environ.get("NFNET_DATA_DIR"):
        parser.error("NFNET_DATA_DIR is not set: point it at the folder holding cifar-10-batches-py/ (accuracy is "
                     "measured on the CIFAR-10 test set, int8 calibrates on its training set).")
    return parser, args


def _export_all(model, args, base):
    """`(predict functions, skipped, export seconds)` of every variant whose packages are installed."""
    predictors, skipped, export_seconds = {}, {}, {}
    for name in args.variants:
        fmt, quantize = VARIANTS[name]
        missing = missing_packages(fmt)
        if missing:
            skipped[name] = f"needs {', '.join(missing)}"
            continue
        common.log(args, f"exporting {name} ...")
        start = time.perf_counter()
        path = export_model(model, name, fmt, base_dir=base, quantize=quantize)  # verified as nfnet-export does
        export_seconds[name] = round(time.perf_counter() - start, 1)
        if fmt == "saved_model":
            predictors[name] = _saved_model_runner(path)
        else:
            predictors[name] = load_runtime(path, threads=args.threads, batch_size=max(args.batch_sizes))
    return predictors, skipped, export_seconds


def main(argv=None):
    parser, args = _parse(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from nfnet_keras.data import load_cifar10

    with common.benchmark_run("quantization", args) as payload:
        _, (x_test, y_test) = load_cifar10(test_only=True)
        x_test, y_test = x_test[:args.limit], np.asarray(y_test[:args.limit]).reshape(-1)
        model = keras.saving.load_model(args.model, compile=False)
        logits = model.predict(preprocess(x_test), batch_size=256, verbose=0)
        keras_ids = np.argmax(logits, -1)
        results = {"keras": {"test_accuracy": float(np.mean(keras_ids == y_test))}}
        with tempfile.TemporaryDirectory(prefix="nfnet-bench-") as base:
            predictors, skipped, export_seconds = _export_all(model, args, base)
            runners = {}
            for name, predict in predictors.items():
                common.log(args, f"{name}: accuracy on {len(x_test)} test images ...")
                start = time.perf_counter()
                ids = np.argmax(predict(x_test), -1)
                results[name] = {"test_accuracy": float(np.mean(ids == y_test)),
                                 "class_ids_equal_to_keras": float(np.mean(ids == keras_ids)),
                                 "accuracy_seconds": round(time.perf_counter() - start, 1),
                                 "export_seconds": export_seconds[name]}
                runners[name] = Runner(predict, x_test)
            values = measure_runners(args, runners)
        for name in runners:
            latencies = values[f"{name}/latency"]
            results[name].update(
                latency_batch1_ms={"p50": common.summarize([v[0] for v in latencies], 3),
                                   "p99": common.summarize([v[1] for v in latencies], 3)},
                images_per_s={str(b): common.summarize(values[f"{name}/{b}"], 1) for b in args.batch_sizes})
        payload.update(model=args.model, test_images=len(x_test),
                       threads=args.threads, results=results, skipped=skipped, params=int(model.count_params()))

    _print(args, payload)
    return payload


def _print(args, payload):
    results, largest = payload["results"], str(max(args.batch_sizes))
    rows = [dict(variant="keras (float32)", accuracy=f"{results['keras']['test_accuracy']:.2%}")]
    for name, r in results.items():
        if name == "keras":
            continue
        rows.append(dict(variant=name, accuracy=f"{r['test_accuracy']:.2%}",
                         agree=f"{r['class_ids_equal_to_keras']:.2%}",
                         p50=r["latency_batch1_ms"]["p50"]["median"], p99=r["latency_batch1_ms"]["p99"]["median"],
                         throughput=r["images_per_s"][largest]["median"]))
    print(f"{args.model}, {payload['test_images']} CIFAR-10 test images, "
          f"{args.threads} thread(s), medians of {args.repeats} interleaved rounds:")
    print(common.format_table(rows, [("variant", "variant"), ("accuracy", "test accuracy"),
                                     ("agree", "class id = Keras'"), ("p50", "batch-1 p50 ms"),
                                     ("p99", "batch-1 p99 ms"), ("throughput", f"batch-{largest} img/s")]))
    for name, why in payload["skipped"].items():
        print(f"{name}: skipped ({why})")
    print("Machine: " + common.describe_machine(payload["machine"]))
    if not args.quiet:
        print(json.dumps({k: payload[k] for k in ("results", "skipped", "wall_seconds")}, indent=2, default=str))
    print(f"JSON: {payload['json_path']}")


if __name__ == "__main__":
    main()
