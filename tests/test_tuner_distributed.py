"""The grid's distributed mode (`nfnet_keras.tuner.launch`, `nfnet_keras.tuner.distributed`).

A chief and two workers on 127.0.0.1 run the report's 12-trial grid (tiny preset, one epoch on
256 synthetic images) with `nfnet-grid --local-workers 2`; the other tests pin the one-line
errors and the bounded waits without training anything.
"""

import csv
import glob
import json
import os
import socket
import subprocess
import sys
import time

import keras_tuner
import pytest
from keras_tuner.src.distribute import oracle_client
from keras_tuner.src.engine import trial as trial_module

from nfnet_keras import exits
from nfnet_keras.tuner import distributed, grid, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900  # seconds for a whole local search (2-core machines shared with other jobs are slow)
TINY = ["--preset", "tiny", "--epochs", "1", "--train-limit", "256", "--val-size", "128", "--quiet"]
GRID = [(lr, b) for lr in (0.001, 0.01, 0.1) for b in (32, 64, 128, 256)]  # the defaults: 12 trials

pytestmark = [
    # KerasTuner 1.4.8's oracle lock calls threading.currentThread().getName().
    pytest.mark.filterwarnings("ignore:currentThread:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:getName:DeprecationWarning"),
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture
def kerastuner_env(monkeypatch):
    """Sets KerasTuner's distributed variables for the test (none set before it)."""
    for name in (launch.TUNER_ID, launch.ORACLE_IP, launch.ORACLE_PORT):
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.slow
def test_local_chief_and_two_workers_run_every_grid_point_once(tmp_path, synthetic_cifar_dir):
    args = [*TINY, "--local-workers", "2", "--data-dir", synthetic_cifar_dir, "--directory", str(tmp_path),
            "--project-name", "grid"]
    log_path = tmp_path / "launcher.log"
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "nfnet_keras.tuner.grid", *args], cwd=REPO, env=_env(),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    seconds = time.time() - started
    log = _read(log_path)
    assert code == 0, log  # the chief and both workers exited 0
    print(f"12-trial local search: {seconds:.0f} s")

    # The trial files: 12 trials, one per grid point, every one finished.
    project = tmp_path / "grid"
    trials = [json.loads(_read(path)) for path in sorted(glob.glob(str(project / "trial_*" / "trial.json")))]
    values = sorted((t["hyperparameters"]["values"]["lr"], t["hyperparameters"]["values"]["batch_size"])
                    for t in trials)
    assert values == sorted(GRID)
    assert all(t["status"] in ("COMPLETED", "FAILED") for t in trials)
    # The oracle's record: 12 trials started and ended once each.
    oracle = json.loads(_read(project / "oracle.json"))
    assert sorted(oracle["start_order"]) == sorted(oracle["end_order"]) == [f"{i:02d}" for i in range(12)]
    assert oracle["ongoing_trials"] == {}
    # The workers' logs: each trial started once (no retry, no trial run by both), and both ended cleanly.
    runs = []
    for name in ("tuner0", "tuner1"):
        worker_log = _read(tmp_path / f"grid_{name}.log")
        assert worker_log.rstrip().endswith(f"[{name}] no trials left; done."), worker_log
        runs += [line.split(" trial ", 1)[1].split(" ", 1)[0] for line in worker_log.splitlines()
                 if line.startswith(f"[{name}] trial ") and " starts: " in line]
    assert sorted(runs, key=int) == [str(i) for i in range(1, 13)]

    # The chief's table is complete: every cell has an accuracy or "diverged".
    assert "Local search on 127.0.0.1:" in log and "a chief and 2 worker(s)" in log
    assert "12 of 12 trials finished" in log and "error" not in log
    rows = list(csv.reader(_read(tmp_path / "grid_results.csv").splitlines()))
    assert rows[0] == ["batch_size", "lr=0.001", "lr=0.01", "lr=0.1"]
    assert [row[0] for row in rows[1:]] == ["32", "64", "128", "256"]
    cells = [cell for row in rows[1:] for cell in row[1:]]
    assert all(cell == "diverged" or 0 <= float(cell) <= 100 for cell in cells), cells
    best = json.loads(_read(tmp_path / "grid_best_hparams.json"))
    assert (best["lr"], best["batch_size"]) in GRID and best["preset"] == "tiny"


CHIEF_SCRIPT = """
import sys
import time

import keras
import keras_tuner

from nfnet_keras.tuner.oracle import NFNetGridSearch


class Grid(keras_tuner.HyperModel):
    def build(self, hp):
        hp.Choice("lr", [0.001, 0.01, 0.1])
        hp.Choice("batch_size", [32, 64, 128, 256])
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(loss="mse")
        return model


tuner = NFNetGridSearch(Grid(), objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=12,
                        directory=sys.argv[1], project_name="grid")
tuner.search()
print("chief done", len(tuner.oracle.trials), time.time())
"""


