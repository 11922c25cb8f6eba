"""TensorBoard as a user sees it (nfnet_keras/tensorboard/: callbacks, hparams, signal_plot).

The end-to-end tests build logs with the package's own functions (a 2-epoch
`tiny` run on the synthetic CIFAR-10, a 2-trial grid search), start the real
TensorBoard server on loopback and read what its dashboards read, through its
HTTP data API: the HParams experiment and session groups, the scalar and
image tags, the runs. TensorBoard runs both ways a user starts it: on
`<run>/logs` (what `fit` prints) and on the folder of all runs.
"""

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

from nfnet_keras import build_model, training
from nfnet_keras import tensorboard as tb
from nfnet_keras.config import TrainConfig
from nfnet_keras.models import signal_blocks as nf_blocks

pytestmark = [
    # KerasTuner 1.4.8's oracle lock calls threading.currentThread().getName().
    pytest.mark.filterwarnings("ignore:currentThread:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:getName:DeprecationWarning"),
]

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
SHOWN_HPARAMS = {"preset", "norm", "epochs", "batch_size", "lr"}
# The HParams dashboard shows the first five hyperparameters TensorBoard lists, and the first five metrics.
SHOWN = 5


# === The server ===


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Board:
    """A TensorBoard server's HTTP data API."""

    def __init__(self, url):
        self.url = url

    def get(self, path, **params):
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=60) as response:
            body = response.read()
        return body if path.endswith("individualImage") else json.loads(body)

    def hparams(self, route, **request):
        return self.get(f"/data/plugin/hparams/{route}", request=json.dumps({"experimentName": "", **request}))

    def session_groups(self):
        return self.hparams("session_groups", allowedStatuses=STATUSES, startIndex=0, sliceSize=100)["sessionGroups"]

    def scalar_points(self):
        """{tag: {run: number of points}} of every scalar chart."""
        points = {}
        for run, tags in self.get("/data/plugin/scalars/tags").items():
            for tag in tags:
                points.setdefault(tag, {})[run] = len(self.get("/data/plugin/scalars/scalars", run=run, tag=tag))
        return points


@contextlib.contextmanager
def tensorboard(logdir, timeout=120):
    """Serves `logdir` on a free loopback port; yields a `Board` once the data is loaded."""
    port = _free_port()
    # Blocking load: the server answers only once every event file is read.
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), "--load_fast=false", "--reload_interval", "0", "--reload_task", "blocking"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    board = Board(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + timeout
        while True:
            assert process.poll() is None, f"tensorboard exited:\n{process.stderr.read()[-3000:]}"
            try:
                board.get("/data/runs")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, f"tensorboard not ready within {timeout} s"
                time.sleep(0.25)
        yield board
    finally:
        process.kill()
        process.wait()


def _png_size(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def _assert_no_one_point_charts(board):
    points = board.scalar_points()
    assert points, "no scalars"
    assert not [tag for tag in points if tag.startswith("evaluation_")], sorted(points)
    single = {tag: runs for tag, runs in points.items() if max(runs.values()) < 2}
    assert not single, f"charts with one point: {single}"


def _runs_without_data(board):
    """The runs with neither scalars nor images; asserts that none is named `.`."""
    runs = board.get("/data/runs")
    assert "." not in runs and "" not in runs
    shown = set(board.get("/data/plugin/scalars/tags")) | set(board.get("/data/plugin/images/tags"))
    return [run for run in runs if run not in shown]


# === A fit run ===


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, synthetic_cifar_dir):
    """A finished 2-epoch `tiny` run at `<root>/runs/r1`; returns (root, metrics)."""
    root = tmp_path_factory.mktemp("tb")
    config = TrainConfig(preset="tiny", epochs=2, batch_size=64, train_limit=256, val_size=64,
                         data_dir=synthetic_cifar_dir)
    metrics = training.train(config, str(root / "runs" / "r1"), verbose=0)
    return root, metrics


@pytest.mark.slow
def test_fit_logs_layout_and_signal_record(fit_run):
    root, metrics = fit_run
    logs = root / "runs" / "r1" / "logs"
    assert sorted(os.listdir(logs)) == ["fit"]  # nothing at the root: no run named "."
    session = logs / "fit"
    for folder in (session, session / "train", session / "validation", session / "test"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder)), folder
    record = json.loads((session / tb.SIGNAL_FILE).read_text())
    assert sorted(record["steps"], key=int) == ["0", "1", "2"] and record["images"] == 64
    signal = metrics["signal_propagation"]
    assert set(signal) == {"start", "end", "start_unit_gaussian", "end_unit_gaussian"}
    assert [row["block"] for row in signal["end"]] == ["stage1_block1", "stage2_block1"]
    assert [row["skip_gain"] for row in signal["start"]] == [0.0, 0.0]  # SkipInit
    assert signal["end"] == record["steps"]["2"]["images"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["run", "parent"])
