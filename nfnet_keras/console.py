"""Quiet start-up: TensorFlow's C++ start-up lines kept out of the user's terminal.

Importing TensorFlow prints half a dozen lines from its C++ core (absl's
"log messages before absl::InitializeLog()", oneDNN, CUDA probing, and on a
machine without a GPU driver `E0000 ... failed call to cuInit`) straight to
file descriptor 2, before any Python logging setting can apply. `quiet_startup`
sends descriptor 2 to a temporary file for the duration of the import and the
first device query, then restores it; if the block raises, the captured text
is written back so nothing that explains a failure is lost.

Set `NFNET_VERBOSE=1` to see the lines.
"""

import contextlib
import json
import os
import sys
import tempfile

VERBOSE_ENV = "NFNET_VERBOSE"


def verbose():
    """Whether the user asked to see TensorFlow's start-up lines (`NFNET_VERBOSE=1`)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


@contextlib.contextmanager
def quiet_startup():
    """Redirects file descriptor 2 to a temporary file for the block (unless `NFNET_VERBOSE=1`)."""
    if verbose() or "tensorflow" in sys.modules:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (e.g. some notebooks)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        else:
            _restore(saved)


def _restore(saved):
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def import_backend_quietly():
    """Imports Keras (and TensorFlow, under that backend) and queries the devices once, quietly."""
    with quiet_startup():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()


def keras_backend():
    """The Keras backend this process uses, read without importing Keras when it is not loaded yet.

    Keras' own order: `$KERAS_BACKEND`, then `"backend"` in `$KERAS_HOME/keras.json`
    (`~/.keras/keras.json`), then TensorFlow.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def started_as_command():
    """Whether this process is one of the package's commands, which load Keras only after parsing.

    True for a console script (`nfnet-fit`, ...: `sys.argv[0]` names it) and for
    `python -m nfnet_keras.<command>` (Python sets `sys.argv[0]` to `"-m"` while
    it imports the packages above the module it runs).
    """
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0).startswith("nfnet-")


def prog(module):
    """The command's name as the user typed it, for usage lines.

    `nfnet-fit ...` gives `nfnet-fit`; `python -m nfnet_keras.fit ...` gives
    `python -m nfnet_keras.fit` (the module actually run, so an alias such as
    `python -m tuner.grid` keeps its own name).

    Args:
        module: str. The module to name when run with `python -m` and
            `__main__` does not say which it is.

    Returns:
        str. The `prog` for `argparse.ArgumentParser`.
    """
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name == "-c":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = getattr(spec, "name", None) or module
        return f"python -m {name.removesuffix('.__main__')}"
    return name
