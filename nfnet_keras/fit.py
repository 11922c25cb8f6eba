"""Train an NF-ResNet on CIFAR-10: `python -m nfnet_keras.fit [flags]`.

With no flags it reproduces the report's final run (preset `report_resnet`,
SGD momentum 0.9, lr 0.01, batch 64, 200 epochs, weight decay 2e-4, lr / 10 at
epochs 50/100/150, the report's augmentation); `--recipe fast` trains the same
net in 20 epochs (docs/training.md). SIGTERM (how clusters and preemptible
machines stop a job) and Ctrl-C checkpoint at the next step's end and exit;
`--checkpoint-every N` checkpoints every N steps as well. Rerunning the same
command after a crash, a kill or a stop resumes from the newest checkpoint,
mid-epoch too, on the same batches as an uninterrupted run.

Exit statuses: 0 done; 2 bad input, including a --run-dir or export
destination that cannot be written (nothing written); 3 the loss diverged;
4 trained but the export failed; 5 a file could not be written (e.g. a full
disk), the run directory is in use by another process, or no checkpoint could
be read; 6 (a run of several processes) another process stopped answering
or failed; 130 interrupted by Ctrl-C, 143 (128 + 15) stopped by SIGTERM: both
checkpointed at the step reached (rerun the same command to resume).
"""

import argparse
import json
import os
import signal
import sys

from nfnet_keras import cli, exits, rundir
from nfnet_keras.config import CONFIG_FIELDS, RECIPES, TrainConfig, field_type_problem
from nfnet_keras.console import prog
from nfnet_keras.contract import check_model_name
from nfnet_keras.hardware import precision_for_machine

# Keys of a --hparams JSON file (e.g. the tuner's best_hparams.json) -> flags.
HPARAM_KEYS = CONFIG_FIELDS - {"recipe"}


def build_parser():
    p = argparse.ArgumentParser(
        prog=prog("nfnet_keras.fit"),
        description="Train a Normalizer-Free ResNet on CIFAR-10 (defaults: the report's final run).",
        formatter_class=cli.HelpFormatter,
        epilog="Exit statuses: 0 done, 2 bad input, 3 diverged, 4 export failed, 5 files or checkpoints, "
        "6 another process of the run lost, 130 Ctrl-C, 143 SIGTERM (both checkpoint at the next step; rerun the "
        "same command to resume).",
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), default="report",
                   help="a named set of defaults: report (the report's final run), fast (20 epochs), "
                   "speed (the cifar_speed_wider network, 10 epochs) or speed_twin (cifar_speed's BatchNorm twin, "
                   "airbench94's BatchNorms and bias lr); see docs/training.md. Explicit flags and --hparams win")
    groups = cli.add_config_flags(p, "fit")
    groups["optimisation"].add_argument(
        "--hparams", metavar="FILE",
        help="JSON of hyperparameters (e.g. the tuner's best_hparams.json); explicit flags win")
    groups["runtime"].add_argument("--mixed-precision", dest="precision", action="store_const",
                                   const="mixed_float16", help="shorthand for --precision mixed_float16 (GPU)")
    g = groups["output"]
    g.add_argument("--run-dir", help="logs, checkpoints, model.keras, metrics.json (default: the newest "
                   "unfinished run with the same flags under runs/, else runs/<time>)")
    g.add_argument("--export-name", default="nfnet", help="SavedModel name under --export-dir")
    g.add_argument("--export-dir", default="saved_models", help="the folder TF Serving watches")
    g.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    g.add_argument("--quiet", action="store_true", help="no per-step progress bar (one line per epoch)")
    return p


