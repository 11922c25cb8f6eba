"""The report's grid search: `python -m nfnet_keras.tuner.grid [flags]` (or `nfnet-grid`).

With no flags: `keras_tuner.GridSearch` over lr {0.001, 0.01, 0.1} x batch size
{32, 64, 128, 256} (12 trials, each combination once), preset `seed`, 40 epochs
per trial at a constant lr (the report's schedule, lr / 10 every 50 epochs,
never fires within 40), objective: best validation accuracy. At the end it
prints the table in the report's shape and writes, beside the tuner's project
folder, `<project>_results.md`, `<project>_results.csv` and
`<project>_best_hparams.json` (for `python -m nfnet_keras.fit --hparams FILE`).
`--agcs 0,0.01` adds adaptive gradient clipping as a third axis of the grid.

Rerunning the same command after a kill resumes: finished trials are kept,
the interrupted one runs again, the rest follow (keras-tuner#1055 is fixed in
`nfnet_keras.tuner.oracle`). One chief per project folder: a second search
started on the same folder exits with status 5 and names the process. With
`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT`
set, the same command is a chief (`chief`: serves the oracle, prints the table
at the end) or a worker (`tuner0`, `tuner1`, ...: runs trials) of a
distributed search; `--local-workers N` starts a chief and N workers on this
machine (see `nfnet_keras.tuner.launch`).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys

from nfnet_keras import cli, exits, fileio, rundir
from nfnet_keras.config import LOCATION_FIELDS, TrainConfig, with_defaults
from nfnet_keras.console import prog
from nfnet_keras.hardware import precision_for_machine
from nfnet_keras.tuner import launch

DEFAULT_LRS = (0.001, 0.01, 0.1)
DEFAULT_BATCH_SIZES = (32, 64, 128, 256)


def _number_list(kind, name, allow_zero=False):
    def parse(text):
        try:
            values = [kind(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes comma-separated numbers, got {text!r}") from None
        low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
        if (not values or not all(v == v and v not in (float("inf"),) and low_ok(v) for v in values)
                or len(set(values)) != len(values)):
            what = "non-negative" if allow_zero else "positive"
            raise argparse.ArgumentTypeError(f"{name} takes distinct {what} finite numbers, got {text!r}")
        return values

    return parse


def build_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog("nfnet_keras.tuner.grid"),
        description="Grid search of lr x batch size for an NF-ResNet on CIFAR-10 (defaults: the report's study).",
        formatter_class=cli.HelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--lrs", type=_number_list(float, "--lrs"), default=list(DEFAULT_LRS),
                   metavar="LR,LR,...", help="learning rates")
    g.add_argument("--batch-sizes", type=_number_list(int, "--batch-sizes"), default=list(DEFAULT_BATCH_SIZES),
                   metavar="B,B,...", help="batch sizes")
    g.add_argument("--agcs", type=_number_list(float, "--agcs", allow_zero=True), default=None,
                   metavar="L,L,...", help="AGC clipping factors as a third grid axis, 0 for none "
                   "(e.g. 0,0.01); default: --agc for every trial")
    g.add_argument("--executions-per-trial", type=int, default=1,
                   help="trainings per grid point (seeds seed, seed+1, ...); the objective is their mean")
    g.add_argument("--max-retries-per-trial", type=int, default=0,
                   help="reruns of a trial that crashed (a diverged trial is never rerun)")
    groups = cli.add_config_flags(
        p, "grid", defaults=dataclasses.replace(d, schedule="constant", epochs=40),
        helps={"epochs": "epochs per trial",
               "schedule": "lr schedule within a trial (the report's step schedule never fires in 40 epochs)"},
    )
    g = groups["output"]
    g.add_argument("--directory", default="tuner_runs", help="the tuner's directory; the tables go here too")
    g.add_argument("--project-name", default="nfnet_grid",
                   help="the search's folder under --directory (trials, logs); the tables are named after it")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh instead of resuming (ignored by distributed workers)")
    g.add_argument("--tensorboard-dir", help="default: <directory>/<project-name>/logs")
    g.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    g = p.add_argument_group("distributed (KerasTuner's chief and workers; see docs/tuning.md)")
    g.add_argument("--local-workers", type=int, default=0, metavar="N",
                   help="run a chief and N workers on this machine (127.0.0.1), each its own process; worker i "
                   "logs to <directory>/<project-name>_tuner<i>.log. 0: one process, or the role that "
                   f"{launch.TUNER_ID}, {launch.ORACLE_IP} and {launch.ORACLE_PORT} give")
    g.add_argument("--chief-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long a worker waits for the chief to answer, at start and on every request, "
                   "before it exits with status 3")
    return p


_LIST_FLAGS = ("--lrs", "--batch-sizes", "--agcs")


def _join_list_values(argv):
    """`--lrs -0.1,0.1` -> `--lrs=-0.1,0.1`: argparse reads a value starting with '-' as a flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = []
    i = 0
    while i < len(argv):
        if argv[i] in _LIST_FLAGS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def parse_config(argv=None):
    """(TrainConfig of the fixed settings, args); exits with a one-line error on bad input."""
    parser = build_parser()
    args = parser.parse_args(_join_list_values(argv))
    config = TrainConfig(**cli.config_values(args), batch_size=args.batch_sizes[0], lr=args.lrs[0])
    try:
        config.validate()
        if args.executions_per_trial < 1:
            raise ValueError(f"--executions-per-trial must be >= 1, got {args.executions_per_trial}.")
        if args.max_retries_per_trial < 0:
            raise ValueError(f"--max-retries-per-trial must be >= 0, got {args.max_retries_per_trial}.")
        if args.local_workers < 0:
            raise ValueError(f"--local-workers must be >= 0, got {args.local_workers}.")
        if not args.chief_timeout > 0:
            raise ValueError(f"--chief-timeout must be a positive number of seconds, got {args.chief_timeout:g}.")
    except ValueError as e:
        parser.error(str(e))
    _, warning = precision_for_machine(config.precision, explicit=True)
    if warning:
        print(warning, file=sys.stderr)
    return config, args


