"""The report's grid search: `python -m tuner.grid [flags]`.

With no flags: `keras_tuner.GridSearch` over lr {0.001, 0.01, 0.1} x batch size
{32, 64, 128, 256} (12 trials, each combination once), preset `seed`, 40 epochs
per trial at a constant lr (the report's schedule, lr / 10 every 50 epochs,
never fires within 40), objective: best validation accuracy. At the end it
prints the table in the report's shape and writes, beside the tuner's project
folder, `<project>_results.md`, `<project>_results.csv` and
`<project>_best_hparams.json` (for `python -m nfnet_keras.fit --hparams FILE`).

Rerunning the same command after a kill resumes: finished trials are kept,
the interrupted one runs again, the rest follow (keras-tuner#1055 is fixed in
`tuner.oracle`). With `KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP` and
`KERASTUNER_ORACLE_PORT` set, the same command is a chief (`chief`: serves
the oracle, prints the table at the end) or a worker (`tuner0`, `tuner1`, ...:
runs trials) of a distributed search.
"""

import argparse
import dataclasses
import json
import os
import sys

from nfnet_keras import cli, training
from tuner.hypermodel import NFNetHyperModel, OBJECTIVE, hparams_experiment, tensorboard_callback
from tuner.oracle import NFNetGridSearch
from tuner import results as results_lib

EXIT_FAILED_TRIALS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DEFAULT_LRS = (0.001, 0.01, 0.1)
DEFAULT_BATCH_SIZES = (32, 64, 128, 256)
# Settings that name locations, not the experiment: free to differ on resume and across hosts.
_LOCATIONS = ("data_dir", "tfds_dir")


