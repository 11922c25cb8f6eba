"""Which distribution a training run uses, per Keras backend.

`--strategy` names it:

- `none`: one device.
- `mirrored`: `tf.distribute.MirroredStrategy` (TensorFlow backend; set up in
  `nfnet_keras.training.setup_runtime`).
- `data_parallel`: `keras.distribution.DataParallel` (JAX backend). Every local
  device holds a replica of the weights; each global batch is split along its
  first axis across the devices, and the gradients are averaged, so a step
  computes the same loss and update as one device on the whole batch. On
  several hosts, `keras.distribution.initialize()` first joins the processes
  (`jax.distributed`), reading the coordinator's address, the number of
  processes and this process's id from `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
  `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`; each
  process then reads its share of every batch from the `tf.data` pipeline.
  On one CPU host, `XLA_FLAGS=--xla_force_host_platform_device_count=N`
  splits the CPU into N devices. See docs/backends.md.

In a run of several processes, CPU devices talk through Gloo (TCP), JAX's
default CPU collectives. Process 0 alone writes the run directory (checkpoints,
logs, metrics, the model, the export); the others write to a temporary folder
of their own, removed at their end, and restore a checkpoint from process 0's
(`ProcessZeroCheckpoint`). A process that stops answering for
`NFNET_PEER_TIMEOUT` seconds (default 60), or whose collective with a dead
peer fails, ends the others with one line and `exits.PEER_LOST`.
`nfnet_keras.launch` starts the processes of one machine.
"""

import contextlib
import os
import sys
import tempfile

import keras

from nfnet_keras import exits

# The strategies each backend runs.
BACKEND_STRATEGIES = {
    "tensorflow": ("none", "mirrored"),
    "jax": ("none", "data_parallel"),
    "torch": ("none",),
    "numpy": ("none",),
    "openvino": ("none",),
}
# Environment variables read by `keras.distribution.initialize()` (one process per host).
MULTI_HOST_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                  "KERAS_DISTRIBUTION_PROCESS_ID")
# Seconds without a heartbeat after which the processes of a run count one of them lost; and seconds the
# processes wait for each other to join.
PEER_TIMEOUT_ENV, JOIN_TIMEOUT_ENV = "NFNET_PEER_TIMEOUT", "NFNET_JOIN_TIMEOUT"
DEFAULT_PEER_TIMEOUT, DEFAULT_JOIN_TIMEOUT = 60, 300


def check_backend(strategy, backend=None):
    """Raises a one-line ValueError if `strategy` does not run on the Keras backend.

    Args:
        strategy: str. A `config.STRATEGIES` name.
        backend: str or None. Defaults to `keras.backend.backend()`.
    """
    backend = backend or keras.backend.backend()
    if strategy in BACKEND_STRATEGIES.get(backend, ("none",)):
        return
    if strategy == "data_parallel":
        raise ValueError(f"--strategy data_parallel runs on the JAX backend (keras.distribution), not on "
                         f"{backend}: run with KERAS_BACKEND=jax (pip install -e '.[jax]').")
    if strategy == "mirrored":
        raise ValueError(f"--strategy mirrored is TensorFlow's tf.distribute.MirroredStrategy, not available on "
                         f"{backend}: use KERAS_BACKEND=tensorflow, or --strategy data_parallel under JAX.")
    raise ValueError(f"--strategy {strategy} does not run on the {backend} backend; use --strategy none.")


def multi_host_requested(environ=None):
    """Whether the `keras.distribution.initialize()` variables are set (a multi-process run)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in MULTI_HOST_ENV)


def process_index(environ=None):
    """This process's id in a multi-process run (`KERAS_DISTRIBUTION_PROCESS_ID`), known before joining; 0 alone."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get(MULTI_HOST_ENV[2]) or 0)
    except ValueError:
        return 0  # refused with its message when the processes join


def is_multi_process():
    """Whether this process has joined a run of several processes."""
    return _state["processes"] > 1


