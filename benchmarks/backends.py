"""Training-step time of the model under each Keras backend: TensorFlow, JAX, PyTorch.

Each backend runs in its own process (`KERAS_BACKEND` is fixed when Keras
starts): it builds `build_model(preset)` with the same seed, compiles it with
SGD (momentum 0.9) and sparse cross-entropy on logits (`common.compile_for_benchmark`),
and times `train_on_batch` on one in-memory float32 batch: forward, backward
and the SGD update, as `fit` runs them. The compiler is each backend's `fit`
default here (`nfnet_keras.training.resolve_jit`): XLA under JAX, none under
TensorFlow on a CPU (XLA measured slower there), eager under PyTorch;
`--tf-xla` adds TensorFlow with XLA. After the first step (tracing and
compiling: `first_step_s`) and `--warmup` steps, `--repeats` windows of
`--steps` steps are timed. A backend whose package is not installed is
skipped and listed as such.

The backends run one after the other, not interleaved: on a shared machine a
change of load between them shows in the recorded load averages.

Usage:
    python -m benchmarks.backends [--preset report_resnet] [--batch-sizes 64] [--backends tensorflow,jax,torch]
        [--repeats 3] [--steps 10] [--warmup 3] [--tf-xla] [--smoke]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from benchmarks import common  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULTS = dict(preset="report_resnet", batch_sizes=[64], repeats=3, steps=10, warmup=3,
                backends=list(BACKENDS))
SMOKE = dict(preset="tiny", batch_sizes=[8], repeats=2, steps=2, warmup=1)


def _backend_list(text):
    values = common.str_list(text)
    bad = [v for v in values if v not in BACKENDS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--backends takes {', '.join(BACKENDS)}, got {text!r}.")
    return values


def installed(backend):
    """Whether `backend`'s package can be imported (TensorFlow always: it is a dependency)."""
    return backend == "tensorflow" or importlib.util.find_spec(backend) is not None


def measure(spec):
    """In the worker process: times the train step of one backend; returns its figures."""
    import keras

    import nfnet_keras as nk
    from nfnet_keras.config import TrainConfig
    from nfnet_keras.training import resolve_jit

    backend = keras.backend.backend()
    if backend != spec["backend"]:
        raise RuntimeError(f"KERAS_BACKEND={spec['backend']} was asked for, Keras runs {backend}.")
    jit = resolve_jit(TrainConfig(jit=spec["jit"]), has_gpu=False) if backend != "torch" else False
    keras.utils.set_random_seed(0)
    model = common.compile_for_benchmark(nk.build_model(spec["preset"]), jit)
    x, y = common.synthetic_batch(spec["batch_size"])

    first, first_loss, windows, last_loss = common.train_on_batch_windows(model, x, y, spec)
    step_ms = [1000 * sw.seconds / spec["steps"] for sw in windows]
    samples = [sw.sample(spec["steps"] * spec["batch_size"]) for sw in windows]
    return {
        "backend": backend,
        "version": _version(backend),
        "xla": bool(jit),
        "batch_size": spec["batch_size"],
        "first_step_s": round(first.seconds, 2),
        "step_ms": common.summarize(step_ms, 1),
        "images_per_s": common.summarize(common.rates(samples), 1),
        "images_per_cpu_s": common.summarize(common.rates(samples, "cpu_rate"), 1),
        "cores_used": common.summarize(common.rates(samples, "cores"), 2),
        "loss_first_step": round(first_loss, 4),
        "loss_last_step": round(last_loss, 4),
    }


def _version(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    return importlib.import_module(module).__version__


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--backends", type=_backend_list, help="comma-separated, from tensorflow, jax, torch "
                        "(default: all three)")
    parser.add_argument("--tf-xla", action="store_true", help="also time TensorFlow with XLA")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.report_worker_result(measure(json.loads(args.worker)))
        return None
    args = common.resolve_args(args, DEFAULTS, SMOKE)
    runs = [(b, None) for b in args.backends]
    if args.tf_xla and "tensorflow" in args.backends:
        runs.insert(args.backends.index("tensorflow") + 1, ("tensorflow", True))
    results, skipped = [], []
    with common.benchmark_run("backends", args) as payload:
        for backend, jit in runs:
            if not installed(backend):
                skipped.append({"backend": backend, "reason": f"{backend} is not installed "
                                f"(pip install -e '.[{backend}]')"})
                common.log(args, f"{backend}: not installed, skipped")
                continue
            for batch_size in args.batch_sizes:
                common.log(args, f"{backend}{' (XLA)' if jit else ''}, batch {batch_size}: building, compiling, "
                                 f"timing {args.repeats} x {args.steps} steps ...")
                spec = dict(backend=backend, jit=jit, preset=args.preset, batch_size=batch_size,
                            repeats=args.repeats, steps=args.steps, warmup=args.warmup)
                result = common.run_worker("benchmarks.backends", spec, env={"KERAS_BACKEND": backend})
                result["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
                results.append(result)
                common.log(args, f"  {result['step_ms']['median']:.0f} ms/step, "
                                 f"{result['images_per_s']['median']:.0f} img/s")
        payload.update(preset=args.preset, command="python -m benchmarks.backends " + " ".join(argv or sys.argv[1:]),
                       results=results, skipped=skipped)
    reference = next((r for r in results if r["backend"] == "tensorflow" and not r["xla"]), None)
    rows = [dict(
        backend=r["backend"], version=r["version"], xla=r["xla"], batch=r["batch_size"],
        step_med=r["step_ms"]["median"], step_min=r["step_ms"]["min"], step_max=r["step_ms"]["max"],
        ips=r["images_per_s"]["median"], ips_cpu=r["images_per_cpu_s"]["median"],
        cores=r["cores_used"]["median"], first=r["first_step_s"],
        vs_tf=(reference["step_ms"]["median"] / r["step_ms"]["median"]
               if reference and reference["batch_size"] == r["batch_size"] else None),
    ) for r in results]
    print(f"Training step (forward, backward, SGD update), preset {args.preset!r}, float32, median of "
          f"{args.repeats} windows of {args.steps} steps (synthetic in-memory batch):")
    print(common.format_table(rows, [
        ("backend", "backend"), ("version", "version"), ("xla", "XLA"), ("batch", "batch"),
        ("step_med", "ms/step median"), ("step_min", "min"), ("step_max", "max"), ("ips", "img/s"),
        ("ips_cpu", "img/CPU-s"), ("cores", "cores used"), ("first", "1st step s"),
        ("vs_tf", "speed vs TF")]))
    for s in skipped:
        print(f"Skipped {s['backend']}: {s['reason']}.")
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