def _start_chief(tmp_path, port, name):
    script = tmp_path / "chief.py"
    script.write_text(CHIEF_SCRIPT)
    log = open(tmp_path / f"{name}.log", "w")
    chief = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, env=_env(KERAS_BACKEND="jax", KERASTUNER_TUNER_ID="chief",
                                                                KERASTUNER_ORACLE_IP="127.0.0.1",
                                                                KERASTUNER_ORACLE_PORT=str(port)))
    deadline = time.time() + TIMEOUT
    while launch.chief_problem(1.0, f"127.0.0.1:{port}"):
        if chief.poll() is not None or time.time() > deadline:
            chief.kill()
            chief.wait()
            pytest.fail(f"the chief did not start listening within {TIMEOUT} s:\n" + _read(tmp_path / f"{name}.log"))
    return chief


def _workers(timeout):
    local = keras_tuner.oracles.GridSearchOracle(objective="val_accuracy", max_trials=12)
    return {name: distributed.bounded_client(oracle_client.OracleClient(local), timeout)
            for name in ("tuner0", "tuner1")}


def _finish(client, trial):
    client.update_trial(trial.trial_id, {"val_accuracy": trial.hyperparameters.values["lr"]})
    trial.status = trial_module.TrialStatus.COMPLETED
    client.end_trial(trial)


