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
"""

import os

import keras

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
    distribution = EvenDataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    print(f"Data parallel over {len(devices)} device(s) in {processes} process(es) "
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
    """

    def distribute_dataset(self, dataset):
        dataset = super().distribute_dataset(dataset)
        import tensorflow as tf

        if not isinstance(dataset, tf.data.Dataset):
            return dataset
        devices = int(self.device_mesh.devices.size)
        per_process = devices // self.num_processes

        def check(*batch):
            size = tf.shape(tf.nest.flatten(batch)[0])[0]
            tf.debugging.assert_equal(
                size % per_process, 0,
                message=f"{UNEVEN_BATCH}: a batch does not split evenly across the {devices} devices of --strategy "
                "data_parallel; choose --batch-size, --train-limit and --val-size so that every batch, the last "
                f"of each split included, holds a multiple of {devices} images (the test set runs in batches "
                "of 256)",
            )
            return batch if len(batch) > 1 else batch[0]

        return dataset.map(check)


# Starts the message of the error a batch that does not split raises.
UNEVEN_BATCH = "uneven batch"


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
    keras.distribution.initialize(values[MULTI_HOST_ENV[0]], processes, process_id)
