"""Long runs that survive people: resume identity, locks, interrupts, leftovers, full disks, bad input."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from nfnet_keras import evaluate, exits, fileio, fit, predict, rundir
from nfnet_keras.callbacks import CheckpointError, EpochCheckpoint
from nfnet_keras.config import TrainConfig
from nfnet_keras.export import stale_exports
from nfnet_keras.preemption import StepCheckpoint

from conftest import checkout_env, ctrl_c_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--val-size", "64", "--quiet", "--no-export"]


def run_fit(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _last_line(text):
    return text.strip().splitlines()[-1]


# === Checkpoints: atomic, with a fallback, and a full disk named ===


def _tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


DATA = (np.random.default_rng(0).normal(size=(32, 4)).astype("float32"),
        np.random.default_rng(1).normal(size=(32, 3)).astype("float32"))


def _fit(model, folder, epochs):
    checkpoint = EpochCheckpoint(str(folder))
    history = model.fit(*DATA, batch_size=8, epochs=epochs, callbacks=[checkpoint], verbose=0)
    return checkpoint, history


def test_checkpoint_resumes_at_the_next_epoch_with_the_saved_weights(tmp_path):
    """Pins the private BackupAndRestore hooks EpochCheckpoint overrides (Keras 3.15): if `_save_model`,
    `_load_model`, `_current_epoch` or `model._initial_epoch` change meaning, this fails."""
    first = _tiny_model()
    _fit(first, tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["epoch-0001", "epoch-0002"]  # the newest two are kept
    saved = [np.array(w) for w in first.weights]
    saved_momenta = [np.array(v) for v in first.optimizer.variables]
    second = _tiny_model()
    seen = {}

    class AfterRestore(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["momenta"] = [np.array(v) for v in self.model.optimizer.variables]

    checkpoint = EpochCheckpoint(str(tmp_path))
    history = second.fit(*DATA, batch_size=8, epochs=3, callbacks=[checkpoint, AfterRestore()], verbose=0)
    assert checkpoint.restored_epoch == 2
    assert history.epoch == [2]  # only the third epoch ran
    assert len(seen["momenta"]) == len(saved_momenta) == 4  # iterations, lr, two momenta: restored too
    for a, b in zip(saved_momenta, seen["momenta"]):
        np.testing.assert_array_equal(a, b)
    _, history = _fit(_tiny_model(), tmp_path, 3)
    assert history.epoch == []  # all done: nothing runs
    restored = _tiny_model()
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(os.path.join(tmp_path, "epoch-0002", "model.weights.h5"))
    for a, b in zip(saved, restored.weights):
        np.testing.assert_array_equal(a, np.array(b))


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    _fit(_tiny_model(), tmp_path, 2)
    newest = tmp_path / "epoch-0002" / "model.weights.h5"
    newest.write_bytes(newest.read_bytes()[:100])
    checkpoint, history = _fit(_tiny_model(), tmp_path, 3)
    out = capsys.readouterr().out
    assert f"note: checkpoint {newest} is unreadable; trying the one before." in out
    assert checkpoint.restored_epoch == 1 and history.epoch == [1, 2]


def test_no_readable_checkpoint_names_the_files_and_what_to_do(tmp_path):
    _fit(_tiny_model(), tmp_path, 2)
    for name in ("epoch-0001", "epoch-0002"):
        (tmp_path / name / "model.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*epoch-0002.*Delete that folder"):
        _fit(_tiny_model(), tmp_path, 3)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    model = _tiny_model()
    _fit(model, tmp_path, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_weights", no_space)
    with pytest.raises(fileio.WriteError, match=r"^no space left on device writing .*epoch-0002; free space and "
                                                r"rerun to resume$"):
        _fit(model, tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["epoch-0001"]  # no temporary, the previous one intact
    assert EpochCheckpoint(str(tmp_path)).latest_epoch() == 1


def test_atomic_write_keeps_the_old_file_on_a_write_error(tmp_path):
    path = tmp_path / "metrics.json"
    fileio.write_json(str(path), {"a": 1})
    with pytest.raises(fileio.WriteError, match="no space left on device writing"):
        with fileio.atomic_write(str(path)) as f:
            f.write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["metrics.json"]


# === One process per run, and leftovers of dead ones ===


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _hold_lock(folder):
    """A process holding `rundir.locked(folder)` until killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from nfnet_keras import rundir\n"
        "with rundir.locked(sys.argv[2]):\n    print('locked', flush=True); time.sleep(60)"),
        ROOT, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_admits_one_holder_and_names_it(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(rundir.RunBusy, match=rf"is in use by process {holder.pid}; wait for it"):
            with rundir.locked(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with rundir.locked(str(tmp_path)):  # released when its holder died
        pass


def test_stale_temporaries_of_dead_processes_are_found_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    (tmp_path / "checkpoints").mkdir()
    stale_dir = tmp_path / "checkpoints" / f".tmp-{dead}"
    stale_dir.mkdir()
    stale_file = tmp_path / f".tmp-{dead}-model.keras"
    stale_file.write_text("partial")
    mine = tmp_path / f".tmp-{os.getpid()}-metrics.json"
    mine.write_text("{}")
    removed = rundir.remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted([str(stale_dir), str(stale_file)])
    assert not stale_dir.exists() and not stale_file.exists() and mine.exists()


def test_stale_export_temporaries_are_found(tmp_path):
    (tmp_path / f".export-tmp-{_dead_pid()}-abc").mkdir()
    (tmp_path / f".export-tmp-{os.getpid()}-def").mkdir()
    (tmp_path / "1").mkdir()
    assert [os.path.basename(p) for p in stale_exports(str(tmp_path))] == [
        n for n in os.listdir(tmp_path) if n.startswith(".export-tmp-") and str(os.getpid()) not in n]


# === What identifies a run ===


def test_the_data_location_does_not_change_the_run_it_resumes(tmp_path):
    config = TrainConfig(preset="tiny", epochs=3, data_dir="/data/a").validate()
    run = tmp_path / "runs" / "20260101-000000"
    run.mkdir(parents=True)
    rundir.write_record(str(run), config, "abc")
    moved = TrainConfig(preset="tiny", epochs=3, data_dir="/elsewhere/b").validate()
    assert rundir.default_run_dir(moved, root=str(tmp_path / "runs")) == str(run)
    rundir.check_run_dir(str(run), moved)  # no "different config"
    with pytest.raises(ValueError, match="was trained on other data"):
        rundir.check_data(str(run), "def")


def test_a_near_miss_unfinished_run_is_named_with_how_to_resume_it(tmp_path):
    root = tmp_path / "runs"
    run = root / "20260101-000000"
    run.mkdir(parents=True)
    rundir.write_record(str(run), TrainConfig(preset="tiny", epochs=3).validate(), "abc")
    said = []
    new = rundir.default_run_dir(TrainConfig(preset="tiny", epochs=5).validate(), root=str(root), say=said.append)
    assert new != str(run)
    assert said == [f"note: {run} is an unfinished run that differs only in epochs=3; to resume it, rerun with "
                    f"--run-dir {run} and those settings."]


# === Every bad input: one line, exit 2, nothing written ===


@pytest.mark.parametrize(
    "content, message",
    [
        ({"batch_size": 64.5}, 'h.json: key "batch_size" must be an integer, got 64.5 (float)'),
        ({"batch_size": True}, 'h.json: key "batch_size" must be an integer, got True (bool)'),
        ({"lr": [0.1]}, 'h.json: key "lr" must be a finite number, got [0.1] (list)'),
        ({"nesterov": 1}, 'h.json: key "nesterov" must be true or false, got 1 (int)'),
        ([0.01, 64], "must hold a JSON object of settings, got a list"),
        ({"overrides": [1]}, '"overrides" must be an object of preset keys'),
    ],
)
def test_hparams_fields_are_type_checked(content, message, tmp_path, capsys):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exit_info:
        fit.parse_config(["--hparams", str(path), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in _last_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == ["h.json"]


def test_predict_refuses_an_empty_array_and_an_unwritable_out_before_the_work(tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 32, 32, 3), np.uint8))
    assert predict.main(["--model", "m.keras", "--images", str(empty), "--out", str(tmp_path / "o.npy")]) == 2
    assert "holds no images (an empty array); give at least one." in _last_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model", "m.keras", "--images", str(empty), "--out", str(tmp_path / "missing" / "o.csv")])
    assert exit_info.value.code == 2
    assert f"folder {tmp_path / 'missing'} does not exist" in _last_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["empty.npy"]


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_evaluate_refuses_a_limit_below_one(limit, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "m.keras", "--limit", limit])
    assert exit_info.value.code == 2
    assert f"--limit must be >= 1 (the number of test images), got {limit}." in capsys.readouterr().err


def test_evaluate_checks_its_json_folder_before_the_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "m.keras", "--json", str(tmp_path / "missing" / "e.json")])
    assert exit_info.value.code == 2
    assert f"folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_a_data_folder_without_test_batch_names_the_file(tmp_path, synthetic_cifar_dir):
    import shutil

    from nfnet_keras.data import DataError, load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(os.path.join(synthetic_cifar_dir, "cifar-10-batches-py"), folder)
    os.remove(folder / "test_batch")
    with pytest.raises(DataError, match=r"lacks CIFAR-10 batch file\(s\) test_batch; copy them there"):
        load_cifar10(str(tmp_path))


