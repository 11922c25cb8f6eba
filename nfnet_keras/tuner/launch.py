"""Roles and start-up of a distributed grid search, without loading TensorFlow.

KerasTuner 1.4.8 runs a search on several processes through three environment
variables: `KERASTUNER_TUNER_ID` (`chief`, or `tuner0`, `tuner1`, ... for the
workers), `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT`. This module reads
them (`role`), checks that a worker's chief answers before the worker loads
anything (`chief_problem`), and starts a chief and N workers on this machine
(`launch_local`, what `nfnet-grid --local-workers N` runs). The gRPC service
itself is in `nfnet_keras.tuner.distributed`.
"""

import os
import signal
import socket
import subprocess
import sys
import time

TUNER_ID, ORACLE_IP, ORACLE_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"
LOOPBACK = "127.0.0.1"


def role():
    """"single", "chief" or "worker", as KerasTuner reads its environment variables.

    Raises:
        RuntimeError: `KERASTUNER_ORACLE_IP` is set without the port or the tuner's ID.
    """
    if ORACLE_IP not in os.environ:  # KerasTuner's test (keras_tuner.src.distribute.utils.has_chief_oracle)
        return "single"
    missing = [name for name in (ORACLE_PORT, TUNER_ID) if name not in os.environ]
    if missing:
        raise RuntimeError(f"{ORACLE_IP} is set but {' and '.join(missing)} not; a distributed search needs all "
                           f"three ({TUNER_ID}=chief or tuner0, tuner1, ...), a single one none.")
    return "chief" if "chief" in os.environ[TUNER_ID] else "worker"


def address():
    """`ip:port` of the chief, from KerasTuner's environment variables."""
    return f"{os.environ[ORACLE_IP]}:{os.environ[ORACLE_PORT]}"


def unreachable_message(timeout, during="at start", where=None):
    """The one-line error of a worker that got no answer from its chief (at `where`, default `address()`)."""
    return (f"no chief answered at {where or address()} ({ORACLE_IP}:{ORACLE_PORT}) within {timeout:g} s {during}; "
            f"start the chief first ({TUNER_ID}=chief, same flags), check the address and port, or raise "
            "--chief-timeout.")


def chief_problem(timeout, where=None):
    """None once the chief's gRPC server (at `where`, default `address()`) accepts a connection; else the error."""
    import grpc

    channel = grpc.insecure_channel(where or address())
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return unreachable_message(timeout, where=where)
    finally:
        channel.close()
    return None


def free_port():
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def launch_local(argv, workers, log_prefix):
    """Runs `python -m nfnet_keras.tuner.grid argv` as a chief and `workers` workers on 127.0.0.1.

    The chief writes to this process's output, worker i to `<log_prefix>tuner<i>.log`. The workers
    start once the chief listens. Returns 0 when all exit 0; else the first non-zero exit status,
    after stopping the others.
    """
    env = {k: v for k, v in os.environ.items() if k not in (TUNER_ID, ORACLE_IP, ORACLE_PORT)}
    env.update({ORACLE_IP: LOOPBACK, ORACLE_PORT: str(free_port())})
    command = [sys.executable, "-m", "nfnet_keras.tuner.grid", *argv, "--local-workers", "0"]
    logs = {f"tuner{i}": f"{log_prefix}tuner{i}.log" for i in range(workers)}
    print(f"Local search on {env[ORACLE_IP]}:{env[ORACLE_PORT]}: a chief and {workers} worker(s); the workers' "
          f"logs: {', '.join(logs.values())}", flush=True)
    processes = {"chief": subprocess.Popen(command, env={**env, TUNER_ID: "chief"})}
    try:
        where = f"{env[ORACLE_IP]}:{env[ORACLE_PORT]}"
        while processes["chief"].poll() is None and chief_problem(1.0, where):
            pass  # the chief loads the framework and reloads the project; a failure ends it
        for name, log in logs.items() if processes["chief"].poll() is None else ():
            with open(log, "w") as out:
                processes[name] = subprocess.Popen(command, env={**env, TUNER_ID: name}, stdout=out,
                                                   stderr=subprocess.STDOUT)
        return _wait_all(processes, logs)
    except BaseException:  # Ctrl-C, or a log that could not be opened: no process is left behind
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes.values():
            process.wait()
        raise


def _wait_all(processes, logs):
    while True:
        codes = {name: process.poll() for name, process in processes.items()}
        failed = next((name for name, code in codes.items() if code not in (None, 0)), None)
        if failed is not None:
            for process in processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in processes.values():
                process.wait()
            where = f"; see {logs[failed]}" if failed in logs else ""
            print(f"error: {failed} exited with status {codes[failed]}{where}; the others were stopped. Rerun the "
                  "same command to resume.", file=sys.stderr)
            return codes[failed]
        if all(code == 0 for code in codes.values()):
            return 0
        time.sleep(0.5)
