"""`--strategy data_parallel` in 2 processes on 127.0.0.1 (`nfnet_keras.distribution`, `nfnet_keras.launch`).

The processes join through `keras.distribution.initialize` (JAX, Gloo collectives over TCP), one CPU
device each. The slow tests start real processes under `KERAS_BACKEND=jax`; they skip without jax.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from nfnet_keras import distribution, exits, launch

from conftest import checkout_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
PEER_TIMEOUT = 10  # NFNET_PEER_TIMEOUT of the slow tests' processes
# A process that loses its peer exits within the peer timeout; the margin covers a loaded machine.
EXIT_BOUND_S = PEER_TIMEOUT + 50
JAX_COORDINATOR_LOST = "Terminating process because the JAX distributed service detected fatal errors"

# A few SGD steps (momentum, weight decay, AGC) of the tiny net on batches of 32 from the CIFAR-10 pipeline
# of nfnet-fit, from the weights in argv[2] (written by the first run, read by the later ones); saves every
# process's weights to argv[3].<process>.npz.
STEP_SCRIPT = r"""
import os, sys
import jax
import keras
import numpy as np
from nfnet_keras.config import TrainConfig
from nfnet_keras.training import build_for, compile_model, load_splits, make_datasets, setup_runtime

data_dir, start, out, strategy = sys.argv[1:5]
config = TrainConfig(preset="tiny", epochs=1, batch_size=32, lr=0.1, agc=0.01, train_limit=128, val_size=32,
                     data_dir=data_dir, strategy=strategy).validate()
scope = setup_runtime(config)
train, val, _ = load_splits(config)
train_ds, _ = make_datasets(config, train, val)
with scope.scope():
    model = build_for(config)
    compile_model(model, config, steps_per_epoch=4)
if os.path.exists(start):
    model.load_weights(start)
else:
    model.save_weights(start)
before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
model.fit(train_ds, epochs=1, verbose=0)
after = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
np.savez(f"{out}.{jax.process_index()}.npz", *after)
print("CHANGE", max(float(np.abs(a - b).max()) for a, b in zip(before, after)), flush=True)
"""

FIT_ARGS = ["--preset", "tiny", "--epochs", "2", "--batch-size", "32", "--train-limit", "128", "--val-size", "64",
            "--test-limit", "64", "--quiet", "--no-export"]


def _env(tmp_path, **extra):
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return checkout_env(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp),
                        NFNET_PEER_TIMEOUT=str(PEER_TIMEOUT), **extra)


def _start(command, tmp_path, processes, name, extra_env=None):
    """Starts `command` as `processes` joined processes; returns [(Popen, log path)]."""
    port = launch.free_port()
    started = []
    for index in range(processes):
        env = _env(tmp_path, **(extra_env or {}))
        if processes > 1:
            env.update(KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}", KERAS_DISTRIBUTION_NUM_PROCESSES=str(
                processes), KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        log = tmp_path / f"{name}.{index}.log"
        with open(log, "w") as out:
            started.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT),
                            log))
    return started


def _wait_for(condition, procs, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        for proc, log in procs:
            assert proc.poll() is None, f"a process ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def _errors(log):
    return [line for line in log.read_text().splitlines() if line.startswith("error:")]


def _kill_all(procs):
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The real CIFAR-10 (`NFNET_DATA_DIR`) when set, else the synthetic copy."""
    from conftest import write_synthetic_cifar

    return os.environ.get("NFNET_DATA_DIR") or write_synthetic_cifar(tmp_path_factory.mktemp("synthetic_cifar"))


# === Two processes train as one process on the global batch ===


@pytest.mark.slow
@needs_jax
def test_two_processes_hold_the_weights_of_one_process_on_the_global_batch(tmp_path, data_dir):
    command = [sys.executable, "-c", STEP_SCRIPT, data_dir, str(tmp_path / "start.weights.h5")]
    [(one, one_log)] = _start(command + [str(tmp_path / "one"), "none"], tmp_path, 1, "one")
    assert one.wait(timeout=600) == 0, one_log.read_text()[-3000:]
    two = _start(command + [str(tmp_path / "two"), "data_parallel"], tmp_path, 2, "two")
    try:
        for proc, log in two:
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        _kill_all(two)
    assert "Data parallel over 2 device(s) in 2 processes (this is process 1)" in two[1][1].read_text()
    assert float(one_log.read_text().split("CHANGE")[1].split()[0]) > 1e-3  # the steps moved the weights
    single, process_0, process_1 = (np.load(tmp_path / name) for name in ("one.0.npz", "two.0.npz", "two.1.npz"))
    assert len(single.files) == len(process_0.files) == len(process_1.files) > 10
    for key in single.files:
        assert np.abs(process_0[key] - process_1[key]).max() == 0.0, key  # the same replica on both
        assert np.abs(process_0[key] - single[key]).max() <= 1e-5, key