def test_tensorboard_shows_the_fit_run(fit_run, layout):
    root, metrics = fit_run
    logdir, prefix = (root / "runs" / "r1" / "logs", "") if layout == "run" else (root / "runs", "r1/logs/")
    session = prefix + "fit"
    with tensorboard(logdir) as board:
        runs = board.get("/data/runs")
        assert sorted(runs) == sorted(session + suffix for suffix in ("", "/train", "/validation", "/test"))
        assert _runs_without_data(board) == []

        # HParams: the declared columns, what matters shown first.
        experiment = board.hparams("experiment")
        names = [h["name"] for h in experiment["hparamInfos"]]
        assert set(names[:SHOWN]) == SHOWN_HPARAMS
        assert not {"data_dir", "tfds_dir", "jit", "deterministic", "strategy"} & set(names)
        metric_names = [(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]]
        assert metric_names[:3] == [("validation", "epoch_accuracy"), ("validation", "epoch_loss"),
                                    ("test", "epoch_accuracy")]

        # One session, linked to its train/, validation/ and test/ runs.
        (group,) = board.session_groups()
        (run_session,) = group["sessions"]
        assert run_session["name"] == session and run_session["status"] == "STATUS_SUCCESS"
        hparams = group["hparams"]
        assert (hparams["lr"], hparams["batch_size"], hparams["epochs"]) == (0.01, 64, 2)
        assert (hparams["preset"], hparams["schedule"], hparams["overrides"]) == ("tiny", "step", "none")
        values = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in group["metricValues"]}
        assert set(values) == {(group_, tag) for tag, group_, _ in tb.FIT_METRICS}
        assert values["validation", "epoch_accuracy"] == pytest.approx(metrics["history"]["val_accuracy"][-1])
        assert values["validation", "epoch_loss"] == pytest.approx(metrics["history"]["val_loss"][-1])
        assert values["test", "epoch_accuracy"] == pytest.approx(metrics["test_accuracy"])
        assert values["test", "epoch_loss"] == pytest.approx(metrics["test_loss"])

        # Scalars: values over epochs only.
        _assert_no_one_point_charts(board)
        assert set(board.get("/data/plugin/scalars/tags")[session + "/test"]) == {"epoch_accuracy", "epoch_loss"}

        # The signal-propagation plot, with its caption, at the start and the end.
        images = board.get("/data/plugin/images/tags")
        assert list(images) == [session] and list(images[session]) == [tb.SIGNAL_TAG]
        assert "unit-Gaussian" in images[session][tb.SIGNAL_TAG]["description"]
        shots = board.get("/data/plugin/images/images", run=session, tag=tb.SIGNAL_TAG, sample=0)
        assert [shot["step"] for shot in shots] == [0, 1, 2]
        for shot in (shots[0], shots[-1]):
            png = board.get("/data/plugin/images/individualImage", **dict(urllib.parse.parse_qsl(shot["query"])))
            width, height = _png_size(png)
            assert width == 400 and 500 <= height <= 650


# === A grid search ===


@pytest.fixture(scope="module")
def grid_logs(tmp_path_factory, synthetic_cifar_dir):
    """The TensorBoard folder of a finished 2-trial grid (lr 0.01, 0.05 at batch size 64, 2 epochs)."""
    from nfnet_keras.tuner import grid

    root = tmp_path_factory.mktemp("grid")
    code = grid.main(["--preset", "tiny", "--epochs", "2", "--lrs", "0.01,0.05", "--batch-sizes", "64",
                      "--train-limit", "128", "--val-size", "64", "--data-dir", synthetic_cifar_dir,
                      "--directory", str(root), "--project-name", "grid", "--quiet"])
    assert code == 0
    return root / "grid" / "logs"


