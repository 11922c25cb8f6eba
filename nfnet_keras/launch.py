"""Data-parallel training in several processes on this machine: `python -m nfnet_keras.launch --processes 2 -- ARGS`.

Starts `--processes` copies of `python -m nfnet_keras.fit --strategy
data_parallel ARGS` under `KERAS_BACKEND=jax`, each with its own
`KERAS_DISTRIBUTION_PROCESS_ID`, joined through a coordinator at
`127.0.0.1:--port` (`keras.distribution.initialize`; Gloo collectives over
TCP). Process 0 writes the run (`--run-dir`); the others' lines are printed
with a `[process K]` prefix. Ctrl-C reaches every process (each checkpoints and
stops); SIGTERM to the launcher is passed on to them. When one process fails,
the others stop within `--peer-timeout` seconds; the launcher then exits with
the status of the first process that failed (a process ended by a signal:
128 + its number). On several machines, start `nfnet_keras.fit` on each with
the three variables instead (docs/backends.md).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from nfnet_keras import exits
from nfnet_keras.console import prog

# The variables `keras.distribution.initialize()` reads (as `nfnet_keras.distribution.MULTI_HOST_ENV`, without
# importing Keras here).
ADDRESS, NUM_PROCESSES, PROCESS_ID = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                                      "KERAS_DISTRIBUTION_PROCESS_ID")
PEER_TIMEOUT_ENV = "NFNET_PEER_TIMEOUT"
# Seconds the launcher waits, beyond --peer-timeout, for the other processes to stop after one failed.
GRACE_SECONDS = 30


def build_parser():
    p = argparse.ArgumentParser(
        prog=prog("nfnet_keras.launch"),
        description="Train with --strategy data_parallel in several processes on this machine (JAX backend). "
        "Arguments after -- go to nfnet_keras.fit.",
        epilog="Exit statuses: 0 every process done; 2 bad input; otherwise the status of the first process "
        "that failed (128 + N for a process ended by signal N).",
    )
    p.add_argument("--processes", type=int, default=2, metavar="N", help="processes to start (default: 2)")
    p.add_argument("--port", type=int, default=0,
                   help="the coordinator's TCP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--peer-timeout", type=int, default=60, metavar="SECONDS",
                   help="a process that stops answering for this long ends the others (default: 60)")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="nfnet_keras.fit's flags (--strategy data_parallel is added)")
    return p


def problem(args, environ):
    """Why the launch cannot start, as one line, or None."""
    import importlib.util

    if args.processes < 1:
        return f"--processes must be >= 1, got {args.processes}."
    if not 0 <= args.port <= 65535:
        return f"--port must be in [0, 65535] (0: a free port), got {args.port}."
    if args.peer_timeout < 1:
        return f"--peer-timeout must be >= 1 second, got {args.peer_timeout}."
    backend = environ.get("KERAS_BACKEND", "jax")
    if backend != "jax":
        return (f"--strategy data_parallel runs on the JAX backend and KERAS_BACKEND is {backend}: unset it or "
                "set KERAS_BACKEND=jax.")
    already = [name for name in (ADDRESS, NUM_PROCESSES, PROCESS_ID) if environ.get(name)]
    if already:
        return (f"{', '.join(already)} already set: the launcher sets them for each process; unset them, or "
                "start nfnet_keras.fit yourself on each host (docs/backends.md).")
    strategies = [a.split("=", 1)[1] if "=" in a else nxt
                  for a, nxt in zip(args.fit_args, args.fit_args[1:] + [None]) if a.split("=")[0] == "--strategy"]
    if any(s != "data_parallel" for s in strategies):
        return f"the launcher runs --strategy data_parallel, got --strategy {strategies[-1]}; drop that flag."
    if importlib.util.find_spec("jax") is None:
        return "the JAX backend is not installed: pip install -e '.[jax]'."
    return None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _relay(stream, out, prefix):
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def start(fit_args, processes, port, peer_timeout, environ=None):
    """Starts the processes; returns their `Popen`s (process 0 first) and the threads relaying their output."""
    environ = dict(os.environ if environ is None else environ)
    command = [sys.executable, "-m", "nfnet_keras.fit", *fit_args]
    if "--strategy" not in {a.split("=")[0] for a in fit_args}:
        command += ["--strategy", "data_parallel"]
    popens, threads = [], []
    for index in range(processes):
        env = dict(environ, KERAS_BACKEND="jax", **{ADDRESS: f"127.0.0.1:{port}", NUM_PROCESSES: str(processes),
                                                    PROCESS_ID: str(index), PEER_TIMEOUT_ENV: str(peer_timeout)})
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                bufsize=1)
        popens.append(proc)
        prefix = "" if index == 0 else f"[process {index}] "
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            thread = threading.Thread(target=_relay, args=(stream, out, prefix), daemon=True)
            thread.start()
            threads.append(thread)
    return popens, threads


def status_of(returncode):
    """A process's exit status as a shell reports it (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def wait(popens, peer_timeout):
    """Waits for every process; after the first failure, `peer_timeout + GRACE_SECONDS` at most, then kills the rest.

    Returns the launcher's exit status.
    """
    first_failure, deadline = None, None
    while True:
        running = [p for p in popens if p.poll() is None]
        for index, p in enumerate(popens):
            if p.returncode not in (None, 0) and first_failure is None:
                first_failure = (index, status_of(p.returncode))
                deadline = time.time() + peer_timeout + GRACE_SECONDS
        if not running:
            break
        if deadline is not None and time.time() > deadline:
            for p in running:
                p.kill()
            print(f"error: {len(running)} process(es) still running {peer_timeout + GRACE_SECONDS} s after process "
                  f"{first_failure[0]} failed; killed them.", file=sys.stderr, flush=True)
            for p in running:
                p.wait()
            break
        time.sleep(0.2)
    if first_failure is None:
        return exits.OK
    index, status = first_failure
    others = ", ".join(f"{i}: {status_of(p.returncode)}" for i, p in enumerate(popens) if i != index)
    print(f"error: process {index} of {len(popens)} failed first (exit status {status}); the others' statuses: "
          f"{others}.", file=sys.stderr, flush=True)
    return status


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fit_args[:1] == ["--"]:
        args.fit_args = args.fit_args[1:]
    reason = problem(args, os.environ)
    if reason is None and args.port and port_in_use(args.port):
        reason = f"port {args.port} on 127.0.0.1 is in use; give another --port, or 0 for a free one."
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return exits.BAD_INPUT
    port = args.port or free_port()
    print(f"Starting {args.processes} processes, coordinator 127.0.0.1:{port}.", flush=True)
    popens, threads = start(args.fit_args, args.processes, port, args.peer_timeout)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the processes themselves

    def forward(signum, frame):
        for p in popens:
            if p.poll() is None:
                p.send_signal(signum)

    previous_term = signal.signal(signal.SIGTERM, forward)
    try:
        status = wait(popens, args.peer_timeout)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
    for thread in threads:
        thread.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
