"""`python -m nfnet_keras.fit`, evaluate and predict, end to end on small slices of real CIFAR-10."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import nfnet_keras as nk
from nfnet_keras import data, evaluate, exits, fit, predict, training
from nfnet_keras.config import TrainConfig
from nfnet_keras.contract import CLASS_NAMES
from nfnet_keras.data import load_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--val-size", "128", "--quiet"]


def run_fit(args, timeout=300, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "nfnet_keras.fit", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_dir):
    """A 2-epoch run of the tiny preset on 512 real images, exported."""
    base = tmp_path_factory.mktemp("fit")
    run_dir, export_dir = base / "run", base / "saved_models"
    result = run_fit([*TINY, "--epochs", "2", "--train-limit", "512", "--run-dir", str(run_dir),
                      "--export-name", "tiny", "--export-dir", str(export_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, export_dir, result


@pytest.mark.slow
def test_fit_writes_metrics_model_logs_and_export(finished_run):
    run_dir, export_dir, result = finished_run
    metrics = read_json(run_dir / "metrics.json")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert f"Test accuracy: {metrics['test_accuracy']:.4f}" in result.stdout
    assert 0.0 <= metrics["test_accuracy_flip_tta"] <= 1.0
    assert f"flip test-time augmentation: {metrics['test_accuracy_flip_tta']:.4f}" in result.stdout
    assert metrics["epochs_completed"] == 2 and metrics["diverged"] is False
    assert len(metrics["history"]["val_accuracy"]) == 2
    assert [s["block"] for s in metrics["signal_propagation"]["end"]] == ["stage1_block1", "stage2_block1"]
    assert (run_dir / "model.keras").is_file()
    assert os.path.isfile(os.path.join(export_dir, "tiny", "1", "saved_model.pb"))
    # TensorBoard: the HParams session (with the signal-propagation plot) in logs/fit, its
    # train/validation/test runs below it, nothing at the root (tests/test_tensorboard.py reads them).
    logs = run_dir / "logs"
    assert os.listdir(logs) == ["fit"]
    for sub in ("fit", "fit/train", "fit/validation", "fit/test"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(logs / sub)), sub
    assert (logs / "fit" / "signal_propagation.json").is_file()


@pytest.mark.slow
def test_same_command_on_a_finished_run_dir_refuses(finished_run, cifar_dir):
    run_dir, _, _ = finished_run
    result = run_fit([*TINY, "--epochs", "2", "--train-limit", "512", "--run-dir", str(run_dir), "--no-export"])
    assert result.returncode == 2
    assert "holds a finished run" in result.stderr


@pytest.mark.slow
def test_kill_mid_epoch_then_resume(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, "--epochs", "4", "--batch-size", "16", "--train-limit", "800", "--run-dir", str(run_dir),
            "--no-export", "--data-dir", synthetic_cifar_dir]
    proc = subprocess.Popen([sys.executable, "-m", "nfnet_keras.fit", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (run_dir / "checkpoints" / "epoch-0002").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no second epoch within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # during epoch 3
    finally:
        proc.kill()
        proc.wait()
    killed_at = max(int(p.split("-")[1]) for p in os.listdir(run_dir / "checkpoints") if p.startswith("epoch-"))
    assert 2 <= killed_at < 4 and not (run_dir / "metrics.json").exists()

    result = run_fit(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(epoch {killed_at} complete)" in result.stdout
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["history"]["epoch"] == [0, 1, 2, 3]  # each epoch once
    assert metrics["epochs_completed"] == 4
    assert len(metrics["seconds_per_epoch"]) == 4 - killed_at  # only the rest ran again


@pytest.mark.slow
def test_divergence_stops_records_and_exits_nonzero(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    result = run_fit([*TINY, "--epochs", "3", "--lr", "1e6", "--train-limit", "512", "--run-dir", str(run_dir),
                      "--data-dir", synthetic_cifar_dir])
    assert result.returncode == exits.DIVERGED
    assert "diverged" in result.stderr and "--agc" in result.stderr and "lower --lr" in result.stderr
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["diverged"] is True and metrics["test_accuracy"] is None
    assert metrics["diverged_at"]["epoch"] == 1  # stopped at once, not after 3 epochs
    assert not (run_dir / "model.keras").exists()


@pytest.mark.slow
def test_deterministic_runs_give_bitwise_identical_weights(tmp_path, synthetic_cifar_dir):
    weights = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        result = run_fit([*TINY, "--epochs", "1", "--train-limit", "256", "--deterministic", "--seed", "7",
                          "--run-dir", str(run_dir), "--no-export", "--data-dir", synthetic_cifar_dir])
        assert result.returncode == 0, result.stderr[-3000:]
        model = keras.saving.load_model(run_dir / "model.keras", compile=False)
        weights.append([np.asarray(w) for w in model.weights])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(w).sum() for w in weights[0])


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path, synthetic_cifar_dir):
    run_dir = tmp_path / "run"
    # Also the one-hot label path of --label-smoothing, and the EMA weights' BatchNorm statistics recomputed
    # across the replicas' variables, under the strategy.
    result = run_fit([*TINY, "--epochs", "1", "--train-limit", "256", "--strategy", "mirrored", "--jit",
                      "--label-smoothing", "0.1", "--norm", "batch", "--ema", "0.9", "--bn-recalibrate", "64",
                      "--run-dir", str(run_dir), "--no-export", "--data-dir", synthetic_cifar_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras#19005" in result.stdout  # --jit is dropped under the strategy, with a note
    assert read_json(run_dir / "metrics.json")["test_accuracy"] is not None
    # The saved model holds the statistics recomputed for its (averaged) weights from the first 64 images.
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    saved = nk.models.batchnorm_statistics(model)
    x_train = training.load_data(TrainConfig(val_size=128, train_limit=256, data_dir=synthetic_cifar_dir)).train[0][:64]
    nk.models.recompute_batchnorm_statistics(model, np.asarray(data.preprocess(x_train)), 64)
    for (mean, var), (mean2, var2) in zip(saved, nk.models.batchnorm_statistics(model), strict=True):
        np.testing.assert_allclose(mean, mean2, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, var2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--preset", "resnet"], "Unknown preset 'resnet'"),
        (["--override", "depth=3"], "Unknown override(s) 'depth'"),
        (["--schedule", "linear"], "invalid choice: 'linear'"),
        (["--ema", "1"], "--ema must be in [0, 1)"),
        (["--norm", "layer"], "invalid choice: 'layer'"),
        (["--tta", "rotate"], "invalid choice: 'rotate'"),
        (["--augment", "altflip"], "invalid choice: 'altflip'"),
        (["--conv-init", "orthogonal"], "invalid choice: 'orthogonal'"),
        (["--preset", "tiny_speed", "--whitening-bias-epochs", "-1"], "--whitening-bias-epochs must be >= 0"),
        (["--preset", "tiny", "--whitening-bias-epochs", "3"], "needs a network with a whitening stem"),
        (["--preset", "tiny_speed", "--data-init", "-1"], "--data-init must be >= 0 (training images; 0: off)"),
        (["--preset", "tiny", "--data-init", "64"], "--data-init initializes the speed network without normalization "
                                                    "(e.g. --preset cifar_speed --norm none); got --preset tiny --norm "
                                                    "none."),
        (["--preset", "tiny_speed", "--norm", "batch", "--data-init", "64"], "got --preset tiny_speed --norm batch."),
        (["--preset", "tiny_speed", "--data-init", "64", "--init-from", "m.keras"],
         "--data-init and --init-from both set the starting weights; give one of them."),
        (["--weight-decay-mode", "l2"], "invalid choice: 'l2'"),
        (["--bn-momentum", "0.4"], "--bn-momentum and --bn-epsilon set the BatchNorm twin's layers: add --norm "
                                   "batch, or drop them."),
        (["--norm", "batch", "--bn-momentum", "1"], "--bn-momentum must be in [0, 1), got 1.0"),
        (["--norm", "batch", "--bn-epsilon", "0"], "--bn-epsilon must be > 0, got 0.0"),
        (["--bias-lr-mult", "-0.5"], "--bias-lr-mult must be >= 0 (0 freezes the group), got -0.5"),
        (["--head-lr-mult", "-1"], "--head-lr-mult must be >= 0 (0 freezes the group), got -1.0"),
        (["--lookahead", "-1"], "--lookahead must be >= 0"),
        (["--lookahead-alpha", "0"], "--lookahead-alpha must be in (0, 1], got 0.0"),
        (["--lookahead-schedule", "cubic"], "invalid choice: 'cubic'"),
        (["--optimizer", "adam"], "invalid choice: 'adam'"),
        (["--kernel-lr", "0"], "--kernel-lr must be a positive number, got 0.0"),
        (["--kernel-momentum", "1"], "--kernel-momentum must be in [0, 1), got 1.0"),
        (["--optimizer", "muon", "--schedule", "triangle", "--kernel-peak-pct", "1"],
         "--kernel-peak-pct must be in (0, 1), got 1.0"),
        (["--schedule", "triangle", "--kernel-peak-pct", "0.5"],
         "--kernel-peak-pct moves the peak of the conv kernels' own triangle lr: it needs --schedule triangle and "
         "--optimizer muon or renorm_sgd, got --schedule triangle --optimizer sgd (or drop --kernel-peak-pct)."),
        (["--optimizer", "muon", "--kernel-peak-pct", "0.5"],
         "it needs --schedule triangle and --optimizer muon or renorm_sgd, got --schedule step --optimizer muon"),
        (["--norm", "batch", "--ema", "0.9", "--bn-recalibrate", "-1"],
         "--bn-recalibrate must be >= 0 (0 disables it), got -1"),
        (["--norm", "batch", "--bn-recalibrate", "512"],
         "--bn-recalibrate recomputes the BatchNorm statistics of the EMA weights: it needs --ema and --norm batch, "
         "got --ema 0 --norm batch (or drop --bn-recalibrate)."),
        (["--ema", "0.9", "--bn-recalibrate", "512"], "got --ema 0.9 --norm none (or drop --bn-recalibrate)."),
        (["--muon-ns-steps", "0"], "--muon-ns-steps must be >= 1, got 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0 (steps; 0: only at epoch ends), got -1"),
        (["--checkpoint-every", "2.5"], "argument --checkpoint-every: invalid int value: '2.5'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        fit.parse_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_bad_export_name_is_refused_before_training(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit.parse_config(["--export-name", "my model"])
    assert exit_info.value.code == 2
    assert "Model name 'my model' is not valid" in capsys.readouterr().err
    config, _ = fit.parse_config(["--export-name", "my model", "--no-export"])  # not exported: no check
    assert config == TrainConfig()


def test_fast_recipe_sets_its_defaults_and_hparams_and_flags_win(tmp_path):
    config, _ = fit.parse_config(["--recipe", "fast"])
    assert (config.epochs, config.batch_size, config.lr, config.schedule, config.nesterov) == (
        20, 128, 0.1, "onecycle", True)
    assert (config.weight_decay, config.label_smoothing, config.augment, config.val_size) == (
        5e-4, 0.1, "standard", 1000)
    assert config.preset == "report_resnet" and config.overrides == {"shortcut_pool": True}
    config, _ = fit.parse_config(["--recipe", "fast", "--override", "shortcut_pool=False"])
    assert config.overrides == {"shortcut_pool": False}
    config, _ = fit.parse_config(["--recipe", "fast", "--lr", "0.05", "--no-nesterov", "--epochs", "30"])
    assert (config.lr, config.nesterov, config.epochs, config.batch_size) == (0.05, False, 30, 128)
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"batch_size": 64, "overrides": {"activation": "gelu"}}))
    config, _ = fit.parse_config(["--recipe", "fast", "--hparams", str(path)])
    assert (config.batch_size, config.lr) == (64, 0.1)
    assert config.overrides == {"shortcut_pool": True, "activation": "gelu"}
    report, _ = fit.parse_config([])
    assert report == TrainConfig()  # no --recipe: the report's run


def test_hparams_file_sets_defaults_and_flags_win(tmp_path, capsys):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"lr": 0.05, "batch_size": 128}))
    config, _ = fit.parse_config(["--hparams", str(path)])
    assert (config.lr, config.batch_size) == (0.05, 128)
    config, _ = fit.parse_config(["--hparams", str(path), "--lr", "0.002"])
    assert (config.lr, config.batch_size) == (0.002, 128)
    path.write_text(json.dumps({"lr": 0.05, "overrides": {"depths": [2, 2, 2], "activation": "gelu"}}))
    config, _ = fit.parse_config(["--hparams", str(path), "--override", "activation=silu"])
    assert config.overrides == {"depths": [2, 2, 2], "activation": "silu"}
    path.write_text(json.dumps({"learning_rate": 0.05}))
    with pytest.raises(SystemExit):
        fit.parse_config(["--hparams", str(path)])
    assert "unknown key(s) learning_rate" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_prints_accuracy_and_confusion_matrix(finished_run, cifar_dir, capsys, tmp_path):
    run_dir, _, _ = finished_run
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(run_dir / "model.keras"), "--data-dir", cifar_dir, "--limit", "300",
                          "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "test accuracy:" in text and "confusion matrix" in text and "per-class accuracy" in text
    result = read_json(out)
    assert np.array(result["confusion_matrix"]).sum() == 300
    assert abs(np.trace(result["confusion_matrix"]) / 300 - result["test_accuracy"]) < 1e-9
    assert result["tta"] == "none" and result["images"] == 300


@pytest.mark.slow
def test_flip_tta_is_the_mean_over_the_mirror_and_flip_invariant(finished_run, cifar_dir, capsys, tmp_path):
    from nfnet_keras.inference import load_predictor, with_tta

    run_dir, _, _ = finished_run
    _, (x, y) = load_cifar10(cifar_dir)
    x = x[:64]
    predict = load_predictor(str(run_dir / "model.keras"))
    tta = with_tta(predict, "flip")
    plain, mirrored = predict(x), predict(x[:, :, ::-1])
    assert np.abs(plain - mirrored).max() > 1e-4  # the model itself is not flip-invariant
    np.testing.assert_allclose(tta(x), (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(tta(x), tta(x[:, :, ::-1]), atol=1e-6)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(run_dir / "model.keras"), "--data-dir", cifar_dir, "--limit", "64",
                          "--tta", "flip", "--json", str(out)]) == 0
    assert "test-time augmentation: flip" in capsys.readouterr().out
    result = read_json(out)
    expected = float(((plain + mirrored).argmax(1) == y[:64]).mean())
    assert result["tta"] == "flip" and result["test_accuracy"] == pytest.approx(expected)
    # fit's own figure is the same computation on its test images: with --train-limit 512, the first 1,000.
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["test_images"] == 1000
    assert evaluate.main(["--model", str(run_dir / "model.keras"), "--data-dir", cifar_dir, "--tta", "flip",
                          "--limit", "1000", "--json", str(out)]) == 0
    assert read_json(out)["test_accuracy"] == pytest.approx(metrics["test_accuracy_flip_tta"])


@pytest.mark.slow
def test_predict_npy_csv_folder_and_savedmodel_agree(finished_run, cifar_dir, tmp_path):
    run_dir, export_dir, _ = finished_run
    _, (x, _) = load_cifar10(cifar_dir)
    images = tmp_path / "images.npy"
    np.save(images, x[:6])
    keras_out, sm_out = tmp_path / "k.npy", tmp_path / "s.npy"
    model_path = str(run_dir / "model.keras")
    assert predict.main(["--model", model_path, "--images", str(images), "--out", str(keras_out)]) == 0
    saved_model = os.path.join(export_dir, "tiny", "1")
    assert predict.main(["--model", saved_model, "--images", str(images), "--out", str(sm_out)]) == 0
    pk, ps = np.load(keras_out), np.load(sm_out)
    assert pk.shape == (6, 10)
    np.testing.assert_allclose(pk.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(pk, ps, atol=1e-5)

    import tensorflow as tf

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        tf.io.write_file(str(folder / f"img{i}.png"), tf.io.encode_png(x[i]))
    out_csv = tmp_path / "p.csv"
    assert predict.main(["--model", str(run_dir / "model.keras"), "--images", str(folder), "--out", str(out_csv)]) == 0
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["class"] in CLASS_NAMES for r in rows)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], pk[:3].max(1), atol=1e-5)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 32, 32, 3), np.float32), "expected uint8"),
        (np.zeros((2, 28, 28, 1), np.uint8), "expected shape N x H x W x 3"),
        (np.zeros((32, 32, 3), np.uint8), "expected shape N x H x W x 3"),
    ],
)
def test_predict_rejects_bad_arrays(array, message, tmp_path, capsys):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    code = predict.main(["--model", str(tmp_path / "none.keras"), "--images", str(path),
                         "--out", str(tmp_path / "o.npy")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_predict_rejects_a_missing_model(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, 32, 32, 3), np.uint8))
    assert predict.main(["--model", str(tmp_path / "none.keras"), "--images", str(path),
                         "--out", str(tmp_path / "o.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_failed_export_keeps_the_training_results_and_exits_4(tmp_path, synthetic_cifar_dir, capsys, monkeypatch):
    from nfnet_keras import export

    def fail(model, name, version=None, base_dir="saved_models", **kwargs):
        raise export.ExportError("The exported model's probabilities differ (a stand-in failure).")

    monkeypatch.setattr(export, "export_saved_model", fail)
    run_dir, export_dir = tmp_path / "run", tmp_path / "my models"
    code = fit.main([*TINY, "--epochs", "1", "--train-limit", "256", "--data-dir", synthetic_cifar_dir,
                     "--run-dir", str(run_dir), "--export-dir", str(export_dir), "--export-name", "m"])
    assert code == 4
    model_path = run_dir / "model.keras"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: Training finished ({run_dir / 'metrics.json'}, {model_path}) but the export failed: The exported "
        "model's probabilities differ (a stand-in failure). Export again with: python -m nfnet_keras.export "
        f"--model {model_path} --name m --base-dir '{export_dir}'")
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["epochs_completed"] == 1 and "export_error" in metrics and "export_path" not in metrics
    assert model_path.is_file()


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_run_dir_that_is_a_file_is_refused_in_one_line(where, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    run_dir = blocker if where == "file" else blocker / "run"
    before = _listing(tmp_path)
    assert fit.main([*TINY, "--run-dir", str(run_dir), "--export-dir", str(tmp_path / "sm")]) == 2
    assert capsys.readouterr().err == (
        f"error: --run-dir {run_dir}: {blocker} is a file, not a folder; give a folder to write the run in.\n")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("where", ["export_dir", "under_export_dir", "export_name"])
def test_an_export_destination_that_cannot_be_written_is_refused_before_training(where, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    export_dir, name = {"export_dir": (blocker, "nfnet"), "under_export_dir": (blocker / "sm", "nfnet"),
                        "export_name": (tmp_path, "taken")}[where]
    before = _listing(tmp_path)
    argv = [*TINY, "--run-dir", str(tmp_path / "run"), "--export-dir", str(export_dir), "--export-name", name]
    assert fit.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: cannot export to {export_dir / name} (--export-dir {export_dir}, --export-name {name}): "
        f"{blocker} is a file, not a folder; fix it, give another --export-dir, or pass --no-export.\n")
    assert _listing(tmp_path) == before
    _, args = fit.parse_config([*argv, "--no-export"])  # nothing exported: nothing to check
    assert fit.output_problem(str(tmp_path / "run"), args) is None


def test_an_unwritable_export_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    locked_dir = tmp_path / "readonly"
    locked_dir.mkdir()
    real_access = os.access
    # The tests run as root, for whom every folder is writable: the folder reports itself read-only.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked_dir) else real_access(p, mode))
    assert fit.main([*TINY, "--run-dir", str(tmp_path / "run"), "--export-dir", str(locked_dir)]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot export to {locked_dir / 'nfnet'} (--export-dir {locked_dir}, --export-name nfnet): "
        f"folder {locked_dir} is not writable; fix it, give another --export-dir, or pass --no-export.\n")
    assert _listing(tmp_path) == ["readonly"]


def test_the_export_hint_names_base_dir_only_when_not_the_default():
    from nfnet_keras.training import export_command

    assert export_command("runs/r/model.keras", "nfnet") == (
        "python -m nfnet_keras.export --model runs/r/model.keras --name nfnet")
    assert export_command("runs/r/model.keras", "nfnet", "./saved_models/") == (
        "python -m nfnet_keras.export --model runs/r/model.keras --name nfnet")
    assert export_command("runs/r/model.keras", "nfnet", "/srv/models") == (
        "python -m nfnet_keras.export --model runs/r/model.keras --name nfnet --base-dir /srv/models")


def test_evaluate_names_a_garbage_keras_file_as_not_a_model(tmp_path, capsys):
    path = tmp_path / "model.keras"
    path.write_text("not a model")
    assert evaluate.main(["--model", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: --model {path} is not a loadable .keras model (not a zip archive); pass the model.keras that fit "
        "writes in its run directory.\n")
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:  # a zip, but no Keras model in it
        archive.writestr("notes.txt", "hello")
    assert evaluate.main(["--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {path} is not a loadable .keras model (") and err.count("\n") == 1
    assert "not found" not in err.lower()


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"lr": "fast"}, "key \"lr\" must be a finite number, got 'fast' (str)"),
        ({"batch_size": 64.5}, "key \"batch_size\" must be an integer, got 64.5 (float)"),
        ({"nesterov": "yes"}, "key \"nesterov\" must be true or false, got 'yes' (str)"),
        ({"conv_init": "orthogonal"}, "--conv-init must be one of he_normal, dirac, got 'orthogonal'."),
        ({"augment": "altflip"}, "--augment must be one of noise_rotate_flip, standard, translate_flip, "
                                 "translate_altflip, none, got 'altflip'."),
        ({"tta": "weighted"}, "--tta must be one of none, flip, flip_translate, flip_translate_weighted, "
                              "got 'weighted'."),
        ({"preset": "tiny_speed", "whitening_bias_epochs": -1},
         "--whitening-bias-epochs must be >= 0 (unset: every epoch), got -1."),
        ({"preset": "tiny", "whitening_bias_epochs": 3},
         "--whitening-bias-epochs needs a network with a whitening stem (e.g. --preset cifar_speed); tiny has none."),
        ({"preset": "tiny_speed", "whitening_bias_epochs": 2.5},
         'key "whitening_bias_epochs" must be an integer, got 2.5 (float)'),
    ],
)
def test_hparams_with_a_wrong_value_names_the_file_and_the_key(hparams, message, tmp_path, capsys):
    path = tmp_path / "best.json"
    path.write_text(json.dumps(hparams))
    with pytest.raises(SystemExit) as exit_info:
        fit.parse_config(["--hparams", str(path)])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f": error: --hparams {path}: {message}") or last.endswith(f": error: {message}"), last


def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_written(
        tmp_path, synthetic_cifar_dir, capsys):
    argv = [*TINY, "--train-limit", "100", "--batch-size", "128", "--data-dir", synthetic_cifar_dir,
            "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "sm")]
    assert fit.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --batch-size 128 is larger than the training set (100 images); lower --batch-size or train on "
        "more images (--train-limit, --val-size).\n")
    assert os.listdir(tmp_path) == []


def test_evaluation_test_limit_follows_the_run():
    assert TrainConfig().evaluation_test_limit() is None  # all 10,000
    assert [TrainConfig(train_limit=n).evaluation_test_limit() for n in (1, 999, 1000, 3000, 10000, 49000)] == [
        1000, 1000, 1000, 3000, 10000, 10000]
    assert TrainConfig(train_limit=3000, test_limit=200).evaluation_test_limit() == 200
    assert TrainConfig(test_limit=200).evaluation_test_limit() == 200
    with pytest.raises(ValueError) as error:
        TrainConfig(test_limit=0).validate()
    assert str(error.value) == "--test-limit must be >= 1, got 0."
    config, _ = fit.parse_config(["--test-limit", "500"])
    assert config.test_limit == 500


def test_test_limit_evaluates_on_the_first_test_images(tmp_path, synthetic_cifar_dir, capsys):
    run_dir = tmp_path / "run"
    assert fit.main([*TINY, "--epochs", "1", "--train-limit", "64", "--test-limit", "50", "--tta", "flip_translate",
                     "--data-dir", synthetic_cifar_dir, "--run-dir", str(run_dir), "--no-export"]) == 0
    out = capsys.readouterr().out
    assert "Evaluating on 50 test images (plain, flip, flip_translate) ...\n" in out
    assert "Test accuracy: " in out and " on 50 images." in out
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["test_images"] == 50 and metrics["config"]["test_limit"] == 50
    from nfnet_keras.inference import load_predictor

    _, (x, y) = load_cifar10(synthetic_cifar_dir, test_only=True)
    predict = load_predictor(str(run_dir / "model.keras"))
    assert metrics["test_accuracy"] == pytest.approx(float((predict(x[:50]).argmax(1) == y[:50]).mean()))
    # --train-limit without --test-limit: min(10000, max(1000, N)) images, here all 200 there are.
    assert fit.main([*TINY, "--epochs", "1", "--train-limit", "64", "--data-dir", synthetic_cifar_dir,
                     "--run-dir", str(tmp_path / "run2"), "--no-export"]) == 0
    assert "Evaluating on 200 test images (plain, flip) ...\n" in capsys.readouterr().out
    assert read_json(tmp_path / "run2" / "metrics.json")["test_images"] == 200


@pytest.mark.parametrize("command, main", [("nfnet-fit", fit.main), ("nfnet-evaluate", evaluate.main),
                                           ("nfnet-predict", predict.main)])
def test_help_names_the_command_typed_and_tells_each_default_once(command, main, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"/home/u/nfnet-keras/.venv/bin/{command}", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {command} [-h]")
    flat = " ".join(text.split())
    assert "python -m" not in flat.split("options:")[0]
    for noise in ("(default: None)", "(default: False)", "(default: [])"):
        assert noise not in flat, noise
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one per flag
    assert len(entries) > 3 and all(entry.count("(default") <= 1 for entry in entries), entries
    if command == "nfnet-fit":
        assert "--train-limit N train on the first N training images (default: all) --val-size" in flat
        assert ("--val-size VAL_SIZE validation images held out of the training images (of a dataset other than "
                "CIFAR-10's 50,000: at most a tenth of them) (default: 5000)") in flat
        assert "--jit, --no-jit XLA-compile the train step" in flat  # one help for both
        assert "--seed SEED random seed (weights, shuffling, augmentation) (default: 0)" in flat  # 0 is a default
    if command == "nfnet-evaluate":
        assert "--tfds-dir TFDS_DIR TFDS data_dir: where --dataset tfds:NAME is read, and CIFAR-10 when no" in flat
        assert "--dataset SOURCE cifar10, folder:PATH or tfds:NAME, as fit's --dataset (default: cifar10)" in flat


def test_help_under_python_m_names_the_module():
    result = subprocess.run([sys.executable, "-m", "nfnet_keras.predict", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m nfnet_keras.predict [-h]")