@pytest.mark.slow
def test_tensorboard_shows_each_trial_as_a_session(grid_logs):
    trials = sorted(os.listdir(grid_logs))
    assert len(trials) == 2  # nothing else at the root: no run named "."
    with tensorboard(grid_logs) as board:
        sessions = {f"{t}/execution0" for t in trials}
        assert set(board.get("/data/runs")) == {s + suffix for s in sessions for suffix in ("", "/train",
                                                                                             "/validation")}
        assert set(_runs_without_data(board)) == sessions  # KerasTuner's session folders: HParams only

        experiment = board.hparams("experiment")
        domains = {h["name"]: h.get("domainDiscrete") for h in experiment["hparamInfos"]}
        assert domains == {"lr": [0.01, 0.05], "batch_size": [64]}
        assert [(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]][0] == (
            "validation", "epoch_accuracy")

        groups = board.session_groups()
        assert sorted(g["name"] for g in groups) == trials  # one group per trial, named by its id
        assert sorted(g["hparams"]["lr"] for g in groups) == [0.01, 0.05]
        for group in groups:
            (session,) = group["sessions"]
            assert session["name"] in sessions and session["status"] == "STATUS_SUCCESS"
            values = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in group["metricValues"]}
            assert set(values) == {("validation", "epoch_accuracy"), ("validation", "epoch_loss"),
                                   ("train", "epoch_accuracy"), ("train", "epoch_loss")}
            assert 0 <= values["validation", "epoch_accuracy"] <= 1

        _assert_no_one_point_charts(board)


# === Pieces ===


def test_logged_epochs_are_1_2_5_and_the_last():
    assert tb.logged_epochs(1) == [1]
    assert tb.logged_epochs(2) == [1, 2]
    assert tb.logged_epochs(7) == [1, 2, 5, 7]
    assert tb.logged_epochs(200) == [1, 2, 5, 10, 20, 50, 100, 200]
    # With the start, a 200-epoch run has 9 pictures: TensorBoard keeps 10 per tag by default.
    assert len(tb.logged_epochs(200)) + 1 <= 10


def test_fit_hparams_are_readable_values():
    config = TrainConfig(overrides={"depths": [1, 1, 1], "activation": "gelu"})
    values = tb.fit_hparams(config)
    assert values["overrides"] == "activation=gelu, depths=(1, 1, 1)"
    assert "train_limit" not in values  # unset: the dashboard leaves the cell empty
    assert values["nesterov"] is False and values["lr"] == 0.01
    assert set(values) <= {name for name, *_ in tb.FIT_HPARAMS}
    assert tb.format_overrides({}) == "none"


def test_expected_variance_with_current_gains():
    keras.utils.set_random_seed(0)
    model = build_model("tiny", depths=(2, 2))
    images = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype("float32")
    rows = tb.measure(model, images)  # SkipInit: every gain 0
    assert [r["skip_gain"] for r in rows] == [0.0] * 4
    # 1 through the first stage; the second stage's transition divides by the 1.08 expected there.
    assert [r["expected_var_current_gains"] for r in rows] == pytest.approx([1.0, 1.0, 1 / 1.08, 1 / 1.08])
    for block in nf_blocks(model):
        block.skip_gain.assign(1.0)
    rows = tb.measure(model, images)
    assert [r["expected_var_current_gains"] for r in rows] == pytest.approx([r["expected_var"] for r in rows])


def test_the_tensorboard_callback_keeps_the_name_kerastuner_looks_for():
    # KerasTuner gives a callback a folder per trial when its class is named "TensorBoard".
    assert tb.TensorBoard.__name__ == "TensorBoard"
    import copy

    from nfnet_keras.tuner.hypermodel import hparams_experiment, tensorboard_callback

    callback = copy.deepcopy(tensorboard_callback("logs", hparams_experiment([0.1], [32])))
    assert callback.log_dir == "logs" and isinstance(callback, keras.callbacks.TensorBoard)


@pytest.mark.parametrize("preset, twin, says, omits", [
    ("tiny", False, ["tracking rule", "weight-standardized stem"], ["no skip path", "patch-whitening"]),
    ("tiny", True, [], ["tracking rule", "no skip path", "patch-whitening"]),
    ("tiny_speed", False, ["no skip path", "patch-whitening"], ["tracking rule", "weight-standardized stem"]),
    ("tiny_speed", True, ["patch-whitening"], ["tracking rule", "no skip path"]),
])
def test_signal_caption_is_true_for_each_network(preset, twin, says, omits):
    from nfnet_keras import BATCHNORM_TWIN

    caption = tb.signal_caption(build_model(preset, **(BATCHNORM_TWIN if twin else {})), 64)
    assert caption.startswith("Per-block statistics") and "64 validation images" in caption
    assert all(text in caption for text in says), caption
    assert not any(text in caption for text in omits), caption
