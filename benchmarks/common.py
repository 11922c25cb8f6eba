"""Shared helpers of the benchmarks: flags, timing, interleaving, summaries, tables, JSON.

Every benchmark measures in *windows* (a few steps timed together) and repeats
them; competing configurations are measured **interleaved** in the same process
(A, B, B, A, A, B, ...), so that a change in the load of a shared machine hits
all of them alike. Results are reported as min / median / max of the repeats,
and comparisons as the median (and min) of the per-round ratios.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from nfnet_keras import hardware

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULT_MARKER = "BENCHMARK_RESULT_JSON: "


# === Flags ===


def int_list(text):
    """Parses `"64,256"` (or `"64 256"`) into `[64, 256]`."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def str_list(text):
    return [v for v in text.replace(",", " ").split() if v]


def base_parser(description):
    """The flags every benchmark shares; their defaults are filled in by `resolve_args`."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="model preset (default: report_resnet; tiny with --smoke)")
    parser.add_argument("--batch-sizes", type=int_list, help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, help="timed windows per configuration")
    parser.add_argument("--steps", type=int, help="steps (batches) per timed window")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first (tracing) step")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset, tiny batches, 2 windows of 2 steps: proves the script runs")
    parser.add_argument("--out-dir", default=RESULTS_DIR,
                        help="where <name>.json goes (default: benchmarks/results)")
    parser.add_argument("--tag", help="suffix of the JSON name (<name>_<tag>.json), for non-default runs")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    return parser


def resolve_args(args, defaults, smoke_defaults):
    """Fills every flag left at None from `defaults` (or `smoke_defaults` with --smoke)."""
    chosen = {**defaults, **(smoke_defaults if args.smoke else {})}
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, low in (("repeats", 1), ("steps", 1), ("warmup", 0)):
        value = getattr(args, key, None)
        if value is not None and value < low:
            raise SystemExit(f"--{key} must be >= {low}, got {value}.")
    return args


def log(args, *parts):
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


# === Timing ===


def summarize(values, digits=4):
    """min / median / max / mean of a list of numbers, and the values themselves."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
        "mean": round(statistics.fmean(values), digits),
        "values": [round(v, digits) for v in values],
    }


def paired_ratios(numerators, denominators):
    """Per-round ratios `a_i / b_i` of two interleaved series, summarised."""
    return summarize([a / b for a, b in zip(numerators, denominators)])