def parse_config(argv=None):
    """Parses `argv` into (TrainConfig, args); exits with a one-line error on bad input.

    Precedence: explicit flags, then --hparams, then --recipe, then the defaults.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = dict(RECIPES[args.recipe])
    file_overrides = recipe.pop("overrides", {})
    parser.set_defaults(**recipe)
    precision_chosen = False  # by the user (a flag or --hparams), not the recipe
    if args.hparams:
        try:
            with open(args.hparams) as f:
                hparams = json.load(f)
        except (OSError, ValueError) as e:
            parser.error(f"cannot read --hparams {args.hparams}: {e}")
        if not isinstance(hparams, dict):
            parser.error(f"--hparams {args.hparams} must hold a JSON object of settings, got a "
                         f"{type(hparams).__name__}")
        unknown = sorted(set(hparams) - HPARAM_KEYS)
        if unknown:
            parser.error(f"--hparams {args.hparams} has unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(HPARAM_KEYS))}")
        for key, value in hparams.items():
            problem = field_type_problem(key, value)
            if problem:
                parser.error(f"--hparams {args.hparams}: key \"{key}\" {problem}")
        more = hparams.pop("overrides", {})
        if not isinstance(more, dict):
            parser.error(f"--hparams {args.hparams}: \"overrides\" must be an object of preset keys")
        file_overrides = {**file_overrides, **more}
        parser.set_defaults(**hparams)
        precision_chosen = "precision" in hparams
    args = parser.parse_args(argv)
    values = cli.config_values(args)
    values["overrides"] = {**file_overrides, **values["overrides"]}
    parser.set_defaults(precision=None)  # a flag's value survives this; a recipe's does not
    precision_chosen = precision_chosen or parser.parse_args(argv).precision is not None
    # A recipe's mixed_bfloat16 becomes float32 on a machine that has no kernels for it (nfnet_keras.hardware).
    values["precision"], args.precision_message = precision_for_machine(values["precision"],
                                                                        explicit=precision_chosen)
    config = TrainConfig(**values)  # with the --recipe it started from
    try:
        config.validate()
        if not args.no_export:  # before hours of training, not after them
            check_model_name(args.export_name)
    except ValueError as e:
        parser.error(str(e))
    return config, args


def output_problem(run_dir, args):
    """Why the run directory or the export destination cannot be written, as one line, or None."""
    from nfnet_keras import fileio

    problem = fileio.folder_problem(run_dir)
    if problem:
        return f"--run-dir {run_dir}: {problem}; give a folder to write the run in."
    if not args.no_export:
        destination = os.path.join(args.export_dir, args.export_name)
        problem = fileio.folder_problem(destination)
        if problem:
            return (f"cannot export to {destination} (--export-dir {args.export_dir}, --export-name "
                    f"{args.export_name}): {problem}; fix it, give another --export-dir, or pass --no-export.")
    return None


def main(argv=None):
    status = _main(argv)
    distribution = sys.modules.get("nfnet_keras.distribution")  # loaded with the framework
    # A failed process of several exits at once, not at JAX's shutdown barrier.
    return distribution.exit_now(status) if distribution else status


def _main(argv=None):
    config, args = parse_config(argv)
    if args.precision_message:
        print(args.precision_message, file=sys.stderr)
    run_dir = args.run_dir or rundir.default_run_dir(config)
    problem = output_problem(run_dir, args)
    if problem:  # before hours of training, and before anything is written
        print(f"error: {problem}", file=sys.stderr)
        return exits.BAD_INPUT
    # The flags are checked: now load the framework.
    from nfnet_keras import fileio, load_framework

    load_framework()
    from nfnet_keras import training
    from nfnet_keras.callbacks import CheckpointError
    from nfnet_keras.data import DataError
    try:
        metrics = training.train(
            config,
            run_dir,
            export_name=None if args.no_export else args.export_name,
            export_dir=args.export_dir,
            verbose=2 if args.quiet else "auto",
        )
    except KeyboardInterrupt:  # before the first epoch started
        print("\nInterrupted before the first epoch; rerun the same command to start again.", file=sys.stderr)
        return exits.INTERRUPTED
    except training.TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return exits.TERMINATED if e.signum == signal.SIGTERM else exits.INTERRUPTED
    except training.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.DIVERGED
    except training.ExportFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.EXPORT_FAILED
    except (rundir.RunBusy, fileio.WriteError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.ENVIRONMENT
    except (ValueError, DataError) as e:  # a collective whose peer is gone can surface as a ValueError
        _leave_if_a_peer_is_lost(e)
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except Exception as e:  # raised inside the tf.data pipeline, wrapped in TensorFlow's error
        from nfnet_keras.distribution import UNEVEN_BATCH

        message = str(e)
        _leave_if_a_peer_is_lost(e)
        if UNEVEN_BATCH not in message:
            raise
        reason = message[message.index(UNEVEN_BATCH):].split("]")[0]
        print(f"error: {reason}. Complete epochs are checkpointed in {run_dir}.", file=sys.stderr)
        return exits.BAD_INPUT
    print(f"Wrote {os.path.join(run_dir, rundir.METRICS_FILE)} (test_accuracy {metrics['test_accuracy']:.4f}).")
    return 0


def _leave_if_a_peer_is_lost(error):
    """Ends the process with `exits.PEER_LOST` if `error` is a collective whose peer process is gone."""
    from nfnet_keras.distribution import leave, peer_failure

    reason = peer_failure(error)
    if reason:
        leave(reason)


if __name__ == "__main__":
    sys.exit(main())