def role(local_workers=0):
    """"single", "chief" or "worker" (`nfnet_keras.tuner.launch.role`); RuntimeError if set with --local-workers."""
    who = launch.role()
    if who != "single" and local_workers:
        raise RuntimeError(f"--local-workers sets {launch.TUNER_ID}, {launch.ORACLE_IP} and {launch.ORACLE_PORT} "
                           "itself; unset them, or drop --local-workers.")
    return who


def study_record(config, args):
    """What a resumed (or joined) search must agree on."""
    axes = ("lr", "batch_size") + (("agc",) if args.agcs is not None else ())
    fixed = {k: v for k, v in config.to_dict().items() if k not in axes + LOCATION_FIELDS}
    grid = dict(lr=args.lrs, batch_size=args.batch_sizes)
    if args.agcs is not None:
        grid["agc"] = args.agcs
    return dict(grid=grid, config=fixed, executions_per_trial=args.executions_per_trial)


def check_study(project_dir, study):
    """Raises ValueError if `project_dir` holds a search with other settings."""
    path = os.path.join(project_dir, "study.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    if isinstance(previous.get("config"), dict):  # a search recorded before a config field existed
        axes = set(previous.get("grid", {})) | set(LOCATION_FIELDS)
        previous["config"] = {k: v for k, v in with_defaults(previous["config"]).items() if k not in axes}
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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = parse_config(argv)
    try:
        who = role(args.local_workers)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    overwrite = args.overwrite
    if who == "worker" and overwrite:
        print("note: --overwrite is ignored by a worker (only the chief may clear the shared project).")
        overwrite = False
    project_dir = os.path.join(args.directory, args.project_name)
    log_dir = args.tensorboard_dir or os.path.join(project_dir, "logs")
    study = study_record(config, args)
    grid_size = len(args.lrs) * len(args.batch_sizes) * len(args.agcs or [None])
    for flag, folder in (("--directory", project_dir), ("--tensorboard-dir", log_dir)):
        problem = fileio.folder_problem(folder)
        if problem:  # before anything is written
            print(f"error: {flag} {getattr(args, flag[2:].replace('-', '_'))}: {problem}; give a folder to write "
                  "the search in.", file=sys.stderr)
            return exits.BAD_INPUT
    if args.local_workers:
        return _launch_local(argv, args)
    if who == "worker":  # before loading anything: a wrong address fails at once
        problem = launch.chief_problem(args.chief_timeout)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return exits.NO_ANSWER
    # The flags are checked: now load the framework.
    from nfnet_keras import load_framework

    load_framework()
    from nfnet_keras import training
    from nfnet_keras.data import DataError

    try:
        if not overwrite:
            check_study(project_dir, study)
        train = val = None
        if who != "chief":  # the chief only serves the oracle
            train, val, _ = training.load_splits(config)
            training.check_batch_size(max(args.batch_sizes), len(train[0]), flag="--batch-sizes")
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    # One chief (or single search) per project folder; workers share it with their chief.
    lock = contextlib.nullcontext() if who == "worker" else rundir.locked(project_dir, what="--project-name")
    try:
        with lock:
            return _search(config, args, who, overwrite, project_dir, log_dir, study, grid_size, train, val)
    except (rundir.RunBusy, fileio.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.ENVIRONMENT


def _launch_local(argv, args):
    """`--local-workers N`: this command as a chief and N workers on 127.0.0.1; returns the exit status."""
    try:
        os.makedirs(args.directory, exist_ok=True)
        return launch.launch_local(argv, args.local_workers, os.path.join(args.directory, f"{args.project_name}_"))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.ENVIRONMENT
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume.", file=sys.stderr)
        return exits.INTERRUPTED


def _search(config, args, who, overwrite, project_dir, log_dir, study, grid_size, train, val):
    from nfnet_keras.tuner import distributed
    from nfnet_keras.tuner.hypermodel import OBJECTIVE, NFNetHyperModel
    from nfnet_keras.tuner.oracle import NFNetGridSearch

    train_size = None if train is None else len(train[0])
    hypermodel = NFNetHyperModel(config, args.lrs, args.batch_sizes, train_size=train_size, project_dir=project_dir,
                                 agcs=args.agcs)
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
        chief_timeout=args.chief_timeout,
    )
    if who != "worker":
        fileio.write_json(os.path.join(project_dir, "study.json"), study)
    try:
        _run(tuner, config, args, who, project_dir, log_dir, grid_size, train, val)
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume.", file=sys.stderr)
        return exits.INTERRUPTED
    except distributed.ChiefUnreachable as e:
        print(f"error: [{tuner.tuner_id}] {e}", file=sys.stderr)
        return exits.NO_ANSWER
    except distributed.ChiefCannotListen as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.ENVIRONMENT
    if who == "worker":
        print(f"[{tuner.tuner_id}] no trials left; done.")
        return 0
    return report(tuner, config, args)


def _run(tuner, config, args, who, project_dir, log_dir, grid_size, train, val):
    import keras

    from nfnet_keras.tuner.hypermodel import hparams_experiment, tensorboard_callback

    tuner.search_space_summary()  # a worker's first request to the chief
    if who != "worker":
        left = tuner.oracle.unfinished_values()
        agc_axis = f" x {len(args.agcs)} AGC factors" if args.agcs is not None else ""
        print(f"Grid: {len(args.lrs)} lrs x {len(args.batch_sizes)} batch sizes{agc_axis} = {grid_size} trials of "
              f"{config.epochs} epoch(s), preset {config.preset}, Keras backend {keras.backend.backend()}; "
              f"{grid_size - len(left)} finished, {len(left)} to run. Project: {project_dir}")
    verbose = 2 if args.quiet else "auto"
    if who == "chief":
        print(f"Chief: serving the oracle on {launch.address()} until every trial has finished.", flush=True)
        tuner.search(verbose=verbose)
        return
    experiment = hparams_experiment(args.lrs, args.batch_sizes, args.agcs)
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    tuner.search(train=train, val=val, callbacks=[tensorboard_callback(log_dir, experiment)], verbose=verbose)


def report(tuner, config, args):
    """Prints the table, writes the outputs; returns the exit code."""
    from nfnet_keras.tuner import results as results_lib
    from nfnet_keras.tuner.oracle import trial_number

    agcs = tuple(args.agcs) if args.agcs is not None else (None,)
    cells = results_lib.collect(tuner.oracle, args.lrs, args.batch_sizes, agcs)
    title = (f"Best validation accuracy (%) of `python -m nfnet_keras.tuner.grid`: preset `{config.preset}`, "
             f"{config.epochs} epoch(s) per trial, {config.schedule} lr schedule, "
             f"{config.val_size} validation images, {config.precision}"
             + (f", AGC {config.agc:g}" if config.agc and args.agcs is None else "")
             + (f", {config.train_limit} training images" if config.train_limit else "") + ".")
    paths, table, best = results_lib.write_outputs(
        cells, args.lrs, args.batch_sizes, config, args.directory, args.project_name, title=title, agcs=agcs)
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
        agc_text = f", AGC {_agc_text(best.agc)}" if best.agc is not None else ""
        print(f"Best: lr {best.lr:g}, batch size {best.batch_size}{agc_text}: {100 * best.val_accuracy:.2f}% "
              f"(trial {trial_number(best.trial_id)}).")
        print(f"Wrote {paths['markdown']}, {paths['csv']} and {paths['best']} "
              f"(python -m nfnet_keras.fit --hparams {paths['best']}).")
    else:
        print(f"Wrote {paths['markdown']} and {paths['csv']}; no trial finished, so no best hyperparameters.")
    if counts.get("failed"):
        print(f"error: {counts['failed']} trial(s) crashed; see trial.json under {tuner.project_dir}.",
              file=sys.stderr)
        return exits.FAILED_TRIALS
    return 0


def _agc_text(agc):
    return "off" if not agc else f"{agc:g}"


if __name__ == "__main__":
    sys.exit(main())