@pytest.mark.slow
@needs_jax
def test_process_zero_writes_the_run_a_lost_process_ends_the_other_and_a_rerun_resumes(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    fit = [sys.executable, "-m", "nfnet_keras.fit", *FIT_ARGS, "--strategy", "data_parallel", "--data-dir",
           data_dir, "--run-dir", str(run_dir)]
    checkpoint = run_dir / "checkpoints" / "epoch-0001"

    # 1. Process 1 is killed after epoch 1: process 0 exits with one line and PEER_LOST.
    procs = _start(fit, tmp_path, 2, "first")
    try:
        _wait_for(checkpoint.exists, procs, 600, "checkpoint of epoch 1")
        procs[1][0].kill()
        killed = time.time()
        status = procs[0][0].wait(timeout=EXIT_BOUND_S + 60)
        waited = time.time() - killed
    finally:
        _kill_all(procs)
    log = procs[0][1]
    assert status == exits.PEER_LOST, log.read_text()[-3000:]
    assert waited <= EXIT_BOUND_S
    [error] = _errors(log)
    assert error.startswith("error: process 0 of 2: ") and "rerun every process with the same command" in error
    assert "Traceback" not in log.read_text()

    # 2. Rerun; once process 0 resumes from its checkpoint, it is killed: process 1 exits the same way.
    procs = _start(fit, tmp_path, 2, "second")
    try:
        _wait_for(lambda: "Resuming from" in procs[0][1].read_text(), procs, 600, "resume")
        procs[0][0].kill()
        killed = time.time()
        status = procs[1][0].wait(timeout=EXIT_BOUND_S + 60)
        waited = time.time() - killed
    finally:
        _kill_all(procs)
    log = procs[1][1]
    assert waited <= EXIT_BOUND_S
    # Process 0 hosts JAX's coordination service. Its loss reaches process 1 twice: as a failed collective
    # (the package's line and PEER_LOST) and through the coordination client's error poll, which in jax 0.10.2
    # ends the process with its own fatal log line, by status 1 or by SIGABRT (both seen; a Python callback cannot
    # take that error: it aborts on std::bad_cast). Whichever comes first ends the process, at once and without a
    # traceback.
    if status in (1, -signal.SIGABRT):
        assert JAX_COORDINATOR_LOST in log.read_text(), log.read_text()[-3000:]
    else:
        assert status == exits.PEER_LOST, log.read_text()[-3000:]
        [error] = _errors(log)
        assert error.startswith("error: process 1 of 2: ")
    assert "Traceback" not in log.read_text()
    assert "Received process 0's checkpoints" in log.read_text()

    # 3. The launcher reruns both: they resume from epoch 1 and finish.
    result = subprocess.run([sys.executable, "-m", "nfnet_keras.launch", "--processes", "2", "--peer-timeout",
                             str(PEER_TIMEOUT), "--", *fit[3:]], cwd=ROOT, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Resuming from" in result.stdout and "(epoch 1 complete)" in result.stdout
    assert "[process 1] Received process 0's checkpoints" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == [0, 1] and metrics["epochs_completed"] == 2
    assert metrics["config"]["strategy"] == "data_parallel" and 0.0 <= metrics["test_accuracy"] <= 1.0
    # Only process 0 wrote the run; the others' temporary folders are gone (the killed ones' too).
    assert sorted(os.listdir(run_dir)) == [".lock", "checkpoints", "config.json", "history.csv", "logs",
                                           "metrics.json", "model.keras"]
    assert [name for name in os.listdir(tmp_path / "tmp") if name.startswith("nfnet-")] == []


# === Settings and the launcher ===


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--processes", "0"], {}, "--processes must be >= 1, got 0."),
        (["--peer-timeout", "0"], {}, "--peer-timeout must be >= 1 second, got 0."),
        (["--port", "70000"], {}, "--port must be in [0, 65535] (0: a free port), got 70000."),
        ([], {"KERAS_BACKEND": "tensorflow"}, "--strategy data_parallel runs on the JAX backend and KERAS_BACKEND "
         "is tensorflow: unset it or set KERAS_BACKEND=jax."),
        ([], {"KERAS_DISTRIBUTION_PROCESS_ID": "1"}, "KERAS_DISTRIBUTION_PROCESS_ID already set: the launcher sets "
         "them for each process; unset them, or start nfnet_keras.fit yourself on each host (docs/backends.md)."),
        (["--", "--epochs", "1", "--strategy", "none"], {}, "the launcher runs --strategy data_parallel, got "
         "--strategy none; drop that flag."),
    ],
)
def test_the_launcher_refuses_bad_input_with_one_line(argv, environ, message, monkeypatch, capsys):
    for name in ("KERAS_BACKEND", *distribution.MULTI_HOST_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert launch.main(argv) == exits.BAD_INPUT
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"error: {message}"] and out == ""


