"""The start of the speed recipe: validation accuracy and signal statistics every few steps, per variant.

Each variant is `nfnet-fit --recipe speed --epochs E --seed S` plus its flags (the table `VARIANTS`,
and any extra fit flags after `--`), built and trained in this process on real CIFAR-10 for the
first `--steps` steps of its schedule. Every `--every` steps it records the validation accuracy of
the raw weights (not the EMA) on the recipe's validation images and, for every conv group, the
average channel variance and squared channel mean of its output on 256 validation images
(`nfnet_keras.models.signal.signal_propagation`). The network without normalization keeps unit
variance only as long as its weights keep the statistics it was initialized for; this shows
when, and under which optimizer, that stops.

Writes `benchmarks/results/speed_start[_<tag>].json`.

Usage:
    NFNET_DATA_DIR=... python -m benchmarks.speed_start [--variants muon,sgd] [--steps 88] [--every 22]
        [--epochs 5] [-- extra fit flags]
"""

import argparse
import math
import sys
import time

from benchmarks import common
from benchmarks.speed_flags import AIRBENCH94_NET, BATCH512

# The flags every variant adds to `--recipe speed`: `cifar_speed` at batch 512, where the variants were measured.
BASE = [*AIRBENCH94_NET, *BATCH512]
# name -> the fit flags added to `--recipe speed` and `BASE`.
VARIANTS = {
    "muon": [],  # the recipe: Muon on the conv kernels (lr 0.24), SGD on the rest
    "sgd": ["--optimizer", "sgd"],  # SGD (lr 0.4) on the conv kernels too
    "muon_klr0.08": ["--kernel-lr", "0.08"],
    "muon_kpeak0.5": ["--kernel-peak-pct", "0.5"],  # the kernels' lr peaks at half the steps, the rest's at 23%
    "muon_gain8": ["--gain-lr-mult", "8"],  # WS gains 8x faster
    "muon_gain0": ["--gain-lr-mult", "0"],  # frozen WS gains, as airbench's frozen BatchNorm scale
    "muon_twin": ["--norm", "batch"],
    # the twin with airbench94's BatchNorms: fast moving statistics, tiny epsilon, frozen scale
    "muon_twin_airbn": ["--norm", "batch", "--bn-momentum", "0.4", "--bn-epsilon", "1e-12", "--gain-lr-mult", "0"],
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m benchmarks.speed_start", *argv])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", type=common.str_list, default=["muon", "sgd"], help=", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=88, help="training steps per variant (default: 88)")
    p.add_argument("--every", type=int, default=22, help="measure every this many steps (default: 22)")
    p.add_argument("--epochs", type=int, default=5, help="the length of the schedule the steps start (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", help="suffix of the JSON name")
    p.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; variants: {', '.join(VARIANTS)}")
    if not (0 < args.every <= args.steps and args.steps % args.every == 0):
        p.error(f"--every must divide --steps, got --every {args.every} --steps {args.steps}")

    from nfnet_keras import fit, load_framework

    load_framework()
    from nfnet_keras import training

    base = ["--recipe", "speed", "--epochs", str(args.epochs), "--seed", str(args.seed), "--no-export", *BASE,
            *extra]
    train, val, _ = training.load_splits(fit.parse_config(base)[0])  # the same images for every variant
    out, rows = "speed_start" + (f"_{args.tag}" if args.tag else ""), []
    for name in args.variants:  # the JSON is rewritten after each variant: a stopped run keeps those done
        rows.append(run_variant(name, base + VARIANTS[name], args, train, val))
        path = common.write_json(out, dict(benchmark="speed_start", command=command, fit_flags=base,
                                           steps=args.steps, every=args.every, machine=common.machine_info(),
                                           runs=rows), args.out_dir)
    print(f"JSON: {path}")
    return 0


def run_variant(name, flags, args, train, val):
    """Trains the variant `name` (fit `flags`) on `train` for `args.steps` steps, measuring on `val` every
    `args.every`; its row."""
    from nfnet_keras import fit, training
    from nfnet_keras.data import preprocess
    from nfnet_keras.models.signal import signal_propagation

    config, _ = fit.parse_config(flags)
    training.setup_runtime(config)
    model = training.build_for(config)
    training.compile_model(model, config, steps_per_epoch=math.ceil(len(train[0]) / config.batch_size))
    training.adapt_to(model, train[0])
    train_ds, val_ds = training.make_datasets(config, train, val)
    probe_images = preprocess(val[0][:256]).numpy()
    points = []

    def measure(step, loss, seconds):
        _, accuracy = model.evaluate(val_ds, verbose=0)
        signal = signal_propagation(model, probe_images)
        points.append(dict(step=step, train_loss=loss, val_accuracy=round(float(accuracy), 4),
                           seconds=round(seconds, 1), var=[round(s["avg_var"], 4) for s in signal],
                           sq_mean=[round(s["avg_sq_mean"], 4) for s in signal]))
        print(f"{name} step {step}: val {accuracy:.4f} loss {loss:.3f} group var "
              + " ".join(f"{s['avg_var']:.3g}" for s in signal), flush=True)

    model.fit(train_ds, steps_per_epoch=args.every, epochs=args.steps // args.every, verbose=0,
              callbacks=[_measure_every(measure, args.every, time.time())])
    common.release(model)
    return dict(variant=name, flags=VARIANTS[name], precision=config.precision, points=points)


def _measure_every(measure, every, start):
    """A callback calling `measure(step, mean loss, seconds since start)` after each `fit` epoch of `every` steps."""
    import keras

    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: measure((epoch + 1) * every, round(float(logs["loss"]), 4),
                                                 time.time() - start))


if __name__ == "__main__":
    sys.exit(main())
