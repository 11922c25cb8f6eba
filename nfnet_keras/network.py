"""The run's network from a `TrainConfig`: built, initialised, compiled, adapted to its data, and the
callbacks its recipe trains with.

Shared by `training` (the `nfnet-fit` run and the tuner's trials) and by the
benchmarks that train without TensorFlow (`benchmarks.speed_jax`): imports no
TensorFlow, so the network and its training step run on any Keras backend.
"""

import keras

from nfnet_keras.callbacks import FreezeAfterEpochs, RecalibrateBatchNorm
from nfnet_keras.contract import IMAGE_SHAPE, NUM_CLASSES, normalize
from nfnet_keras.models import BATCHNORM_TWIN, adapt_model, build_model
from nfnet_keras.models.initialization import data_initialize, dirac_initialize
from nfnet_keras.models.transfer import WeightsMismatch, copy_weights, freeze
from nfnet_keras.optimization import make_loss, make_optimizer


def resolve_jit(config, has_gpu=None, backend=None):
    """Whether to XLA-compile the train step.

    TensorFlow: on with a GPU, off on CPU (slower there), off under `mirrored`
    (keras#19005). JAX: on unless `--no-jit` (XLA is JAX's compiler; without it
    every op runs on its own).
    """
    backend = backend or keras.backend.backend()
    if backend == "jax":
        return True if config.jit is None else config.jit
    if config.strategy == "mirrored":
        if config.jit:
            print("note: --jit is ignored under --strategy mirrored (keras#19005: XLA under "
                  "MirroredStrategy fails to place resources).")
        return False
    if config.jit is None:
        if has_gpu is None:
            import tensorflow as tf  # only the TensorFlow backend gets here

            has_gpu = bool(tf.config.list_physical_devices("GPU"))
        return bool(has_gpu)
    return config.jit


def compile_model(model, config, steps_per_epoch):
    """Compiles `model` with the config's optimizer, loss and jit setting."""
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=make_loss(config),
        metrics=["accuracy"],
        jit_compile=resolve_jit(config),
    )
    return model


def build_for(config, num_classes=NUM_CLASSES, input_shape=IMAGE_SHAPE, resuming=False):
    """The model of `config`: its preset and overrides, or their BatchNorm twin (`norm="batch"`).

    The twin's BatchNorms take `bn_momentum` and `bn_epsilon` where set.
    `num_classes` and `input_shape` come from the data (`load_data`). With
    `conv_init="dirac"` every conv but the stem starts with its first `C_in`
    filters the identity (`models.initialization.dirac_initialize`). With
    `init_from` the weights come from that `.keras` model (`init_from_file`),
    unless `resuming` (the run's checkpoint then restores them). The stages
    named by `freeze` are made non-trainable (`models.transfer.freeze`).
    """
    twin = {}
    if config.norm == "batch":
        settings = dict(momentum=config.bn_momentum, epsilon=config.bn_epsilon)
        twin = dict(BATCHNORM_TWIN, norm_config={k: v for k, v in settings.items() if v is not None} or None)
    model = build_model(config.preset, num_classes, input_shape, **{**twin, **config.overrides})
    if config.conv_init == "dirac":
        dirac_initialize(model)
    if config.init_from and not resuming:
        init_from_file(model, config)
    if config.freeze:
        frozen = freeze(model, config.freeze)
        print(f"Frozen (--freeze {config.freeze}): {', '.join(frozen)}.")
    return model


def init_from_file(model, config):
    """Copies the weights of the `.keras` model `config.init_from` into `model` (`models.transfer.copy_weights`).

    The body's weights always, the classifier's when it has the model's classes
    (else the model keeps its fresh one); the whitening stem and BatchNorm
    statistics are weights and come from the file too.

    Raises:
        ValueError: one line, if the file is not a loadable `.keras` model of the config's network.
    """
    try:
        head = copy_weights(model, config.init_from)
    except WeightsMismatch as e:
        network = f"--preset {config.preset}" + "".join(f" --override {k}={v!r}" for k, v in config.overrides.items())
        network += " --norm batch" if config.norm == "batch" else ""
        raise ValueError(f"--init-from {config.init_from} is not a model of {network}: {e.detail}; give a .keras "
                         "model of that network.") from None
    except ValueError as e:
        raise ValueError(f"--init-from {e}") from None
    classes = model.output_shape[-1]
    print(f"Initialised from {config.init_from}: the body and "
          + ("the classifier." if head else f"a fresh {classes}-class classifier (the file's has other classes)."))


# Training images a data-dependent layer (the whitening stem) is adapted to.
ADAPT_IMAGES = 5000


def adapt_to(model, train_images, data_init=0):
    """Fits the model's data-dependent parts to its training images (uint8); returns a line for each part done.

    The layers with an `adapt` method (the whitening stem) are adapted to the
    first `ADAPT_IMAGES`; then, with `data_init` N (`--data-init`), the conv
    gains and biases are set from the first N (`models.initialization.data_initialize`).
    A model without such layers and `data_init` 0 is left as it is.
    """
    done = []
    if any(callable(getattr(layer, "adapt", None)) for layer in model.layers):
        adapted = adapt_model(model, normalize(train_images[:ADAPT_IMAGES]))
        done.append(f"Adapted {', '.join(adapted)} to {min(len(train_images), ADAPT_IMAGES)} training images.")
    if data_init:
        gains = data_initialize(model, normalize(train_images[:data_init]))
        done.append(f"Initialised {len(gains)} conv gains and biases on {min(len(train_images), data_init)} "
                    "training images (--data-init).")
    return done


def whitening_layers(model, config):
    """The names of the model's whitening stems (layers with `adapt` and a `bias`), for --whitening-bias-epochs."""
    names = [layer.name for layer in model.layers if callable(getattr(layer, "adapt", None)) and hasattr(layer, "bias")]
    if not names:
        raise ValueError(f"--whitening-bias-epochs needs a network with a whitening stem; {config.preset} has none.")
    return names


def recipe_callbacks(model, config, train_images=None):
    """The callbacks that are part of the config's training recipe, in the order `fit` must run them.

    `--whitening-bias-epochs` (`callbacks.FreezeAfterEpochs`); with `--ema`,
    validation on the moving average (`keras.callbacks.SwapEMAWeights`) and,
    with `--bn-recalibrate N`, the BatchNorm statistics recomputed for it from
    the first N of `train_images` (`callbacks.RecalibrateBatchNorm`).
    """
    callbacks = []
    if config.whitening_bias_epochs is not None:
        callbacks.append(FreezeAfterEpochs(whitening_layers(model, config), config.whitening_bias_epochs))
    if config.ema:
        # Validation sees the moving average; after a checkpoint (which keeps the raw weights, and
        # the average in the optimizer) the epoch ends with the average in the model, for the
        # callbacks after this one, and the model ends training with it.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
        if config.bn_recalibrate:
            if train_images is None:
                raise ValueError("fit_model needs train_images to recompute BatchNorm statistics (--bn-recalibrate).")
            callbacks.append(RecalibrateBatchNorm(normalize(train_images[:config.bn_recalibrate]), config.batch_size))
    return callbacks
