"""The run directory: finding the run to resume, one process per run, leftovers, results.

A run directory holds `config.json`, `history.csv`, `checkpoints/`, `logs/`
and, once finished, `model.keras` and `metrics.json`. A run is identified by
its config without the locations of things (`TrainConfig.identity`) plus a
fingerprint of the data's content, so the same flags with the data in another
folder resume the same run.
"""

import contextlib
import csv
import datetime
import errno
import fcntl
import glob
import hashlib
import os
import shutil

from nfnet_keras import fileio
from nfnet_keras.config import identity_of

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
LOCK_FILE = ".lock"


class RunBusy(RuntimeError):
    """Another live process holds the run directory."""


def data_fingerprint(*arrays):
    """A short hash of the content of `arrays` (e.g. the train, validation and test splits)."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(memoryview(a).cast("B") if a.flags.c_contiguous else a.tobytes())
    return h.hexdigest()


def read_record(run_dir):
    """The `config.json` record of `run_dir`: {"config": ..., "data": ...}, or None."""
    try:
        record = fileio.read_json(os.path.join(run_dir, CONFIG_FILE))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None
    return record


def _json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj))


def differences(a, b):
    """Sorted keys whose values differ between two config dicts."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def is_finished(run_dir):
    return os.path.exists(os.path.join(run_dir, METRICS_FILE))


def default_run_dir(config, root="runs", say=print):
    """The newest unfinished run under `root` of the same experiment, else a new `runs/<time>`.

    If no unfinished run matches but one differs in only a few settings, says
    so (through `say`) with the command-line way to resume it.
    """
    identity = _json_roundtrip(config.identity())
    near = None
    for path in sorted(glob.glob(os.path.join(root, "*")), reverse=True):
        record = read_record(path)
        if record is None or is_finished(path):
            continue
        previous = identity_of(record["config"])
        if previous == identity:
            return path
        changed = differences(previous, identity)
        if near is None and len(changed) <= 3:
            near = (path, changed, previous)
    if near is not None:
        path, changed, previous = near
        what = ", ".join(f"{k}={previous.get(k)!r}" for k in changed)
        say(f"note: {path} is an unfinished run that differs only in {what}; to resume it, rerun with "
            f"--run-dir {path} and those settings.")
    return os.path.join(root, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def check_run_dir(run_dir, config):
    """Raises ValueError if `run_dir` holds a finished run or another experiment's run."""
    record = read_record(run_dir)
    if record is not None:
        changed = differences(identity_of(record["config"]), _json_roundtrip(config.identity()))
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with a different config ({', '.join(changed)} differ); "
                "use another --run-dir or the same flags to resume."
            )
    if is_finished(run_dir):
        raise ValueError(f"{run_dir} holds a finished run; use another --run-dir.")


def check_data(run_dir, fingerprint):
    """Raises ValueError if the run in `run_dir` was trained on other data."""
    record = read_record(run_dir)
    previous = (record or {}).get("data")
    if previous and previous != fingerprint:
        raise ValueError(
            f"{run_dir} was trained on other data (fingerprint {previous}, now {fingerprint}); "
            "point --data-dir at the same CIFAR-10 copy, or use another --run-dir."
        )


def write_record(run_dir, config, fingerprint):
    fileio.write_json(os.path.join(run_dir, CONFIG_FILE), {"config": config.to_dict(), "data": fingerprint})


@contextlib.contextmanager
def locked(folder, what="run directory"):
    """Holds an exclusive lock on `folder` (creating it) for the block: one live process per folder.

    Raises:
        RunBusy: another process holds it; the message names its pid.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise RunBusy(
                f"{folder} is in use by process {holder}; wait for it to finish (or stop it), "
                f"or use another {what}."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def stale_temporaries(folder, recursive=True):
    """Temporaries (`.tmp-<pid>...`) under `folder` left by processes that are no longer alive."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            if fileio.left_by_dead_process(name, fileio.TMP_MARK):
                found.append(os.path.join(dirpath, name))
        dirnames[:] = [d for d in dirnames if not d.startswith(fileio.TMP_MARK)]
        if not recursive:
            break
    return found


def remove_stale_temporaries(folder, recursive=True):
    """Removes what `stale_temporaries` finds; returns the removed paths."""
    removed = stale_temporaries(folder, recursive)
    for path in removed:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
    return removed


def read_history(run_dir):
    """Per-epoch history from `history.csv`, keeping the last row of a repeated epoch."""
    path = os.path.join(run_dir, HISTORY_FILE)
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                try:
                    rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
                except (KeyError, TypeError, ValueError):
                    continue  # a repeated header or a torn line
    history = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            history.setdefault(key, []).append(value)
    return history


def write_metrics(run_dir, metrics):
    return fileio.write_json(os.path.join(run_dir, METRICS_FILE), metrics)