def _number_list(kind, name):
    def parse(text):
        try:
            values = [kind(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes comma-separated numbers, got {text!r}")
        if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{name} takes distinct positive numbers, got {text!r}")
        return values

    return parse


def build_parser():
    d = training.TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m tuner.grid",
        description="Grid search of lr x batch size for an NF-ResNet on CIFAR-10 (defaults: the report's study).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--lrs", type=_number_list(float, "--lrs"), default=list(DEFAULT_LRS),
                   metavar="LR,LR,...", help="learning rates")
    g.add_argument("--batch-sizes", type=_number_list(int, "--batch-sizes"), default=list(DEFAULT_BATCH_SIZES),
                   metavar="B,B,...", help="batch sizes")
    g.add_argument("--executions-per-trial", type=int, default=1,
                   help="trainings per grid point (seeds seed, seed+1, ...); the objective is their mean")
    g.add_argument("--max-retries-per-trial", type=int, default=0,
                   help="reruns of a trial that crashed (a diverged trial is never rerun)")
    g = p.add_argument_group("trial")
    cli.add_model_flags(g, d)
    g.add_argument("--epochs", type=int, default=40, help="epochs per trial")
    cli.add_optimisation_flags(
        g, dataclasses.replace(d, schedule="constant"),
        "lr schedule within a trial (the report's step schedule never fires in 40 epochs)",
    )
    cli.add_runtime_flags(g, d)
    cli.add_data_flags(p.add_argument_group("data"), d)
    g = p.add_argument_group("output")
    g.add_argument("--directory", default="tuner_runs", help="the tuner's directory; the tables go here too")
    g.add_argument("--project-name", default="nfnet_grid")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh instead of resuming (ignored by distributed workers)")
    g.add_argument("--tensorboard-dir", help="default: <directory>/<project-name>/logs")
    g.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    return p


def parse_config(argv=None):
    """(TrainConfig of the fixed settings, args); exits with a one-line error on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = training.TrainConfig(**cli.config_values(args), batch_size=args.batch_sizes[0], lr=args.lrs[0])
    try:
        config.validate()
        for lr in args.lrs:
            training.TrainConfig(**{**config.to_dict(), "lr": lr}).validate()
        if args.executions_per_trial < 1:
            raise ValueError(f"--executions-per-trial must be >= 1, got {args.executions_per_trial}.")
        if args.max_retries_per_trial < 0:
            raise ValueError(f"--max-retries-per-trial must be >= 0, got {args.max_retries_per_trial}.")
    except ValueError as e:
        parser.error(str(e))
    return config, args


def role():
    """"single", "chief" or "worker", from KerasTuner's distributed-tuning environment variables."""
    from keras_tuner.src.distribute import utils as dist_utils

    if not dist_utils.has_chief_oracle():  # raises if only some of the variables are set
        return "single"
    return "chief" if dist_utils.is_chief_oracle() else "worker"


def study_record(config, args):
    """What a resumed (or joined) search must agree on."""
    fixed = {k: v for k, v in config.to_dict().items() if k not in ("lr", "batch_size") + _LOCATIONS}
    return dict(grid=dict(lr=args.lrs, batch_size=args.batch_sizes), config=fixed,
                executions_per_trial=args.executions_per_trial)


def check_study(project_dir, study):
    """Raises ValueError if `project_dir` holds a search with other settings."""
    path = os.path.join(project_dir, "study.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(study))
    if previous == current:
        return
    flat_prev = {**previous.get("config", {}), **previous.get("grid", {}),
                 "executions_per_trial": previous.get("executions_per_trial")}
    flat_cur = {**current["config"], **current["grid"], "executions_per_trial": current["executions_per_trial"]}
    changed = sorted(k for k in set(flat_prev) | set(flat_cur) if flat_prev.get(k) != flat_cur.get(k))
    raise ValueError(
        f"{project_dir} holds a search with other settings ({', '.join(changed)} differ). Rerun with the "
        "same flags to resume, or pass --overwrite or another --project-name to start a new one."
    )


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None):
    config, args = parse_config(argv)
    try:
        who = role()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    overwrite = args.overwrite
    if who == "worker" and overwrite:
        print("note: --overwrite is ignored by a worker (only the chief may clear the shared project).")
        overwrite = False
    project_dir = os.path.join(args.directory, args.project_name)
    log_dir = args.tensorboard_dir or os.path.join(project_dir, "logs")
    study = study_record(config, args)
    grid_size = len(args.lrs) * len(args.batch_sizes)
    try:
        if not overwrite:
            check_study(project_dir, study)
        train = val = None
        if who != "chief":  # the chief only serves the oracle
            train, val, _ = training.load_splits(config)
    except (ValueError, training.data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    train_size = None if train is None else len(train[0])
    hypermodel = NFNetHyperModel(config, args.lrs, args.batch_sizes, train_size=train_size, project_dir=project_dir)
    tuner = NFNetGridSearch(
        hypermodel,
        objective=OBJECTIVE,
        max_trials=grid_size,
        seed=config.seed + 1,  # the oracle's; a grid draws nothing at random
        max_retries_per_trial=args.max_retries_per_trial,
        directory=args.directory,
        project_name=args.project_name,
        overwrite=overwrite,
        executions_per_trial=args.executions_per_trial,
    )
    if who != "worker":
        _write_json(os.path.join(project_dir, "study.json"), study)
    tuner.search_space_summary()
    if who != "worker":
        left = tuner.oracle.unfinished_values()
        print(f"Grid: {len(args.lrs)} lrs x {len(args.batch_sizes)} batch sizes = {grid_size} trials of "
              f"{config.epochs} epoch(s), preset {config.preset}; {grid_size - len(left)} finished, "
              f"{len(left)} to run. Project: {project_dir}")
    if who != "chief":
        hparams_experiment(log_dir, args.lrs, args.batch_sizes)
        print(f"TensorBoard: tensorboard --logdir {log_dir}")

    verbose = 2 if args.quiet else "auto"
    try:
        if who == "chief":
            print("Chief: serving the oracle until every trial has finished.", flush=True)
            tuner.search(verbose=verbose)
        else:
            tuner.search(train=train, val=val, callbacks=[tensorboard_callback(log_dir)], verbose=verbose)
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if who == "worker":
        print(f"[{tuner.tuner_id}] no trials left; done.")
        return 0
    return report(tuner, config, args)


def report(tuner, config, args):
    """Prints the table, writes the outputs; returns the exit code."""
    cells = results_lib.collect(tuner.oracle, args.lrs, args.batch_sizes)
    title = (f"Best validation accuracy (%) of `python -m tuner.grid`: preset `{config.preset}`, "
             f"{config.epochs} epoch(s) per trial, {config.schedule} lr schedule, "
             f"{config.val_size} validation images"
             + (f", {config.train_limit} training images" if config.train_limit else "") + ".")
    paths, table, best = results_lib.write_outputs(
        cells, args.lrs, args.batch_sizes, config, args.directory, args.project_name, title=title)
    counts = {}
    for cell in cells.values():
        counts[cell.status] = counts.get(cell.status, 0) + 1
    print()
    print(title)
    print()
    print(table)
    print()
    finished = counts.get("ok", 0) + counts.get("diverged", 0) + counts.get("failed", 0)
    print(f"{finished} of {len(cells)} trials finished ({counts.get('diverged', 0)} diverged, "
          f"{counts.get('failed', 0)} failed).")
    if best is not None:
        print(f"Best: lr {best.lr:g}, batch size {best.batch_size}: {100 * best.val_accuracy:.2f}% "
              f"(trial {best.trial_id}).")
        print(f"Wrote {paths['markdown']}, {paths['csv']} and {paths['best']} "
              f"(python -m nfnet_keras.fit --hparams {paths['best']}).")
    else:
        print(f"Wrote {paths['markdown']} and {paths['csv']}; no trial finished, so no best hyperparameters.")
    if counts.get("failed"):
        print(f"error: {counts['failed']} trial(s) crashed; see trial.json under {tuner.project_dir}.",
              file=sys.stderr)
        return EXIT_FAILED_TRIALS
    return 0


if __name__ == "__main__":
    sys.exit(main())
