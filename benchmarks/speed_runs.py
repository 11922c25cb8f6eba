"""The speed recipe on real CIFAR-10: several seeds of the NF network and its BatchNorm twin.

Each run is `python -m nfnet_keras.fit --recipe speed --seed S [--norm batch] [extra flags]`
in its own run directory under `--runs-dir` (rerunning the same command resumes
an interrupted run and skips a finished one). At the end, and with
`--collect-only`, the runs' `metrics.json` are summarised into
`benchmarks/results/speed_recipe[_<tag>].json` (each run's test accuracy plain
and with the recipe's test-time augmentation, per-epoch validation accuracy,
wall time, and the time and epoch at which validation accuracy first reached
`--threshold`), and each run's `metrics.json` is copied beside it as
`speed_recipe[_<tag>]_<run>_metrics.json`.

`--row NAME` adds the flags of a row of `benchmarks/speed_jax.py`'s `ROWS` (the GPU
configurations) before the extra flags, so the TensorFlow path trains the same rows.

Usage:
    python -m benchmarks.speed_runs --seeds 0,1,2 --bn-seeds 0 [--row NAME] [--tag NAME] [-- extra fit flags]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from benchmarks import common
from benchmarks.speed_jax import ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_list(text):
    """`"0,1,2"` -> `[0, 1, 2]`; `""` -> `[]`."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return values


def run_name(norm, seed):
    return f"{'bn' if norm == 'batch' else 'nf'}_seed{seed}"


def first_reached(history, seconds_per_epoch, threshold):
    """(epoch, seconds of training) at which `val_accuracy` first reached `threshold`, or (None, None).

    Keras logs the accuracy in float32 (940 of 1,000 images is 0.9399999976...), so the two are compared
    at that precision.
    """
    for epoch, accuracy in enumerate(history.get("val_accuracy", []), start=1):
        if np.float32(accuracy) >= np.float32(threshold):
            return epoch, float(sum(seconds_per_epoch[:epoch]))
    return None, None


def summarize_run(name, metrics, threshold):
    history, seconds = metrics.get("history", {}), metrics.get("seconds_per_epoch", [])
    epoch, at = first_reached(history, seconds, threshold)
    config = metrics["config"]
    return dict(
        run=name, norm=config["norm"], seed=config["seed"], epochs=metrics.get("epochs_completed"),
        test_accuracy=metrics.get("test_accuracy"), test_accuracy_flip_tta=metrics.get("test_accuracy_flip_tta"),
        tta=metrics.get("tta"), test_accuracy_tta=metrics.get("test_accuracy_tta"),
        train_seconds=round(float(sum(seconds)), 1) if len(seconds) == metrics.get("epochs_completed") else None,
        val_accuracy=history.get("val_accuracy"), first_epoch_at_threshold=epoch, seconds_to_threshold=at,
        diverged=metrics.get("diverged"),
    )


def mean_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="seeds of the NF runs")
    p.add_argument("--bn-seeds", type=seed_list, default=[0], help="seeds of the BatchNorm twin's runs ('': none)")
    p.add_argument("--runs-dir", default=os.path.join("runs", "speed"), help="one run directory per run below it")
    p.add_argument("--threshold", type=float, default=0.94, help="validation accuracy whose first epoch is reported")
    p.add_argument("--tag", help="suffix of the results' names")
    p.add_argument("--row", choices=list(ROWS), help="a row of benchmarks/speed_jax.py's ROWS: its flags come "
                   "before those after --")
    p.add_argument("--collect-only", action="store_true", help="summarise the finished runs, start none")
    p.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    extra = [*(ROWS[args.row] if args.row else []), *extra]
    runs = [("none", s) for s in args.seeds] + [("batch", s) for s in args.bn_seeds]
    base = "speed_recipe" + (f"_{args.tag}" if args.tag else "")
    os.makedirs(args.out_dir, exist_ok=True)
    rows, failed = [], []
    for norm, seed in runs:
        name = run_name(norm, seed)
        run_dir = os.path.join(args.runs_dir, name)
        metrics_path = os.path.join(run_dir, "metrics.json")
        if not args.collect_only and not os.path.exists(metrics_path):
            command = [sys.executable, "-m", "nfnet_keras.fit", "--recipe", "speed", "--seed", str(seed),
                       "--norm", norm, "--run-dir", run_dir, "--no-export", "--quiet", *extra]
            print("$ " + " ".join(command[1:]), flush=True)
            code = subprocess.call(command, cwd=ROOT)
            if code:
                print(f"{name}: fit exited {code}", flush=True)
                failed.append(name)
        if not os.path.exists(metrics_path):
            continue
        with open(metrics_path) as f:
            metrics = json.load(f)
        rows.append(summarize_run(name, metrics, args.threshold))
        shutil.copyfile(metrics_path, os.path.join(args.out_dir, f"{base}_{name}_metrics.json"))
    nf = [r for r in rows if r["norm"] == "none" and not r["diverged"]]
    bn = [r for r in rows if r["norm"] == "batch" and not r["diverged"]]
    summary = {}
    for label, group in (("nf", nf), ("bn", bn)):
        for key in ("test_accuracy", "test_accuracy_flip_tta", "test_accuracy_tta", "train_seconds"):
            mean, std = mean_of(group, key)
            summary[f"{label}_{key}_mean"], summary[f"{label}_{key}_std"] = mean, std
    payload = dict(benchmark="speed_recipe", command="python -m benchmarks.speed_runs " + " ".join(sys.argv[1:]),
                   extra_fit_flags=extra, threshold=args.threshold, machine=common.machine_info(), runs=rows,
                   summary=summary, failed=failed)
    path = common.write_json(base, payload, args.out_dir)
    print(common.format_table(rows, [
        ("run", "run"), ("epochs", "epochs"), ("test_accuracy", "test"), ("test_accuracy_flip_tta", "flip TTA"),
        ("test_accuracy_tta", "recipe TTA"), ("train_seconds", "train s"),
        ("first_epoch_at_threshold", f"1st epoch val >= {args.threshold:g}")]))
    print(f"JSON: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
