"""Data-parallel training in 2 processes against 1 process on the same cores (JAX backend, CPU, Gloo).

One process trains on the whole global batch (one device, no distribution);
then 2 processes, joined through `keras.distribution.initialize` on 127.0.0.1
(`nfnet_keras.distribution`), each hold a replica and train on half of it,
the gradients averaged over TCP by Gloo. Both time `train_on_batch` on the
same synthetic global batch (`common.compile_for_benchmark`: SGD with momentum,
XLA), after the first (compiling) step and `--warmup` steps, in `--repeats`
windows of `--steps` steps. On one machine the two processes share its cores:
2 processes cannot be faster than 1 there; the figures show what the
collectives cost. That cost is measured on its own in the 2-process run: the
all-reduce of a tensor of each trainable variable's shape (what one step
exchanges), `--repeats` windows of `--steps` all-reduces, in ms and MB/s.

Usage:
    python -m benchmarks.multiprocess [--preset report_resnet] [--batch-sizes 64] [--repeats 3] [--steps 10]
        [--warmup 3] [--smoke]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from benchmarks import common  # noqa: E402

DEFAULTS = dict(preset="report_resnet", batch_sizes=[64], repeats=3, steps=10, warmup=3)
SMOKE = dict(preset="tiny", batch_sizes=[8], repeats=2, steps=2, warmup=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(spec):
    """In a worker process: times the train step (and with several processes the all-reduce alone)."""
    import jax
    import keras

    import nfnet_keras as nk
    from nfnet_keras import distribution

    processes = int(os.environ.get(distribution.MULTI_HOST_ENV[1]) or 1)
    if processes > 1:
        distribution.data_parallel(spec["batch_size"])
    keras.utils.set_random_seed(0)
    model = common.compile_for_benchmark(nk.build_model(spec["preset"]), jit_compile=True)
    x, y = common.synthetic_batch(spec["batch_size"])
    rows = spec["batch_size"] // processes
    index = jax.process_index()
    x, y = x[index * rows:(index + 1) * rows], y[index * rows:(index + 1) * rows]  # this process's share

    first, first_loss, windows, last_loss = common.train_on_batch_windows(model, x, y, spec)
    samples = [sw.sample(spec["steps"] * spec["batch_size"]) for sw in windows]
    result = {
        "processes": processes,
        "devices": jax.device_count(),
        "batch_size": spec["batch_size"],
        "first_step_s": round(first.seconds, 2),
        "step_ms": common.summarize([1000 * sw.seconds / spec["steps"] for sw in windows], 1),
        "images_per_s": common.summarize(common.rates(samples), 1),
        "cores_used": common.summarize(common.rates(samples, "cores"), 2),
        "loss_first_step": round(first_loss, 4),
        "loss_last_step": round(last_loss, 4),
    }
    if processes > 1:
        result["all_reduce"] = _all_reduce(model, spec)
    return result


def _all_reduce(model, spec):
    """Times the all-reduce of one tensor per trainable variable (each process adds its own); ms and MB/s."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = keras_mesh()
    rows = NamedSharding(mesh, PartitionSpec("batch"))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    local = [np.ones((jax.local_device_count(),) + shape, np.float32) for shape in shapes]  # a row per device
    arrays = [jax.make_array_from_process_local_data(rows, a) for a in local]
    total = jax.jit(lambda xs: [a.sum(0) for a in xs], out_shardings=NamedSharding(mesh, PartitionSpec()))
    jax.block_until_ready(total(arrays))
    megabytes = sum(int(np.prod(s)) for s in shapes) * 4 / 1e6
    ms = []
    for _ in range(spec["repeats"]):
        with common.Stopwatch() as sw:
            for _ in range(spec["steps"]):
                jax.block_until_ready(total(arrays))
        ms.append(1000 * sw.seconds / spec["steps"])
    return {"megabytes": round(megabytes, 3), "ms": common.summarize(ms, 2),
            "megabytes_per_s": common.summarize([megabytes / (m / 1000) for m in ms], 1)}


def keras_mesh():
    import keras

    return keras.distribution.distribution().device_mesh.backend_mesh


def run_processes(spec, processes, timeout=1800):
    """Runs `processes` workers (joined when more than one); returns process 0's result."""
    from nfnet_keras import distribution, launch

    port = launch.free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    popens = []
    for index in range(processes):
        worker_env = dict(env)
        if processes > 1:
            worker_env.update({distribution.MULTI_HOST_ENV[0]: f"127.0.0.1:{port}",
                               distribution.MULTI_HOST_ENV[1]: str(processes),
                               distribution.MULTI_HOST_ENV[2]: str(index)})
        popens.append(subprocess.Popen([sys.executable, "-m", "benchmarks.multiprocess", "--worker",
                                        json.dumps(spec)], env=worker_env, cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in popens:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in popens:
            if p.poll() is None:
                p.kill()
                p.wait()
    for line in reversed(outputs[0].splitlines()):
        if line.startswith(common.RESULT_MARKER):
            return json.loads(line[len(common.RESULT_MARKER):])
    tails = "\n".join("\n".join(o.splitlines()[-15:]) for o in outputs)
    raise RuntimeError(f"{processes} worker(s) {spec} failed (statuses {[p.returncode for p in popens]}):\n{tails}")


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.report_worker_result(measure(json.loads(args.worker)))
        return None
    args = common.resolve_args(args, DEFAULTS, SMOKE)
    results = []
    with common.benchmark_run("multiprocess", args) as payload:
        for batch_size in args.batch_sizes:
            if batch_size % 2:
                raise SystemExit(f"--batch-sizes: {batch_size} does not split across 2 processes; use even sizes.")
            spec = dict(preset=args.preset, batch_size=batch_size, repeats=args.repeats, steps=args.steps,
                        warmup=args.warmup)
            for processes in (1, 2):
                common.log(args, f"{processes} process(es), batch {batch_size}: building, compiling, timing "
                                 f"{args.repeats} x {args.steps} steps ...")
                result = run_processes(spec, processes)
                result["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
                results.append(result)
                common.log(args, f"  {result['step_ms']['median']:.0f} ms/step, "
                                 f"{result['images_per_s']['median']:.0f} img/s")
        payload.update(preset=args.preset, command="python -m benchmarks.multiprocess " + " ".join(
            argv if argv is not None else sys.argv[1:]), results=results)
    one = {r["batch_size"]: r for r in results if r["processes"] == 1}
    rows = [dict(
        processes=r["processes"], batch=r["batch_size"], step=r["step_ms"]["median"],
        step_min=r["step_ms"]["min"], ips=r["images_per_s"]["median"], cores=r["cores_used"]["median"],
        vs_one=one[r["batch_size"]]["step_ms"]["median"] / r["step_ms"]["median"],
        ar_ms=r["all_reduce"]["ms"]["median"] if "all_reduce" in r else None,
        ar_mb=r["all_reduce"]["megabytes"] if "all_reduce" in r else None,
    ) for r in results]
    print(f"Training step, preset {args.preset!r}, float32, XLA, median of {args.repeats} windows of {args.steps} "
          "steps (synthetic in-memory global batch); 2 processes: Gloo over 127.0.0.1, 1 CPU device each:")
    print(common.format_table(rows, [
        ("processes", "processes"), ("batch", "global batch"), ("step", "ms/step median"), ("step_min", "min"),
        ("ips", "img/s"), ("cores", "cores used (process 0)"), ("vs_one", "speed vs 1 process"),
        ("ar_ms", "all-reduce ms"), ("ar_mb", "all-reduce MB")]))
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