def data_parallel(batch_size, environ=None):
    """Sets a `keras.distribution.DataParallel` over every device for this process; returns it.

    In a multi-process run (any of `MULTI_HOST_ENV` set) the processes join
    first with `keras.distribution.initialize()`, which must come before any
    JAX computation; its devices are then all processes' devices.

    Args:
        batch_size: int. The global batch size; it must split evenly across
            the devices (and processes).
        environ: mapping or None. Defaults to `os.environ`.

    Returns:
        The `keras.distribution.DataParallel`, also set as the global
        distribution (`keras.distribution.distribution()`), which `model.fit`
        uses to place each batch.

    Raises:
        ValueError: not the JAX backend, a bad multi-process setting, or a
            batch size that does not split evenly.
    """
    check_backend("data_parallel")
    environ = os.environ if environ is None else environ
    if multi_host_requested(environ):
        _initialize_processes(environ)
    devices = keras.distribution.list_devices()
    import jax

    processes = jax.process_count()
    if batch_size % len(devices):
        raise ValueError(f"--batch-size {batch_size} does not split evenly across the {len(devices)} devices of "
                         f"--strategy data_parallel; use a multiple of {len(devices)}.")
    # Every process reads every global batch and keeps its own contiguous share (EvenDataParallel).
    distribution = EvenDataParallel(devices=devices, auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    where = f"{processes} processes (this is process {jax.process_index()})" if processes > 1 else "1 process(es)"
    print(f"Data parallel over {len(devices)} device(s) in {where} "
          f"({', '.join(devices[:4])}{', ...' if len(devices) > 4 else ''}): global batch {batch_size}, "
          f"{batch_size // len(devices)} per device.", flush=True)
    return distribution


class EvenDataParallel(keras.distribution.DataParallel):
    """`DataParallel` whose `tf.data` batches are checked to split evenly across the devices.

    JAX places a batch on the devices by splitting its first axis, which must
    divide evenly; Keras computes that placement from a dataset's first batch
    and applies it to every batch. A last batch that does not split (e.g. 15
    images on 2 devices) would fail deep inside JAX; here it stops the
    pipeline with an error that names the batch and what to change.

    With several processes, each reads the whole global batch and keeps its
    contiguous share (process `k` of `P`: rows `k * n / P` to `(k + 1) * n / P`
    of a batch of `n`), the rows its devices hold in the mesh. Keras' own
    sharding (`rebatch`, then every `P`-th piece) gives a short last batch to
    some processes only, and the processes would then run different steps.
    """

    def distribute_dataset(self, dataset):
        dataset = super().distribute_dataset(dataset)
        import tensorflow as tf

        if not isinstance(dataset, tf.data.Dataset):
            return dataset
        devices = int(self.device_mesh.devices.size)
        processes, index = self.num_processes, self._process_id

        def share(*batch):
            size = tf.shape(tf.nest.flatten(batch)[0])[0]
            check = tf.debugging.assert_equal(
                size % devices, 0,
                message=f"{UNEVEN_BATCH}: a batch does not split evenly across the {devices} devices of --strategy "
                "data_parallel; choose --batch-size, --train-limit and --val-size so that every batch, the last "
                f"of each split included, holds a multiple of {devices} images (the test set runs in batches "
                "of 256)",
            )
            with tf.control_dependencies([check]):
                rows = size // processes
                batch = tf.nest.map_structure(lambda t: t[index * rows:(index + 1) * rows], batch)
            return batch if len(batch) > 1 else batch[0]

        return dataset.map(share)


# Starts the message of the error a batch that does not split raises.
UNEVEN_BATCH = "uneven batch"


# === Several processes ===

_state = {"processes": 1, "index": 0, "left": False}


def _timeout(environ, name, default):
    value = environ.get(name) or str(default)
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}.")
    return seconds


def _initialize_processes(environ):
    import jax

    if jax.distributed.is_initialized():
        return
    values = {name: environ.get(name) for name in MULTI_HOST_ENV}
    missing = [name for name in MULTI_HOST_ENV[1:] if not values[name]]
    if missing:
        raise ValueError(f"multi-host --strategy data_parallel needs {', '.join(MULTI_HOST_ENV)}; "
                         f"{', '.join(missing)} not set.")
    try:
        processes, process_id = int(values[MULTI_HOST_ENV[1]]), int(values[MULTI_HOST_ENV[2]])
    except ValueError:
        raise ValueError(f"{MULTI_HOST_ENV[1]} and {MULTI_HOST_ENV[2]} must be integers, got "
                         f"{values[MULTI_HOST_ENV[1]]!r} and {values[MULTI_HOST_ENV[2]]!r}.") from None
    if not 0 <= process_id < processes:
        raise ValueError(f"{MULTI_HOST_ENV[2]} must be in [0, {processes - 1}], got {process_id}.")
    if not values[MULTI_HOST_ENV[0]] and processes > 1:
        raise ValueError(f"{MULTI_HOST_ENV[0]} must name the coordinator (process 0), e.g. 10.0.0.1:1234.")
    peer_timeout = _timeout(environ, PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT)
    join_timeout = _timeout(environ, JOIN_TIMEOUT_ENV, DEFAULT_JOIN_TIMEOUT)
    _state.update(processes=processes, index=process_id)
    address = values[MULTI_HOST_ENV[0]]
    # Every process must run its collectives in the same order: no program runs behind the Python code (a step
    # still running when a callback's collective starts would pair Gloo's messages wrongly across processes).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    # The run stops on SIGTERM through its own callback (every process at the same step). JAX's preemption
    # service would install a second SIGTERM handler, and when process 0 (which hosts the coordination
    # service) is gone, its barrier clean-up aborts the surviving process (std::bad_cast in jax 0.10.2).
    jax.config.update("jax_enable_preemption_service", False)
    with _runtime_timeouts(peer_timeout, join_timeout):
        try:
            keras.distribution.initialize(address, processes, process_id)
        except Exception as e:  # the coordination service's errors (e.g. DEADLINE_EXCEEDED) are JAX runtime errors
            if "DEADLINE_EXCEEDED" not in str(e) and "UNAVAILABLE" not in str(e):
                raise
            leave(f"process {process_id} of {processes}: the other processes did not join at {address} "
                  f"within {join_timeout} s ({JOIN_TIMEOUT_ENV}); start every process with the same "
                  f"{MULTI_HOST_ENV[0]}, {MULTI_HOST_ENV[1]} and its own {MULTI_HOST_ENV[2]}.")