def test_evaluate_reads_only_the_test_batch(tmp_path, synthetic_cifar_dir):
    import shutil

    from nfnet_keras.data import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(os.path.join(synthetic_cifar_dir, "cifar-10-batches-py"), folder)
    (folder / "data_batch_3").write_bytes(b"corrupt")
    train, (x, y) = load_cifar10(str(tmp_path), test_only=True)
    assert train is None and x.ndim == 4 and len(x) == len(y) > 0


# === End to end, in subprocesses ===


@pytest.mark.slow
def test_ctrl_c_exits_130_saying_how_to_resume_then_resumes(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, "--epochs", "30", "--batch-size", "16", "--data-dir", synthetic_cifar_dir, "--run-dir",
            str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_enabled)
    deadline = time.time() + 240
    try:
        while not (run_dir / "checkpoints" / "epoch-0001").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == exits.INTERRUPTED
    # Checkpointed at the step where it stopped: in epoch 2 (or at an epoch's end, after validation).
    done, step = StepCheckpoint(str(run_dir / "checkpoints")).newest()
    steps = -(-(1000 - 64) // 16)  # the synthetic training images, less the validation ones, in batches of 16
    where = f" and step {step} of {steps} of epoch {done + 1}" if step else ""
    assert _last_line(err) == f"Interrupted after epoch {done} of 30{where}; rerun the same command to resume."
    assert "Traceback" not in err
    result = run_fit([*args[:args.index("--epochs") + 1], str(done + 1), *args[args.index("--epochs") + 2:]])
    assert result.returncode == 2  # other epochs: refused, not silently restarted
    assert "differ" in _last_line(result.stderr)


@pytest.mark.slow
def test_a_second_process_on_the_same_run_exits_5_naming_the_first(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, "--epochs", "30", "--batch-size", "16", "--data-dir", synthetic_cifar_dir, "--run-dir",
            str(run_dir)]
    first = subprocess.Popen([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run_dir / "history.csv").exists() and not (run_dir / "checkpoints").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_fit(args)
        assert second.returncode == exits.ENVIRONMENT
        assert _last_line(second.stderr) == (f"error: {run_dir} is in use by process {first.pid}; wait for it to "
                                             "finish (or stop it), or use another --run-dir.")
    finally:
        first.kill()
        first.wait()
    with open(run_dir / "history.csv") as f:
        assert sum(line.startswith("epoch,") for line in f) <= 1


@pytest.mark.slow
def test_same_flags_with_the_data_elsewhere_resume_the_same_run(tmp_path, synthetic_cifar_dir):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(synthetic_cifar_dir, moved)
    runs = tmp_path / "runs"
    base = [*TINY, "--epochs", "2", "--batch-size", "64"]
    env = checkout_env(NFNET_DATA_DIR=synthetic_cifar_dir)
    # A first process trains epoch 1 of 2, then "crashes" (a finished run has metrics.json: remove it and
    # the last checkpoint to leave an unfinished run behind).
    first = subprocess.run([sys.executable, "-m", "nfnet_keras.fit", *base], cwd=str(tmp_path), env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = os.listdir(runs)
    os.remove(runs / run / "metrics.json")
    shutil.rmtree(runs / run / "checkpoints" / "epoch-0002")
    again = subprocess.run([sys.executable, "-m", "nfnet_keras.fit", *base, "--data-dir", str(moved)],
                           cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert os.listdir(runs) == [run]
    assert "(epoch 1 complete)" in again.stdout


def test_full_disk_during_an_export_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    from nfnet_keras import build_model
    from nfnet_keras import saved_model as export

    def no_space(model, path, class_names):
        os.makedirs(os.path.join(path, "variables"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write_saved_model", no_space)
    with pytest.raises(fileio.WriteError, match=r"^no space left on device writing .*tiny/1; free space"):
        export.export_saved_model(build_model("tiny"), "tiny", base_dir=str(tmp_path))
    assert os.listdir(tmp_path / "tiny") == []  # no version, no temporary


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import collections
    import shutil

    from nfnet_keras import build_model
    from nfnet_keras import saved_model as export

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(fileio.WriteError, match=r"MB free\); free space and rerun to resume$"):
        export.export_saved_model(build_model("tiny"), "tiny", base_dir=str(tmp_path))
    assert os.listdir(tmp_path / "tiny") == []


# === What a user reads ===


def test_help_shows_every_default_and_the_presets_without_tensorflow_noise():
    result = subprocess.run([sys.executable, "-m", "nfnet_keras.fit", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "NFNET_VERBOSE"})
    assert result.returncode == 0
    assert result.stderr == ""  # no absl / oneDNN / cuInit lines
    text = " ".join(result.stdout.split())
    for default in ("training epochs (default: 200)", "images per step (default: 64)", "SGD momentum (default: 0.9)",
                    "(default: float32)", "(default: 0)", "report_resnet, cifar_wide, tiny"):
        assert default in text, default


def test_epoch_timer_estimates_the_rest_of_the_run(capsys):
    from nfnet_keras.callbacks import EpochTimer

    model = _tiny_model()
    model.fit(*DATA, batch_size=8, epochs=3, callbacks=[EpochTimer(total_epochs=3)], verbose=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    assert [line.split(";")[0] for line in lines] == ["Epoch 1 of 3 done", "Epoch 2 of 3 done"]
    assert "left (2 epoch(s) at" in lines[0] and "left (1 epoch(s) at" in lines[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--override", "group_width=0"], "group_width must be a positive int or None, got 0."),
        (["--override", "final_conv_multiplier=-1"], "final_conv_multiplier must be a number >= 0"),
        (["--override", "beta=mean"], "beta must be one of 'std', 'var', got 'mean'."),
    ],
)
def test_bad_preset_overrides_exit_2_before_anything_is_written(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit.parse_config([*argv, "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in _last_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_missing_data_exits_2_without_creating_the_run_dir(tmp_path, monkeypatch, capsys):
    from nfnet_keras import data

    monkeypatch.setattr(data, "_reachable", lambda host, timeout=5.0: False)
    code = fit.main([*TINY, "--data-dir", str(tmp_path / "nowhere"), "--tfds-dir", str(tmp_path / "tfds"),
                     "--run-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2 and _last_line(captured.err) == (
        f"error: --data-dir {tmp_path / 'nowhere'}: no such folder; expected the folder holding cifar-10-batches-py/ "
        "(data_batch_1-5, test_batch) or cifar-10-python.tar.gz. Point it there, or give no folder to use "
        "TensorFlow Datasets.")
    assert "Run directory" not in captured.out and not (tmp_path / "run").exists()


def test_export_names_a_savedmodel_given_as_model(tmp_path, capsys):
    from nfnet_keras import export

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--model", str(tmp_path / "1"), "--name", "nfnet", "--base-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "is a SavedModel already; export takes the .keras file written by fit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_grid_search_on_the_same_project_exits_5(tmp_path, synthetic_cifar_dir, capsys):
    from nfnet_keras.tuner import grid

    project = tmp_path / "grid"
    holder = _hold_lock(project)
    try:
        code = grid.main(["--preset", "tiny", "--epochs", "1", "--lrs", "0.01", "--batch-sizes", "32",
                          "--train-limit", "64", "--val-size", "32", "--data-dir", synthetic_cifar_dir,
                          "--directory", str(tmp_path), "--project-name", "grid", "--quiet"])
    finally:
        holder.kill()
        holder.wait()
    assert code == exits.ENVIRONMENT == 5
    assert _last_line(capsys.readouterr().err) == (f"error: {project} is in use by process {holder.pid}; wait for "
                                                   "it to finish (or stop it), or use another --project-name.")
    assert sorted(os.listdir(project)) == [".lock"]  # no study, no trials


def test_usage_lines_name_the_command_as_it_was_typed(monkeypatch):
    import types

    from nfnet_keras.console import prog

    monkeypatch.setattr(sys, "argv", ["/home/u/nfnet-keras/.venv/bin/nfnet-fit", "--help"])
    assert prog("nfnet_keras.fit") == "nfnet-fit"
    for spec_name, shown in (("nfnet_keras.fit", "nfnet_keras.fit"), ("tuner.grid", "tuner.grid"),
                             ("somepkg.__main__", "somepkg")):
        main_module = types.ModuleType("__main__")
        main_module.__spec__ = types.SimpleNamespace(name=spec_name)
        monkeypatch.setitem(sys.modules, "__main__", main_module)
        monkeypatch.setattr(sys, "argv", [f"/src/{spec_name.replace('.', '/')}.py", "--help"])
        assert prog("nfnet_keras.fit") == f"python -m {shown}"
    main_module.__spec__ = None  # `python nfnet_keras/fit.py`: the module it stands for
    assert prog("nfnet_keras.fit") == "python -m nfnet_keras.fit"
