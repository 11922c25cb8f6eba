"""Train an NF-ResNet on CIFAR-10: `python -m nfnet_keras.fit [flags]`.

With no flags it reproduces the report's final run (preset `seed`, SGD momentum
0.9, lr 0.01, batch 64, 200 epochs, weight decay 2e-4, lr / 10 at epochs
50/100/150, the report's augmentation). Rerunning the same command after a
crash resumes from the last complete epoch.
"""

import argparse
import ast
import json
import os
import sys

from nfnet_keras import training

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

# Keys of a --hparams JSON file (e.g. the tuner's best_hparams.json) -> flags.
HPARAM_KEYS = {f.name for f in training.dataclasses.fields(training.TrainConfig)}


def _override(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override takes KEY=VALUE (e.g. depths=(2,2,2)), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string, e.g. activation=gelu


def build_parser():
    d = training.TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m nfnet_keras.fit",
        description="Train a Normalizer-Free ResNet on CIFAR-10 (defaults: the report's final run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, help="model preset (see nfnet_keras.PRESETS)")
    g.add_argument("--override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="replace a preset key, e.g. --override 'widths=(96,192,384)'; repeatable")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--schedule", choices=training.SCHEDULES, default=d.schedule,
                   help="step: lr/10 at 25/50/75%% of the epochs; cosine; onecycle; constant")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up (cosine)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="decoupled weight decay (not applied to gains, skip gains, biases)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--agc", type=float, default=d.agc, metavar="LAMBDA",
                   help="adaptive gradient clipping factor (e.g. 0.01); 0 disables it")
    g.add_argument("--augment", choices=("seed", "standard", "none"), default=d.augment,
                   help="seed: the report's policy; standard: pad-4 crop + flip")
    g.add_argument("--hparams", metavar="FILE",
                   help="JSON of hyperparameters (e.g. the tuner's best_hparams.json); explicit flags win")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=d.data_dir,
                   help="folder with cifar-10-batches-py/ or cifar-10-python.tar.gz (default: $NFNET_DATA_DIR, then TFDS)")
    g.add_argument("--tfds-dir", default=d.tfds_dir, help="TFDS data_dir")
    g.add_argument("--train-limit", type=int, default=d.train_limit, help="train on the first N training images")
    g.add_argument("--val-size", type=int, default=d.val_size, help="validation images held out of the 50,000")
    g = p.add_argument_group("runtime")
    jit = g.add_mutually_exclusive_group()
    jit.add_argument("--jit", dest="jit", action="store_true", default=None,
                     help="XLA-compile the train step (default: on with a GPU, off on CPU where it is slower)")
    jit.add_argument("--no-jit", dest="jit", action="store_false")
    g.add_argument("--precision", choices=training.PRECISIONS, default=d.precision)
    g.add_argument("--mixed-precision", dest="precision", action="store_const", const="mixed_float16",
                   help="shorthand for --precision mixed_float16 (GPU)")
    g.add_argument("--strategy", choices=training.STRATEGIES, default=d.strategy,
                   help="mirrored: tf.distribute.MirroredStrategy over all GPUs (2 logical CPUs without one)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", action="store_true", help="op determinism: bitwise-reproducible runs")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", help="logs, checkpoints, model.keras, metrics.json (default: the newest "
                   "unfinished run with the same flags under runs/, else runs/<time>)")
    g.add_argument("--export-name", default="nfnet", help="SavedModel name under --export-dir")
    g.add_argument("--export-dir", default="saved_models")
    g.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    g.add_argument("--quiet", action="store_true", help="no per-step progress bar (one line per epoch)")
    return p


def parse_config(argv=None):
    """Parses `argv` into (TrainConfig, args); exits with a one-line error on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hparams:
        try:
            with open(args.hparams) as f:
                hparams = json.load(f)
        except (OSError, ValueError) as e:
            parser.error(f"cannot read --hparams {args.hparams}: {e}")
        unknown = sorted(set(hparams) - HPARAM_KEYS)
        if unknown:
            parser.error(f"--hparams {args.hparams} has unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(HPARAM_KEYS))}")
        file_overrides = hparams.pop("overrides", {})
        parser.set_defaults(**hparams)
        args = parser.parse_args(argv)
    else:
        file_overrides = {}
    fields = {f.name for f in training.dataclasses.fields(training.TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and k != "overrides"}
    config = training.TrainConfig(**values, overrides={**file_overrides, **dict(args.override)})
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    return config, args


def main(argv=None):
    config, args = parse_config(argv)
    run_dir = args.run_dir or training.default_run_dir(config)
    print(f"Run directory: {run_dir}  (TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'logs')})")
    try:
        metrics = training.train(
            config,
            run_dir,
            export_name=None if args.no_export else args.export_name,
            export_dir=args.export_dir,
            verbose=2 if args.quiet else "auto",
        )
    except training.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, training.data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"Wrote {os.path.join(run_dir, 'metrics.json')} (test_accuracy {metrics['test_accuracy']:.4f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
