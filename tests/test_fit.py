"""`python -m nfnet_keras.fit`, evaluate and predict, end to end on small slices of real CIFAR-10."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from nfnet_keras import evaluate, fit, predict
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
    assert result.returncode == fit.EXIT_DIVERGED
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
    # Also the one-hot label path of --label-smoothing, under the strategy.
    result = run_fit([*TINY, "--epochs", "1", "--train-limit", "256", "--strategy", "mirrored", "--jit",
                      "--label-smoothing", "0.1", "--run-dir", str(run_dir), "--no-export",
                      "--data-dir", synthetic_cifar_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras#19005" in result.stdout  # --jit is dropped under the strategy, with a note
    assert read_json(run_dir / "metrics.json")["test_accuracy"] is not None


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
        (["--weight-decay-mode", "l2"], "invalid choice: 'l2'"),
        (["--bias-lr-mult", "0"], "--bias-lr-mult must be a positive number, got 0.0"),
        (["--head-lr-mult", "-1"], "--head-lr-mult must be a positive number, got -1.0"),
        (["--lookahead", "-1"], "--lookahead must be >= 0"),
        (["--lookahead-alpha", "0"], "--lookahead-alpha must be in (0, 1], got 0.0"),
        (["--lookahead-schedule", "cubic"], "invalid choice: 'cubic'"),
        (["--optimizer", "adam"], "invalid choice: 'adam'"),
        (["--kernel-lr", "0"], "--kernel-lr must be a positive number, got 0.0"),
        (["--kernel-momentum", "1"], "--kernel-momentum must be in [0, 1), got 1.0"),
        (["--muon-ns-steps", "0"], "--muon-ns-steps must be >= 1, got 0"),
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
    # fit's own figure is the same computation on the whole test set.
    assert evaluate.main(["--model", str(run_dir / "model.keras"), "--data-dir", cifar_dir, "--tta", "flip",
                          "--json", str(out)]) == 0
    fit_figure = read_json(run_dir / "metrics.json")["test_accuracy_flip_tta"]
    assert read_json(out)["test_accuracy"] == pytest.approx(fit_figure)


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
        (np.zeros((2, 28, 28, 3), np.uint8), "expected shape N x 32 x 32 x 3"),
        (np.zeros((32, 32, 3), np.uint8), "expected shape N x 32 x 32 x 3"),
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
def test_failed_export_keeps_the_training_results_and_exits_4(tmp_path, synthetic_cifar_dir):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the export folder should be")
    run_dir = tmp_path / "run"
    result = run_fit([*TINY, "--epochs", "1", "--train-limit", "256", "--data-dir", synthetic_cifar_dir,
                      "--run-dir", str(run_dir), "--export-dir", str(blocker)])
    assert result.returncode == 4, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Training finished") and "python -m nfnet_keras.export --model" in last
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["epochs_completed"] == 1 and "export_error" in metrics and "export_path" not in metrics
    assert (run_dir / "model.keras").is_file()
