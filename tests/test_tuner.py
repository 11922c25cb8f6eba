"""The grid search (`tuner/`): resume after a kill (keras-tuner#1055), divergence, the
report's table and best_hparams.json, TensorBoard + HParams, distributed tuning.

The end-to-end tests run `python -m tuner.grid` in subprocesses on a tiny synthetic
CIFAR-10 (written in the official `cifar-10-batches-py` format), so they need no
download and no `NFNET_DATA_DIR`; they are about the tuner, not the data.
"""

import dataclasses
import glob
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import keras
import keras_tuner
import numpy as np
import pytest
from keras_tuner.src.engine import trial as trial_module

from nfnet_keras import exits
from nfnet_keras import fit as fit_cli
from nfnet_keras.config import TrainConfig
from nfnet_keras.tuner import results as results_lib
from nfnet_keras.tuner.hypermodel import NFNetHyperModel
from nfnet_keras.tuner.oracle import DIVERGED, NFNetGridSearch, ResumableGridSearchOracle, is_diverged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRS = [0.001, 0.01, 0.1]
BATCH_SIZES = [32, 64, 128, 256]
# A tiny grid run end to end (with --lrs 0.01,1000: lr 1000 diverges within a few steps).
TINY = ["--preset", "tiny", "--epochs", "1", "--train-limit", "256", "--val-size", "128", "--quiet",
        "--batch-sizes", "32,64"]
TIMEOUT = 300  # seconds for one subprocess run

pytestmark = [
    # KerasTuner 1.4.8's oracle lock calls threading.currentThread().getName().
    pytest.mark.filterwarnings("ignore:currentThread:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:getName:DeprecationWarning"),
    # A diverged trial's objective is NaN on purpose.
    pytest.mark.filterwarnings("ignore:All-NaN axis encountered:RuntimeWarning"),
]


# === Fixtures and helpers ===


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A folder with a tiny random CIFAR-10 in the `cifar-10-batches-py` pickle format."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (96, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 96).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return str(root)