def test_the_launcher_refuses_a_port_in_use(monkeypatch, capsys):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if importlib.util.find_spec("jax") is None:
            pytest.skip("jax not installed")
        assert launch.main(["--port", str(port)]) == exits.BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use; give another --port, or 0 for a free one."]


def test_the_launcher_reports_the_first_failure_and_its_status(capsys):
    # Stand-ins for the fit processes: process 1 fails first (status 6), process 0 is then ended by SIGTERM.
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(6)"])
    failing.wait()
    ended = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended.terminate()
    ended.wait()
    assert launch.wait([ended, failing], peer_timeout=1) == 143  # the first in process order that failed
    assert launch.status_of(-signal.SIGKILL) == 137 and launch.status_of(6) == 6
    [line] = capsys.readouterr().err.splitlines()
    assert line == "error: process 0 of 2 failed first (exit status 143); the others' statuses: 1: 6."


def test_the_launcher_kills_processes_that_outlive_the_grace_period(monkeypatch, capsys):
    monkeypatch.setattr(launch, "GRACE_SECONDS", 0)
    failed = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(6)"])
    failed.wait()
    hanging = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    start = time.time()
    assert launch.wait([hanging, failed], peer_timeout=1) == 6
    assert time.time() - start < 30 and hanging.returncode == -signal.SIGKILL
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: 1 process(es) still running 1 s after process 1 failed; killed them.",
                   "error: process 1 of 2 failed first (exit status 6); the others' statuses: 0: 137."]


@needs_jax
@pytest.mark.parametrize(
    "name, value, message",
    [
        ("NFNET_PEER_TIMEOUT", "soon", "NFNET_PEER_TIMEOUT must be a whole number of seconds >= 1, got 'soon'."),
        ("NFNET_JOIN_TIMEOUT", "0", "NFNET_JOIN_TIMEOUT must be a whole number of seconds >= 1, got '0'."),
    ],
)
def test_bad_timeouts_are_refused_before_joining(name, value, message):
    environ = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
               "KERAS_DISTRIBUTION_PROCESS_ID": "0", name: value}
    with pytest.raises(ValueError) as raised:
        distribution._initialize_processes(environ)
    assert str(raised.value) == message


def test_only_process_zero_writes_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    run_dir = str(tmp_path / "run")
    multi = {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1"}
    with distribution.own_run_dir(run_dir, dict(multi, KERAS_DISTRIBUTION_PROCESS_ID="0")) as own:
        assert own == run_dir
    with distribution.own_run_dir(run_dir, {}) as own:
        assert own == run_dir  # one process
    dead = tmp_path / f"{distribution.PROCESS_TMP_PREFIX}999999999-x"  # left by a process no longer alive
    dead.mkdir()
    with distribution.own_run_dir(run_dir, dict(multi, KERAS_DISTRIBUTION_PROCESS_ID="1")) as own:
        assert os.path.dirname(os.path.dirname(own)) == str(tmp_path)
        assert os.path.basename(os.path.dirname(own)).startswith(f"{distribution.PROCESS_TMP_PREFIX}{os.getpid()}-")
        assert not dead.exists()
        os.makedirs(own)
        (tmp_path / "run").exists() and pytest.fail("process 1 created the run dir")
    assert os.listdir(tmp_path) == []


def test_a_failed_collective_is_a_lost_peer_only_with_several_processes(monkeypatch):
    error = RuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:2946: "
                         "Connection reset by peer")
    assert distribution.peer_failure(error) is None  # one process: not a peer's failure
    monkeypatch.setitem(distribution._state, "processes", 2)
    monkeypatch.setitem(distribution._state, "index", 1)
    assert distribution.peer_failure(error) == (
        "process 1 of 2: a collective with another process failed (UNKNOWN: Gloo all-reduce failed: [pair.cc:538] "
        "Read error [127.0.0.1]:2946: Connection reset by peer); rerun every process with the same command to "
        "resume from the last checkpoint.")
    assert distribution.peer_failure(ValueError("bad flag")) is None


@needs_jax
def test_jax_still_creates_its_coordination_client_through_the_name_the_join_overrides():
    # distribution._runtime_timeouts replaces these two factories of jax._src.distributed._jax during the join.
    from jax._src import distributed as jax_distributed

    real = jax_distributed._jax
    for argument in ("heartbeat_timeout", "init_timeout"):
        assert f"{argument}:" in real.get_distributed_runtime_client.__doc__, argument
    assert "heartbeat_timeout:" in real.get_distributed_runtime_service.__doc__
    with distribution._runtime_timeouts(7, 9):
        overlay = jax_distributed._jax
        assert overlay.get_distributed_runtime_client is not real.get_distributed_runtime_client
        assert overlay.DistributedRuntimeClient is real.DistributedRuntimeClient
    assert jax_distributed._jax is real