@contextlib.contextmanager
def _runtime_timeouts(peer_timeout, join_timeout):
    """While joining, JAX's coordination service and client use the run's heartbeat and join timeouts.

    `keras.distribution.initialize` calls `jax.distributed.initialize` with
    JAX's defaults (a 100 s heartbeat timeout). JAX creates both through
    `jax._src.distributed._jax`: for the duration of the join that name points
    to a copy whose two factories add the timeouts. JAX's `missed_heartbeat_callback`
    is left alone: in jax 0.10.2 a Python callback cannot receive the error
    (the process aborts on `std::bad_cast`), while JAX's own ends the process
    with one fatal log line, by status 1 or SIGABRT.
    """
    from jax._src import distributed as jax_distributed

    real = jax_distributed._jax

    def client(*args, **kwargs):
        kwargs.update(heartbeat_timeout=peer_timeout, init_timeout=join_timeout)
        return real.get_distributed_runtime_client(*args, **kwargs)

    def service(*args, **kwargs):
        kwargs.update(heartbeat_timeout=peer_timeout)
        return real.get_distributed_runtime_service(*args, **kwargs)

    jax_distributed._jax = _Overlay(real, get_distributed_runtime_client=client,
                                    get_distributed_runtime_service=service)
    try:
        yield
    finally:
        jax_distributed._jax = real


class _Overlay:
    """A module seen through a few replaced attributes."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def peer_failure(error):
    """The one-line reason if `error` is a collective that failed because a peer process is gone, else None."""
    text = str(error)
    if not is_multi_process() or not any(mark in text for mark in ("Gloo", "gloo", "Connection reset", "UNAVAILABLE")):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return (f"process {_state['index']} of {_state['processes']}: a collective with another process failed "
            f"({first[:200]}); rerun every process with the same command to resume from the last checkpoint.")


def leave(message, status=exits.PEER_LOST):
    """Prints `error: message` and ends this process at once with `status`.

    A process of a multi-process run does not wait at JAX's shutdown barrier
    for peers that are gone (it would wait JAX's shutdown timeout, then
    abort): it exits; the others see it gone within `NFNET_PEER_TIMEOUT`.
    """
    if not _state["left"]:
        _state["left"] = True
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(status)


def exit_now(status):
    """Ends a multi-process run's process with `status` without JAX's shutdown barrier; returns otherwise."""
    if is_multi_process() and status != exits.OK:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


# The temporary run folders of processes other than 0: `<system temp>/nfnet-process-<pid>-...`.
PROCESS_TMP_PREFIX = "nfnet-process-"


@contextlib.contextmanager
def own_run_dir(run_dir, environ=None):
    """The folder this process writes its run to: `run_dir` for process 0, a temporary folder for the others.

    The others' temporary folder (in the system's temporary folder, named
    `nfnet-process-<pid>-...`) is removed at the block's end; those left by
    processes no longer alive (e.g. killed) are removed at the start.
    """
    if process_index(environ) == 0 or not multi_host_requested(environ):
        yield run_dir
        return
    import shutil

    from nfnet_keras import fileio

    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if fileio.left_by_dead_process(name, PROCESS_TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{PROCESS_TMP_PREFIX}{os.getpid()}-") as folder:
        yield os.path.join(folder, "run")


def broadcast(values):
    """Process 0's `values` (a list of NumPy arrays, the same shapes on every process) on every process."""
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(values)