def interleave(measures, repeats, warmup_rounds=1, warmups=None):
    """Runs `measures` (name -> zero-argument callable returning a value) interleaved.

    Round r runs every measure once, in the given order on even rounds and in
    reverse order on odd ones (ABBA), so a slow drift of the machine's load
    does not favour whichever runs first. `warmup_rounds` untimed rounds come
    first (of `warmups[name]` if given, else of the measures): a model run
    right after other models were built and traced runs slowly for a few steps
    (seen here: 3-5x for ~5 steps).

    Returns:
        name -> list of `repeats` values, in round order.
    """
    names = list(measures)
    results = {name: [] for name in names}
    for _ in range(warmup_rounds):
        for name in names:
            (warmups or measures)[name]()
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(measures[name]())
    return results


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds` (wall) and `sw.cpu_seconds`.

    `cpu_seconds` is the CPU time of every thread of this process: on a shared
    machine, work per CPU-second is what the other processes do not disturb
    (threads spinning while they wait for work count too).
    """

    def __enter__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start

    def sample(self, work):
        """`work` (images, FLOPs, ...) per wall second and per CPU-second, and the cores used."""
        return {"rate": work / self.seconds, "cpu_rate": work / max(self.cpu_seconds, 1e-9),
                "cores": self.cpu_seconds / self.seconds}


def rates(samples, key="rate", scale=1.0):
    """One field (`rate`, `cpu_rate` or `cores`) of a list of `Stopwatch.sample`s, scaled."""
    return [sample[key] * scale for sample in samples]


# === Training steps ===


def compile_for_benchmark(model, jit_compile, learning_rate=0.01):
    """SGD with momentum 0.9 and sparse cross-entropy on logits: the same for every variant.

    No weight decay and no metrics, so that two models compare on the network alone.
    """
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=bool(jit_compile),
    )
    return model


def synthetic_batch(batch_size, input_shape=(32, 32, 3), num_classes=10, seed=0):
    """A normalised-looking float32 batch and int64 labels (speed does not depend on values)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size,) + tuple(input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, batch_size).astype(np.int64)
    return x, y


def train_on_batch_windows(model, x, y, spec):
    """Times `model.train_on_batch(x, y)`: the first (compiling) step, `spec["warmup"]` untimed steps, then
    `spec["repeats"]` windows of `spec["steps"]` steps. Returns (first Stopwatch, its loss, [window
    Stopwatches], the last loss)."""

    def run(steps):
        with Stopwatch() as sw:
            for _ in range(steps):
                loss = model.train_on_batch(x, y)  # a Python float: waits for the step
        return sw, float(loss)

    first, first_loss = run(1)
    if spec["warmup"]:
        run(spec["warmup"])
    windows, last_loss = [], None
    for _ in range(spec["repeats"]):
        sw, last_loss = run(spec["steps"])
        windows.append(sw)
    return first, first_loss, windows, last_loss


def repeated_batch_dataset(x, y):
    """One pre-materialised batch, repeated forever, without re-doing any work.

    `batch` (no drop_remainder) leaves the batch dimension unknown, as in
    `nfnet_keras.data.make_dataset`, so both feed the same traced train step;
    `cache` keeps the batch, so every later element is the stored tensor.

    tf.data's autotuning is off: there is nothing to tune, and with it on, a
    `model.fit` call on this dataset measured here (TensorFlow 2.21, CPU) often
    ended only at the autotuner's next wake-up, 10 ms x (2^k - 1) after the
    iterator was made: a window of 5 steps of 1.7 s then took 10.24 s, so
    windows timed around `fit` read as a fixed, too low rate.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)).cache().repeat()
    return dataset.with_options(options)


class TrainStepper:
    """Runs a compiled model's Keras train function (what `fit` runs each step) on an iterator.

    Args:
        model: a compiled `keras.Model`.
        iterator: a `tf.data` iterator of `(images, labels)` batches.
        batch_size: int. Images per step (for images/s).
    """

    def __init__(self, model, iterator, batch_size):
        self.model = model
        self.iterator = iterator
        self.batch_size = batch_size
        model.make_train_function()
        self.first_step_seconds = None

    def run(self, steps):
        """Runs `steps` steps and waits for the last; returns the wall seconds taken."""
        logs = None
        with Stopwatch() as sw:
            for _ in range(steps):
                logs = self.model.train_function(self.iterator)
            float(logs["loss"])  # wait for the step to finish
        self.last = sw
        return sw.seconds

    def warm_up(self, steps):
        """The first step (tracing, graph optimisation, XLA compile) plus `steps` more."""
        self.first_step_seconds = self.run(1)
        if steps:
            self.run(steps)
        return self

    def measure(self, steps):
        """Runs `steps` steps; returns images per wall second and per CPU-second, cores used."""
        self.run(steps)
        return self.last.sample(steps * self.batch_size)


def release(*models):
    """Drops Keras' global graph state between configurations."""
    import gc

    import keras

    del models
    keras.backend.clear_session()
    gc.collect()


# === Subprocess workers (settings that must precede TensorFlow's start-up) ===


def run_worker(module, spec, env=None, timeout=1800):
    """Runs `python -m <module> --worker <json spec>` and returns the dict it reports.

    Thread pools, `TF_ENABLE_ONEDNN_OPTS` and the global mixed-precision policy
    are fixed when TensorFlow starts, so each such setting gets its own process.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(spec)],
        env=full_env, cwd=root, capture_output=True, text=True, timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"worker {module} {spec} failed (exit {proc.returncode}):\n{tail}")


def report_worker_result(result):
    print(RESULT_MARKER + json.dumps(result), flush=True)


# === Machine and output ===


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags():
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    have = hardware.cpu_flags() or frozenset()
    return [flag for flag in wanted if flag in have]


def _memory_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None


def other_processes(limit=4, min_cpu=10.0):
    """The busiest other processes (CPU %, command), to document a shared machine."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    mine = {os.getpid(), os.getppid()}
    busy = []
    for line in out:
        pid, ppid, pcpu, args = line.split(None, 3)
        if int(pid) in mine or int(ppid) == os.getpid() or float(pcpu) < min_cpu or args.startswith("ps "):
            continue
        busy.append({"cpu_percent": float(pcpu), "command": args[:110]})
        if len(busy) == limit:
            break
    return busy


def machine_info():
    """What the numbers depend on: CPU, cores, versions, oneDNN/threads settings, load."""
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: on)"),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "other_busy_processes": other_processes(),
    }


@contextlib.contextmanager
def benchmark_run(name, args):
    """Records the machine before and after a benchmark; yields the payload dict to fill.

    On exit, writes `<out_dir>/<name>.json` (`<name>_<tag>.json` with --tag,
    `<name>_smoke.json` with --smoke).
    """
    payload = {
        "benchmark": name,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "quiet", "worker")},
        "machine": machine_info(),
    }
    start = time.perf_counter()
    yield payload
    payload["wall_seconds"] = round(time.perf_counter() - start, 1)
    payload["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    suffix = "".join(f"_{part}" for part in (getattr(args, "tag", None), "smoke" if args.smoke else None) if part)
    payload["json_path"] = write_json(name + suffix, payload, args.out_dir)


def write_json(name, payload, out_dir=RESULTS_DIR):
    """Writes `payload` to `<out_dir>/<name>.json` atomically; returns the path."""
    from nfnet_keras import fileio

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with fileio.atomic_write(path) as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    return path


def describe_machine(info):
    """One paragraph about the machine, for the printed report."""
    busy = "; ".join(f"{p['cpu_percent']:.0f}% {p['command'][:60]}" for p in info["other_busy_processes"])
    return (
        f"{info['cpu']}, {info['usable_cpus']} usable cores ({', '.join(info['cpu_flags'])}), "
        f"{info['memory_gb']} GB; TF {info['tensorflow']}, Keras {info['keras']}; "
        f"load average {info['load_average_1_5_15']}" + (f"; other busy processes: {busy}" if busy else "")
    )


def format_table(rows, columns):
    """A Markdown table of `rows` (dicts) with `columns` (key, header) pairs."""
    headers = [header for _, header in columns]
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
    return str(value)