@pytest.fixture
def no_gc(monkeypatch):
    """Skips `gc.collect()`, which KerasTuner and `keras.backend.clear_session` call before every
    trial (~0.5 s each with TensorFlow loaded): the fake trials below take microseconds."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _start(args, log_path, module="nfnet_keras.tuner.grid", **env):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=_env(**env),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _read(path):
    with open(path) as f:
        return f.read()


def _trials(project_dir):
    """{trial_id: trial.json dict} of a project (skipping a file caught mid-write)."""
    found = {}
    for path in glob.glob(os.path.join(project_dir, "trial_*", "trial.json")):
        try:
            state = json.loads(_read(path))
        except ValueError:  # being written (KerasTuner does not write it atomically)
            continue
        found[state["trial_id"]] = state
    return found


def _recorded_finished(project_dir):
    """Trials finished in their trial.json and in the oracle's saved state (oracle.json's end order).

    KerasTuner writes the two files one after the other: a kill between them leaves a trial the
    oracle still counts as running, which a resumed search runs again.
    """
    try:
        ended = set(json.loads(_read(os.path.join(project_dir, "oracle.json")))["end_order"])
    except (OSError, ValueError, KeyError):
        return set()
    return {k for k, t in _trials(project_dir).items() if t["status"] in ("COMPLETED", "FAILED") and k in ended}


def _run_to_the_end(args, log_path, **env):
    """Runs the grid command to its end (exit status 0 asserted, the process killed on failure); returns its log."""
    process = _start(args, log_path, **env)
    try:
        assert process.wait(timeout=TIMEOUT) == 0, _read(log_path)
    finally:
        _kill(process)
    return _read(log_path)


def _started(log_text):
    """The (tuner_id, trial_id) pairs a log says were started ("[tuner0] trial 4 starts: ..." is trial_id "3")."""
    pairs = []
    for line in log_text.splitlines():
        if line.startswith("[") and "] trial " in line and " starts: " in line:
            tuner_id, rest = line[1:].split("] trial ", 1)
            pairs.append((tuner_id, str(int(rest.split(" ", 1)[0]) - 1)))
    return pairs


class Killed(BaseException):
    """Stands in for SIGKILL inside a test process (not an Exception: the tuner does not catch it)."""


class FakeHyperModel(keras_tuner.HyperModel):
    """The grid (by default the report's), a one-layer model and an instant fake `fit`.

    `kill_at`: the fit number (1-based) that raises `Killed`; `diverge_lr`: lr that "diverges".
    """

    def __init__(self, kill_at=None, diverge_lr=None, lrs=LRS, batch_sizes=BATCH_SIZES):
        super().__init__()
        self.kill_at, self.diverge_lr, self.fits = kill_at, diverge_lr, []
        self.lrs, self.batch_sizes = lrs, batch_sizes

    def build(self, hp):
        hp.Choice("lr", self.lrs)
        hp.Choice("batch_size", self.batch_sizes)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(loss="mse")
        return model

    def fit(self, hp, model, *args, **kwargs):
        self.fits.append((hp.get("lr"), hp.get("batch_size")))
        if self.kill_at == len(self.fits):
            raise Killed()
        if hp.get("lr") == self.diverge_lr:
            return {"val_accuracy": float("nan"), DIVERGED: 1.0}
        return {"val_accuracy": hp.get("lr") + hp.get("batch_size") / 1000, DIVERGED: 0.0}


def _finished_values(tuner):
    return [tuple(t.hyperparameters.values[k] for k in ("lr", "batch_size"))
            for t in tuner.oracle.trials.values()
            if t.status in (trial_module.TrialStatus.COMPLETED, trial_module.TrialStatus.FAILED)]


# === The oracle ===


def test_stock_gridsearch_does_not_resume(tmp_path, no_gc):
    """Documents keras-tuner#1055 in the installed KerasTuner: why tuner.oracle exists.

    Reloaded, stock GridSearch reruns the interrupted trial and then fails (KeyError in its
    empty traversal list); killed between two trials, it runs 0 new ones. If this test starts
    failing, KerasTuner fixed the bug and the override may go."""
    grid = dict(lrs=[0.01, 0.1], batch_sizes=[32, 64])
    first = keras_tuner.GridSearch(FakeHyperModel(kill_at=2, **grid),
                                   objective=keras_tuner.Objective("val_accuracy", "max"),
                                   directory=str(tmp_path), project_name="stock")
    with pytest.raises(Killed):
        first.search(verbose=0)
    again = FakeHyperModel(**grid)
    resumed = keras_tuner.GridSearch(again, objective=keras_tuner.Objective("val_accuracy", "max"),
                                     directory=str(tmp_path), project_name="stock")
    with pytest.raises(KeyError):  # its traversal state is gone: after the retried trial it crashes
        resumed.search(verbose=0)
    assert again.fits == [(0.01, 64)]  # only the interrupted trial ran again; 2 grid points never run
    assert len(_finished_values(resumed)) == 2


def test_resumable_oracle_finishes_the_grid_after_a_kill(tmp_path, no_gc):
    first_model = FakeHyperModel(kill_at=4)
    first = NFNetGridSearch(first_model, max_trials=12, directory=str(tmp_path), project_name="grid")
    with pytest.raises(Killed):
        first.search(verbose=0)
    assert len(_finished_values(first)) == 3

    again = FakeHyperModel()
    resumed = NFNetGridSearch(again, max_trials=12, directory=str(tmp_path), project_name="grid")
    assert len(resumed.oracle.unfinished_values()) == 9
    resumed.search(verbose=0)
    done = _finished_values(resumed)
    assert len(done) == 12 and len(set(done)) == 12
    assert set(done) == {(lr, b) for lr in LRS for b in BATCH_SIZES}
    assert again.fits[0] == first_model.fits[-1]  # the interrupted trial runs again, first
    assert len(again.fits) == 9  # ... and nothing finished runs twice
    assert len(resumed.oracle.trials) == 12


def test_kill_between_the_oracles_and_the_tuners_files_after_trial_1_still_resumes(tmp_path, no_gc):
    """KerasTuner writes the tuner's file (which a rerun needs to reload) after the oracle's files at
    the end of a trial: killed between them after trial 1, the rerun must not run trial 1 again."""
    grid = dict(lrs=[0.01, 0.1], batch_sizes=[32])
    first = NFNetGridSearch(FakeHyperModel(**grid), max_trials=2, directory=str(tmp_path), project_name="grid")

    def killed_while_saving():
        raise Killed()

    first.save = killed_while_saving
    with pytest.raises(Killed):
        first.search(verbose=0)
    assert len(_finished_values(first)) == 1
    again = FakeHyperModel(**grid)
    resumed = NFNetGridSearch(again, max_trials=2, directory=str(tmp_path), project_name="grid")
    resumed.search(verbose=0)
    assert again.fits == [(0.1, 32)]
    assert sorted(_finished_values(resumed)) == [(0.01, 32), (0.1, 32)]


def test_resumable_oracle_reconciles_a_kill_between_its_files(tmp_path, no_gc):
    """Killed after a trial.json was written but before oracle.json: that trial is rerun, not lost
    or duplicated; a trial.json that says finished is not rerun even if oracle.json lists it as running."""
    grid = dict(lrs=[0.01, 0.1], batch_sizes=[32, 64])
    first = NFNetGridSearch(FakeHyperModel(**grid), max_trials=4, directory=str(tmp_path), project_name="grid")
    first.search(verbose=0)
    oracle_path = os.path.join(first.project_dir, "oracle.json")
    state = json.loads(_read(oracle_path))
    # Pretend trial 3 started but oracle.json was not written again, and trial 2 finished after the
    # last oracle.json that lists it as running.
    for key in ("start_order", "end_order"):
        state[key] = [t for t in state[key] if t != "3"]
    state["end_order"] = [t for t in state["end_order"] if t != "2"]
    state["ongoing_trials"] = {"tuner0": "2"}
    state["tried_so_far"] = [h for t, h in state["id_to_hash"].items() if t != "3"]
    with open(oracle_path, "w") as f:
        json.dump(state, f)
    trial_path = os.path.join(first.project_dir, "trial_3", "trial.json")
    trial = json.loads(_read(trial_path))
    trial.update(status="RUNNING", metrics={"metrics": {}}, score=None)
    with open(trial_path, "w") as f:
        json.dump(trial, f)

    again = FakeHyperModel(**grid)
    resumed = NFNetGridSearch(again, max_trials=4, directory=str(tmp_path), project_name="grid")
    resumed.search(verbose=0)
    assert again.fits == [(0.1, 64)]
    assert len(resumed.oracle.trials) == 4 and len(set(_finished_values(resumed))) == 4


def test_diverged_trials_are_failed_not_retried_and_do_not_stop_the_search(tmp_path, no_gc):
    model = FakeHyperModel(diverge_lr=0.1, lrs=[0.01, 0.1], batch_sizes=[32, 64, 128])
    tuner = NFNetGridSearch(model, max_trials=6, max_retries_per_trial=2, max_consecutive_failed_trials=2,
                            directory=str(tmp_path), project_name="grid")
    tuner.search(verbose=0)  # three diverged trials in a row: not "consecutive failures"
    assert len(model.fits) == 6  # no retries of the diverged ones
    diverged = [t for t in tuner.oracle.trials.values() if is_diverged(t)]
    assert sorted(t.hyperparameters.values["batch_size"] for t in diverged) == [32, 64, 128]
    assert all(t.status == trial_module.TrialStatus.FAILED for t in diverged)
    best = tuner.get_best_hyperparameters()[0].values
    assert best == {"lr": 0.01, "batch_size": 128}


def test_oracle_hands_out_every_grid_point_once_to_concurrent_workers():
    """Two tuners ask before either finishes: both get work (stock GridSearch makes one wait)."""
    oracle = ResumableGridSearchOracle(objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=4)
    hp = keras_tuner.HyperParameters()
    hp.Choice("lr", [0.01, 0.1])
    hp.Choice("batch_size", [32, 64])
    oracle.update_space(hp)
    oracle.save = lambda: None  # keep the test off the disk
    oracle._save_trial = lambda trial: None
    a, b = oracle.create_trial("tuner0"), oracle.create_trial("tuner1")
    assert a.status == b.status == "RUNNING"
    assert a.hyperparameters.values != b.hyperparameters.values
    seen = [a.hyperparameters.values, b.hyperparameters.values]
    for trial in (a, b):
        trial.status = "COMPLETED"
        oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5})
        oracle.end_trial(trial)
    c, d = oracle.create_trial("tuner0"), oracle.create_trial("tuner1")
    seen += [c.hyperparameters.values, d.hyperparameters.values]
    assert sorted(tuple(v.values()) for v in seen) == [(0.01, 32), (0.01, 64), (0.1, 32), (0.1, 64)]
    assert oracle.create_trial("tuner2").status == "STOPPED"


# === The hypermodel ===


def test_search_space_summary_shows_both_hyperparameters_before_the_search(tmp_path, capsys):
    hypermodel = NFNetHyperModel(TrainConfig(preset="tiny", epochs=1), LRS, BATCH_SIZES, train_size=256)
    tuner = NFNetGridSearch(hypermodel, max_trials=12, directory=str(tmp_path), project_name="grid")
    tuner.search_space_summary()
    out = capsys.readouterr().out
    assert "Default search space size: 2" in out
    assert "lr (Choice)" in out and "'values': [0.001, 0.01, 0.1]" in out
    assert "batch_size (Choice)" in out and "'values': [32, 64, 128, 256]" in out


def test_diverged_trial_stops_at_once_and_reports_no_accuracy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    config = TrainConfig(preset="tiny", epochs=3, schedule="constant", augment="none")
    train = (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    val = (rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 32))
    hypermodel = NFNetHyperModel(config, [1e4], [16], train_size=64, project_dir=str(tmp_path / "grid"))
    tuner = NFNetGridSearch(hypermodel, max_trials=1, directory=str(tmp_path), project_name="grid")
    tuner.search(train=train, val=val, verbose=0)
    (trial,) = tuner.oracle.trials.values()
    assert trial.status == trial_module.TrialStatus.FAILED and is_diverged(trial)
    assert np.isnan(trial.score)
    assert trial.metrics.get_last_value("diverged_epoch") == 1.0  # stopped in epoch 1 of 3
    result = json.loads(_read(os.path.join(tuner.project_dir, f"trial_{trial.trial_id}", "result.json")))
    assert result["diverged"] and result["diverged_at"]["epoch"] == 1
    assert len(result["history"]["loss"]) == 1  # no second epoch
    cells = results_lib.collect(tuner.oracle, [1e4], [16])
    assert cells[(16, 1e4, None)].status == "diverged" and cells[(16, 1e4, None)].val_accuracy is None
    assert "diverged" in results_lib.markdown_table(cells, [1e4], [16])
    # The log counts trials from 1, as KerasTuner's own "Trial #1" does; the trial's id (its folder) is "0".
    out = capsys.readouterr().out
    assert trial.trial_id in ("0", "00")
    assert "] trial 1 starts: lr=10000.0, batch_size=16\n" in out
    assert "Trial 1 (lr 10000.0, batch 16) diverged: the loss became NaN/inf at epoch 1" in out
    assert "trial 0 " not in out.lower()


# === Outputs ===


def _fake_oracle(scores):
    """An object with `.trials` like an oracle's, from {(lr, batch): score or "diverged" or None}."""
    space = keras_tuner.HyperParameters()
    space.Choice("lr", LRS)
    space.Choice("batch_size", BATCH_SIZES)
    trials = {}
    for i, ((lr, b), score) in enumerate(scores.items()):
        hp = space.copy()
        hp.values = {"lr": lr, "batch_size": b}
        trial = trial_module.Trial(hp, trial_id=f"{i:02d}", status="COMPLETED")
        if score == "diverged":
            trial.status = "FAILED"
            trial.metrics.update(DIVERGED, 1.0)
            trial.metrics.update("diverged_epoch", 1.0)
        elif score is None:
            trial.status = "RUNNING"
        else:
            trial.score = score
        trials[trial.trial_id] = trial
    return type("FakeOracle", (), {"trials": trials})()


def test_table_has_the_report_shape_marks_diverged_and_best_hparams_feed_fit(tmp_path):
    report = {32: (0.7988, 0.8365), 64: (0.7354, 0.8501), 128: (0.6576, 0.8423), 256: (0.5454, 0.8136)}
    scores = {}
    for b, (low, mid) in report.items():
        scores.update({(0.001, b): low, (0.01, b): mid, (0.1, b): "diverged"})
    scores[(0.1, 256)] = None  # still running
    cells = results_lib.collect(_fake_oracle(scores), LRS, BATCH_SIZES)
    config = TrainConfig(preset="report_resnet", epochs=40, schedule="constant", agc=0.01)
    paths, table, best = results_lib.write_outputs(cells, LRS, BATCH_SIZES, config, str(tmp_path), "grid")

    assert table.splitlines() == [
        "| batch | lr 0.001 | lr 0.01 | lr 0.1 |",
        "|---|---|---|---|",
        "| 32 | 79.88 | 83.65 | diverged (epoch 1) |",
        "| 64 | 73.54 | **85.01** | diverged (epoch 1) |",
        "| 128 | 65.76 | 84.23 | diverged (epoch 1) |",
        "| 256 | 54.54 | 81.36 | running |",
    ]
    assert "10.14" not in table
    assert _read(paths["csv"]).splitlines() == [
        "batch_size,lr=0.001,lr=0.01,lr=0.1",
        "32,79.88,83.65,diverged",
        "64,73.54,85.01,diverged",
        "128,65.76,84.23,diverged",
        "256,54.54,81.36,running",
    ]
    assert table in _read(paths["markdown"])
    assert os.path.dirname(paths["markdown"]) == str(tmp_path)  # beside the project folder
    assert (best.lr, best.batch_size) == (0.01, 64)
    hparams = json.loads(_read(paths["best"]))
    assert hparams == {"lr": 0.01, "batch_size": 64, "preset": "report_resnet", "agc": 0.01}
    fit_config, _ = fit_cli.parse_config(["--hparams", paths["best"]])
    assert (fit_config.lr, fit_config.batch_size, fit_config.agc, fit_config.epochs) == (0.01, 64, 0.01, 200)


def test_agc_axis_table_rows_csv_and_best_hparams(tmp_path):
    space = keras_tuner.HyperParameters()
    space.Choice("lr", [0.1, 0.4])
    space.Choice("batch_size", [128])
    space.Choice("agc", [0.0, 0.01])
    outcomes = {(0.1, 0.0): 0.52, (0.1, 0.01): 0.55, (0.4, 0.0): "diverged", (0.4, 0.01): 0.61}
    trials = {}
    for i, ((lr, agc), score) in enumerate(outcomes.items()):
        hp = space.copy()
        hp.values = {"lr": lr, "batch_size": 128, "agc": agc}
        trial = trial_module.Trial(hp, trial_id=f"{i:02d}", status="COMPLETED")
        if score == "diverged":
            trial.status = "FAILED"
            trial.metrics.update(DIVERGED, 1.0)
            trial.metrics.update("diverged_epoch", 2.0)
        else:
            trial.score = score
        trials[trial.trial_id] = trial
    oracle = type("FakeOracle", (), {"trials": trials})()
    agcs = (0.0, 0.01)
    cells = results_lib.collect(oracle, [0.1, 0.4], [128], agcs)
    config = TrainConfig(epochs=3, schedule="constant")
    paths, table, best = results_lib.write_outputs(cells, [0.1, 0.4], [128], config, str(tmp_path), "agc",
                                                   agcs=agcs)
    assert table.splitlines() == [
        "| batch | AGC | lr 0.1 | lr 0.4 |",
        "|---|---|---|---|",
        "| 128 | off | 52.00 | diverged (epoch 2) |",
        "| 128 | 0.01 | 55.00 | **61.00** |",
    ]
    assert _read(paths["csv"]).splitlines() == ["batch_size,agc,lr=0.1,lr=0.4", "128,0,52.00,diverged",
                                                "128,0.01,55.00,61.00"]
    assert json.loads(_read(paths["best"])) == {"lr": 0.4, "batch_size": 128, "preset": "report_resnet",
                                                "agc": 0.01}


def test_agc_axis_enters_the_trial_config_and_the_study_record():
    from nfnet_keras.tuner import grid

    config, args = grid.parse_config(["--lrs", "0.1", "--batch-sizes", "64", "--agcs", "0,0.01", "--epochs", "1"])
    record = grid.study_record(config, args)
    assert record["grid"] == {"lr": [0.1], "batch_size": [64], "agc": [0.0, 0.01]}
    assert "agc" not in record["config"]
    model = NFNetHyperModel(config, args.lrs, args.batch_sizes, agcs=args.agcs)
    hp = keras_tuner.HyperParameters()
    hp.values = {"lr": 0.1, "batch_size": 64, "agc": 0.01}
    assert model.trial_config(hp).agc == 0.01
    hp.values = {"lr": 0.1, "batch_size": 64, "agc": 0.0}
    assert model.trial_config(hp).agc == 0.0
    fixed = NFNetHyperModel(dataclasses.replace(config, agc=0.02), args.lrs, args.batch_sizes)
    assert fixed.trial_config(hp).agc == 0.02  # not an axis: the fixed --agc


def test_cli_rejects_bad_flags_and_changed_settings_on_resume(tmp_path, capsys):
    from nfnet_keras.tuner import grid

    with pytest.raises(SystemExit):
        grid.parse_config(["--lrs", "0.1,abc"])
    assert "--lrs takes comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.parse_config(["--batch-sizes", "32,32"])
    assert "distinct positive finite numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.parse_config(["--lrs", "nan"])
    assert "--lrs takes distinct positive finite numbers, got 'nan'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.parse_config(["--lrs", "-0.1,0.1"])
    assert "--lrs takes distinct positive finite numbers, got '-0.1,0.1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.parse_config(["--agcs", "0,-1"])
    assert "--agcs takes distinct non-negative finite numbers" in capsys.readouterr().err

    config, args = grid.parse_config(["--epochs", "2"])
    project = tmp_path / "grid"
    project.mkdir()
    (project / "study.json").write_text(json.dumps(grid.study_record(config, args)))
    grid.check_study(str(project), grid.study_record(config, args))  # same settings: fine
    config, args = grid.parse_config(["--epochs", "3", "--lrs", "0.01"])
    with pytest.raises(ValueError, match=r"other settings \(epochs, lr differ\).*--overwrite"):
        grid.check_study(str(project), grid.study_record(config, args))


def test_cli_shares_fits_flags_and_defaults_but_the_grids(capsys):
    from nfnet_keras import fit
    from nfnet_keras.tuner import grid

    config, _ = grid.parse_config(["--override", "depths=(1,1,1)", "--override", "activation=gelu", "--nesterov"])
    assert config.overrides == {"depths": (1, 1, 1), "activation": "gelu"} and config.nesterov
    assert (config.schedule, config.epochs, config.lr, config.batch_size) == ("constant", 40, 0.001, 32)
    fit_config, _ = fit.parse_config([])
    assert fit_config.schedule == "step" and fit_config.epochs == 200
    shared = ["--momentum", "0.8", "--weight-decay", "1e-3", "--label-smoothing", "0.1", "--agc", "0.02",
              "--augment", "standard", "--precision", "mixed_bfloat16", "--seed", "7", "--val-size", "100",
              "--no-jit", "--train-limit", "500"]
    a, b = grid.parse_config(shared)[0].to_dict(), fit.parse_config(shared)[0].to_dict()
    for key in ("momentum", "weight_decay", "label_smoothing", "agc", "augment", "precision", "seed",
                "val_size", "jit", "train_limit"):
        assert a[key] == b[key], key
    with pytest.raises(SystemExit):
        grid.parse_config(["--override", "widths=(8,8)"])  # 2 widths for 3 depths
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and "widths" in err


# === End to end: `python -m tuner.grid` in subprocesses ===


def _tensorboard_tags(folder):
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_cli_kill_and_resume_then_table_hparams_and_tensorboard(backend, tmp_path, tiny_cifar):
    args = [*TINY, "--lrs", "0.01,1000", "--data-dir", tiny_cifar, "--directory", str(tmp_path),
            "--project-name", "grid"]
    project = tmp_path / "grid"
    first = _start(args, tmp_path / "first.log", module="tuner.grid", KERAS_BACKEND=backend)  # the checkout's command
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and first.poll() is None:
            if _recorded_finished(project):
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed:\n" + _read(tmp_path / "first.log")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _kill(first)
    done_before = _recorded_finished(project)
    assert 1 <= len(done_before) < 4

    log = _run_to_the_end(args, tmp_path / "second.log", KERAS_BACKEND=backend)
    trials = _trials(project)
    values = [(t["hyperparameters"]["values"]["lr"], t["hyperparameters"]["values"]["batch_size"])
              for t in trials.values()]
    assert len(trials) == 4 and sorted(values) == [(0.01, 32), (0.01, 64), (1000.0, 32), (1000.0, 64)]
    assert all(t["status"] in ("COMPLETED", "FAILED") for t in trials.values())
    rerun = {trial_id for _, trial_id in _started(log)}
    assert not rerun & done_before  # finished trials were not run again
    assert "Reloading Tuner" in log and "4 of 4 trials finished (2 diverged, 0 failed)." in log
    assert f"Keras backend {backend}; {len(done_before)} finished, {4 - len(done_before)} to run." in log

    # The table, the CSV and best_hparams.json, beside the project folder.
    assert "| 32 | " in log and "diverged (epoch 1)" in log
    assert _read(tmp_path / "grid_results.csv").splitlines()[1].endswith(",diverged")
    best = json.loads(_read(tmp_path / "grid_best_hparams.json"))
    assert best["lr"] == 0.01 and best["batch_size"] in (32, 64) and best["preset"] == "tiny"
    # TensorBoard: one log dir per trial, loss/accuracy scalars, the HParams dashboard.
    logs = project / "logs"
    trial_dirs = sorted(os.listdir(logs / t / "execution0") for t in trials if (logs / t).is_dir())
    assert len(trial_dirs) == 4
    finished = next(t for t, s in trials.items() if s["status"] == "COMPLETED")
    tags = _tensorboard_tags(str(logs / finished / "execution0"))
    assert {"epoch_loss", "epoch_accuracy", "_hparams_/session_start_info"} <= tags
    assert "_hparams_/experiment" in _tensorboard_tags(str(logs))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch"])  # JAX: test_cli_kill_and_resume_then_table_hparams_and_tensorboard
def test_cli_grid_runs_under_another_backend(backend, tmp_path, tiny_cifar):
    """A 2 x 1 grid under PyTorch: every trial once, the tables, one TensorBoard run per trial."""
    args = [*TINY, "--batch-sizes", "32", "--lrs", "0.01,0.02", "--data-dir", tiny_cifar,
            "--directory", str(tmp_path), "--project-name", "grid"]
    log = _run_to_the_end(args, tmp_path / "grid.log", KERAS_BACKEND=backend)
    assert f"preset tiny, Keras backend {backend}; 0 finished, 2 to run." in log
    trials = _trials(tmp_path / "grid")
    assert sorted(t["hyperparameters"]["values"]["lr"] for t in trials.values()) == [0.01, 0.02]
    assert all(t["status"] == "COMPLETED" for t in trials.values())
    assert sorted(trial_id for _, trial_id in _started(log)) == sorted(trials)  # each trial ran once
    assert "2 of 2 trials finished (0 diverged, 0 failed)." in log
    assert _read(tmp_path / "grid_results.csv").splitlines()[0] == "batch_size,lr=0.01,lr=0.02"
    assert json.loads(_read(tmp_path / "grid_best_hparams.json"))["preset"] == "tiny"
    # KerasTuner moves TensorBoard into per-trial runs only under TensorFlow; NFNetGridSearch always does.
    logs = tmp_path / "grid" / "logs"
    assert sorted(os.listdir(logs)) == sorted(trials)
    for trial_id in trials:
        tags = _tensorboard_tags(str(logs / trial_id / "execution0"))
        assert {"epoch_loss", "epoch_accuracy", "_hparams_/session_start_info"} <= tags


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_cli_refuses_a_directory_that_is_a_file_in_one_line(where, tmp_path, capsys):
    from nfnet_keras.tuner import grid

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    directory = blocker if where == "file" else blocker / "tuner"
    assert grid.main(["--directory", str(directory), "--epochs", "1"]) == exits.BAD_INPUT == 2
    assert capsys.readouterr().err == (
        f"error: --directory {directory}: {blocker} is a file, not a folder; give a folder to write the search in.\n")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert grid.main(["--directory", str(tmp_path / "ok"), "--tensorboard-dir", str(directory)]) == 2
    assert capsys.readouterr().err == (
        f"error: --tensorboard-dir {directory}: {blocker} is a file, not a folder; give a folder to write the "
        "search in.\n")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_cli_refuses_a_batch_size_larger_than_the_training_set(tmp_path, synthetic_cifar_dir, capsys):
    from nfnet_keras.tuner import grid

    argv = ["--preset", "tiny", "--epochs", "1", "--lrs", "0.01", "--batch-sizes", "32,128", "--train-limit", "64",
            "--val-size", "32", "--data-dir", synthetic_cifar_dir, "--directory", str(tmp_path / "t")]
    assert grid.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --batch-sizes 128 is larger than the training set (64 images); lower --batch-sizes or train on "
        "more images (--train-limit, --val-size).\n")
    assert os.listdir(tmp_path) == []


def test_cli_help_names_the_command_typed_and_every_flag_has_help(monkeypatch, capsys):
    from nfnet_keras.tuner import grid

    monkeypatch.setattr(sys, "argv", ["/home/u/nfnet-keras/.venv/bin/nfnet-grid", "--help"])
    with pytest.raises(SystemExit):
        grid.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: nfnet-grid [-h]")
    flat = " ".join(text.split())
    assert "--project-name PROJECT_NAME the search's folder under --directory" in flat
    assert "(default: None)" not in flat
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one per flag
    assert len(entries) > 3 and all(entry.count("(default") <= 1 for entry in entries), entries
    assert all(action.help for action in grid.build_parser()._actions)
    alias = subprocess.run([sys.executable, "-m", "tuner.grid", "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert alias.returncode == 0 and alias.stdout.startswith("usage: python -m tuner.grid [-h]")