def broadcast_json(obj):
    """Process 0's JSON-serialisable `obj` on every process (what the others pass is ignored)."""
    import json

    import numpy as np

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if _state["index"] == 0 else np.zeros(0, np.uint8)
    length = int(broadcast([np.array(len(data), np.int64)])[0])
    padded = np.zeros(length, np.uint8)
    padded[:len(data)] = data[:length]
    return json.loads(bytes(np.asarray(broadcast([padded])[0], np.uint8)).decode())


def replicated_predictor(model, batch_size=256):
    """`predict(uint8 images) -> probabilities` over every process's devices; every process gets all outputs.

    `model.predict` gathers its outputs with NumPy, which cannot read the rows
    other processes hold. Here each batch's logits come back replicated on
    every device. Every process calls it with the same images.
    """
    import jax
    import numpy as np
    import tensorflow as tf
    from jax.sharding import NamedSharding, PartitionSpec

    from nfnet_keras.data import preprocess

    distribution = keras.distribution.distribution()
    mesh = distribution.device_mesh.backend_mesh
    rows_sharding = NamedSharding(mesh, PartitionSpec(distribution.batch_dim_name))
    devices, processes = int(mesh.devices.size), jax.process_count()

    @jax.jit
    def logits(trainable, non_trainable, x):
        out, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))

    def predict(images):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        outputs = []
        for batch in tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(preprocess):
            batch = batch.numpy()
            n = len(batch)
            padded = np.concatenate([batch, np.zeros((-n % devices,) + batch.shape[1:], batch.dtype)])
            rows = len(padded) // processes
            share = padded[jax.process_index() * rows:(jax.process_index() + 1) * rows]
            x = jax.make_array_from_process_local_data(rows_sharding, share)
            outputs.append(np.asarray(logits(trainable, non_trainable, x), np.float32)[:n])
        return tf.nn.softmax(np.concatenate(outputs)).numpy()

    return predict


def mirror_checkpoints(folder):
    """Copies process 0's complete checkpoints (`<folder>/*/state.json` and the files beside it) to `folder` here.

    Every process then restores the same files the same way: restoring assigns
    the variables, which JAX does on every process together. Returns the
    number of files received (0 on process 0).
    """
    import glob

    import numpy as np

    files = {}
    if _state["index"] == 0:
        for meta in sorted(glob.glob(os.path.join(folder, "*", "state.json"))):
            checkpoint = os.path.dirname(meta)
            for name in sorted(os.listdir(checkpoint)):
                path = os.path.join(checkpoint, name)
                if os.path.isfile(path):
                    files[os.path.relpath(path, folder)] = os.path.getsize(path)
    files = broadcast_json(files)
    if not files:
        return 0
    total = sum(files.values())
    blob = np.zeros(total, np.uint8)
    if _state["index"] == 0:
        offset = 0
        for relative, size in files.items():
            with open(os.path.join(folder, relative), "rb") as f:
                blob[offset:offset + size] = np.frombuffer(f.read(size), np.uint8)
            offset += size
    blob = np.asarray(broadcast([blob])[0], np.uint8)
    if _state["index"] == 0:
        return 0
    offset = 0
    for relative, size in files.items():
        path = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(blob[offset:offset + size].tobytes())
        offset += size
    return len(files)


def process_zero_checkpoint(base):
    """`base` (a `StepCheckpoint` class) for a multi-process run: every process restores process 0's checkpoints.

    Every process writes its checkpoints (process 0 in the run directory, the
    others in their temporary folder: saving reads the variables on every
    process together). Before restoring, the others receive process 0's
    complete checkpoints (`mirror_checkpoints`), so they resume from the same
    epoch and step with the same weights. After every step the processes
    agree on whether a stop signal (SIGTERM, Ctrl-C) reached any of them, so
    that all checkpoint and stop at the same step.
    """

    class ProcessZeroCheckpoint(base):
        def _load_model(self):
            received = mirror_checkpoints(self.backup_dir)
            if received:
                print(f"Received process 0's checkpoints ({received} files).", flush=True)
            return super()._load_model()

        def on_train_batch_end(self, batch, logs=None):
            self._agree_on_stop()
            super().on_train_batch_end(batch, logs)

        def on_epoch_end(self, epoch, logs=None):
            self._agree_on_stop()
            super().on_epoch_end(epoch, logs)

        def _agree_on_stop(self):
            """A stop signal that reached any process stops every process at the same step (saving is collective)."""
            if self.stop is None:
                return
            import numpy as np
            from jax.experimental import multihost_utils

            received = np.asarray(multihost_utils.process_allgather(np.int32(self.stop.received or 0)))
            if self.stop.received is None and received.max():
                self.stop.received = int(received.max())

    ProcessZeroCheckpoint.__name__ = ProcessZeroCheckpoint.__qualname__ = f"ProcessZero{base.__name__}"
    return ProcessZeroCheckpoint