@pytest.mark.slow
def test_chief_killed_then_rerun_resumes_through_the_service_every_point_once(tmp_path, kerastuner_env):
    """The grid's resumable oracle behind KerasTuner's gRPC service: two workers take trials, the chief is
    killed with two of them running, its workers get a one-line error; the rerun chief gives the two back
    first, then the rest, and exits within seconds of the last one. The chief runs under JAX (it starts
    without TensorFlow; the service does not depend on the backend); the workers are this process's
    KerasTuner clients, with instant trials."""
    port = launch.free_port()
    kerastuner_env(KERASTUNER_TUNER_ID="tuner0", KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
    chief = _start_chief(tmp_path, port, "chief1")
    try:
        workers = _workers(timeout=2)
        taken = {name: client.create_trial(name) for name, client in workers.items()}
        assert {t.status for t in taken.values()} == {"RUNNING"}  # both get work at once
        done = []
        for name, client in workers.items():  # each finishes one and takes another
            _finish(client, taken[name])
            done.append(taken[name].hyperparameters.values)
            taken[name] = client.create_trial(name)
        running = sorted(tuple(t.hyperparameters.values.values()) for t in taken.values())
        chief.kill()
        chief.wait()
    finally:
        if chief.poll() is None:
            chief.kill()
    with pytest.raises(distributed.ChiefUnreachable, match="within 2 s to UpdateTrial"):
        _finish(workers["tuner0"], taken["tuner0"])

    chief = _start_chief(tmp_path, port, "chief2")
    try:
        workers = _workers(timeout=30)
        rerun, pending, stopped = [], {}, set()
        while len(stopped) < 2:
            for name, client in workers.items():
                if name in stopped:
                    continue
                if name in pending:
                    if stopped:  # the last trial ends 2 s after the other worker was told to stop
                        time.sleep(2)
                    _finish(client, pending.pop(name))
                trial = client.create_trial(name)
                if trial.status == "STOPPED":
                    stopped.add(name)
                    continue
                rerun.append(trial.hyperparameters.values)
                pending[name] = trial
        ended = time.time()
        assert chief.wait(timeout=TIMEOUT) == 0
    finally:
        if chief.poll() is None:
            chief.kill()
    done_line = [line for line in _read(tmp_path / "chief2.log").splitlines() if line.startswith("chief done")]
    assert len(done_line) == 1 and done_line[0].split()[2] == "12"
    done_line = done_line[0].split()
    assert float(done_line[3]) - ended < 10  # KerasTuner's own chief checks every 20 s
    # The two trials running at the kill run again first; every grid point finishes once.
    assert sorted(tuple(v.values()) for v in rerun[:2]) == running
    assert sorted(tuple(v.values()) for v in done + rerun) == sorted(GRID)
    oracle = json.loads(_read(tmp_path / "grid" / "oracle.json"))
    assert sorted(oracle["end_order"]) == [f"{i:02d}" for i in range(12)] and oracle["ongoing_trials"] == {}


def test_worker_without_a_chief_exits_3_in_one_line_within_its_timeout(tmp_path):
    port = launch.free_port()  # nothing listens there
    env = _env(KERASTUNER_TUNER_ID="tuner0", KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "nfnet_keras.tuner.grid", *TINY, "--chief-timeout", "2",
                             "--directory", str(tmp_path / "runs")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    seconds = time.time() - started
    assert result.returncode == exits.NO_ANSWER == 3
    assert result.stderr == (
        f"error: no chief answered at 127.0.0.1:{port} (KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT) within 2 s at "
        "start; start the chief first (KERASTUNER_TUNER_ID=chief, same flags), check the address and port, or "
        "raise --chief-timeout.\n")
    assert 2 <= seconds < 60  # it waited its 2 s, then gave up (no framework loaded, no hang)
    assert os.listdir(tmp_path) == []  # nothing written


def test_worker_whose_chief_stops_answering_gets_a_fatal_one_line_error(kerastuner_env):
    """KerasTuner's client waits up to an hour per request; bounded, it raises ChiefUnreachable (a FatalError,
    which KerasTuner does not record as the trial's failure)."""
    port = launch.free_port()
    kerastuner_env(KERASTUNER_TUNER_ID="tuner1", KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
    oracle = keras_tuner.oracles.GridSearchOracle(objective="val_accuracy", max_trials=1)
    client = distributed.bounded_client(oracle_client.OracleClient(oracle), timeout=0.5)
    started = time.time()
    with pytest.raises(distributed.ChiefUnreachable) as caught:
        client.create_trial("tuner1")
    assert time.time() - started < 10
    assert isinstance(caught.value, keras_tuner.errors.FatalError)
    assert str(caught.value) == (
        f"no chief answered at 127.0.0.1:{port} (KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT) within 0.5 s to "
        "CreateTrial; start the chief first (KERASTUNER_TUNER_ID=chief, same flags), check the address and port, "
        "or raise --chief-timeout.")


def test_idle_worker_waits_before_asking_again(monkeypatch):
    """Told IDLE (every grid point taken, some still running), KerasTuner's worker would ask again at once."""
    answers = [trial_module.TrialStatus.IDLE, trial_module.TrialStatus.RUNNING]

    class Client:
        stub = object()

        def create_trial(self, tuner_id):
            return trial_module.Trial(keras_tuner.HyperParameters(), trial_id="0", status=answers.pop(0))

    sleeps = []
    monkeypatch.setattr(distributed.time, "sleep", sleeps.append)
    client = distributed.bounded_client(Client(), timeout=5)
    assert client.create_trial("tuner0").status == "IDLE" and sleeps == [distributed.IDLE_WAIT]
    assert client.create_trial("tuner0").status == "RUNNING" and sleeps == [distributed.IDLE_WAIT]


def test_chief_on_a_busy_port_raises_a_one_line_error(kerastuner_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kerastuner_env(KERASTUNER_TUNER_ID="chief", KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
        oracle = keras_tuner.oracles.GridSearchOracle(objective="val_accuracy", max_trials=1)
        with pytest.raises(distributed.ChiefCannotListen) as caught:
            distributed.serve(oracle)
    assert str(caught.value) == (
        f"the chief cannot listen on 127.0.0.1:{port} (KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT): the port is in "
        "use or the IP is not an address of this host; choose another port, or 0.0.0.0 to listen on every "
        "interface.")


@pytest.mark.parametrize("env, flags, message", [
    ({"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_TUNER_ID": "tuner0"}, [],
     "KERASTUNER_ORACLE_IP is set but KERASTUNER_ORACLE_PORT not; a distributed search needs all three "
     "(KERASTUNER_TUNER_ID=chief or tuner0, tuner1, ...), a single one none."),
    ({"KERASTUNER_ORACLE_IP": "127.0.0.1"}, [],
     "KERASTUNER_ORACLE_IP is set but KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID not; a distributed search "
     "needs all three (KERASTUNER_TUNER_ID=chief or tuner0, tuner1, ...), a single one none."),
    ({"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "8000", "KERASTUNER_TUNER_ID": "chief"},
     ["--local-workers", "2"],
     "--local-workers sets KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT itself; unset "
     "them, or drop --local-workers."),
], ids=["no_port", "no_port_no_id", "local_workers_with_env"])
def test_cli_refuses_an_incomplete_or_conflicting_setup_in_one_line(env, flags, message, kerastuner_env, tmp_path,
                                                                    capsys):
    kerastuner_env(**env)
    assert grid.main([*flags, "--directory", str(tmp_path / "runs")]) == exits.BAD_INPUT
    assert capsys.readouterr().err == f"error: {message}\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--local-workers", "-1"], "--local-workers must be >= 0, got -1."),
    (["--chief-timeout", "0"], "--chief-timeout must be a positive number of seconds, got 0."),
])
def test_cli_rejects_bad_distributed_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        grid.parse_config(flags)
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
