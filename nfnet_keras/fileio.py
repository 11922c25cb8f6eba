"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the package writes for others to read (configs, metrics, tables,
predictions, checkpoints' state) goes through `atomic_write`: the content is
written to a temporary file beside the target and renamed over it only when
complete. A failure (a full disk, an interrupt) removes the temporary and
leaves any previous file intact.
"""

import contextlib
import errno
import json
import os

TMP_MARK = ".tmp-"


def tmp_path_for(path):
    """The temporary name `atomic_write` uses for `path` (same folder, same extension, owner's pid)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TMP_MARK}{os.getpid()}-{name}")


class WriteError(OSError):
    """Writing a file failed (e.g. no space left); the message names the file and what to do."""

    def __str__(self):
        return self.strerror or super().__str__()


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write (by any writer); renames it to `path` when the block succeeds.

    For writers that take a file name (`model.save`, `save_weights`). The
    temporary keeps `path`'s extension, which such writers check.

    Raises:
        WriteError: the write failed with an OSError (e.g. ENOSPC); the
            temporary is removed and a previous `path` is left as it was.
    """
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise describe_write_error(e, path) from e
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Opens a temporary file for writing; renames it to `path` when the block succeeds.

    Example:

    ```python
    with atomic_write("metrics.json") as f:
        json.dump(metrics, f)
    ```

    Raises:
        WriteError: as `atomic_path`.
    """
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def _remove(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def describe_write_error(error, path):
    """A `WriteError` with one actionable line for an OSError raised while writing `path`."""
    if isinstance(error, WriteError):
        return error
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(error.errno, f"no space left on device writing {path}; free space and rerun to resume")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(error.errno, f"cannot write {path} (permission denied or read-only file system)")
    return WriteError(error.errno, f"cannot write {path}: {error.strerror or error}")


def write_json(path, obj, indent=2):
    """Writes `obj` as JSON to `path` atomically, creating the folder if needed."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
    return path


def read_json(path, default=None):
    """The JSON object in `path`, or `default` if the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def left_by_dead_process(name, prefix, unowned_is_stale=False):
    """Whether `name` is a temporary `<prefix><pid>-...` whose writing process is no longer alive.

    A name with the prefix but no pid counts as stale only with `unowned_is_stale`.
    """
    if not name.startswith(prefix):
        return False
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return unowned_is_stale
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def pid_alive(pid):
    """Whether a process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unwritable(path):
    """Why `path` cannot be written (a missing or read-only folder, a folder in the way), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is not writable"
    return None


def folder_problem(folder):
    """Why `folder` cannot be used (or created) as a folder to write in, or None.

    Nothing is created: a missing folder is fine when its nearest existing
    ancestor is a writable folder.

    Args:
        folder: str. The folder, as the user gave it.

    Returns:
        str or None. E.g. "runs/x is a file, not a folder", or "folder / is not writable".
    """
    path = os.path.normpath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path or not parent:
            path = parent or "."
            break
        path = parent
    if not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"folder {path} is not writable"
    return None


def check_free_space(folder, needed_bytes, path):
    """Raises WriteError if `folder`'s file system has less than `needed_bytes` free for writing `path`."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: let the write itself report
    if free < needed_bytes:
        raise WriteError(
            errno.ENOSPC,
            f"no space left on device writing {path} (needs ~{needed_bytes / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free); free space and rerun to resume",
        )
