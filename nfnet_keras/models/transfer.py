"""Transfer learning: a network's body as a backbone, its per-stage feature maps, a new classifier,
frozen stages, and the body weights of one model copied into another of the same network.

Every network of the package lays out its layers the same way (see
`models.nf_resnet.backbone` and `models.conv_groups.backbone`): the stem's layers
start with `stem_`, stage k's with `stage{k}_`, an NF-ResNet's final conv and
activation with `final_` (`models.stages`), and the head begins at the global
pooling layer `pool` (then `dropout` where the preset has one, `classifier`, and
the speed network's `logit_scale`). Everything before `pool` is the body. The
functions here read those names and work on any model of the package, its
BatchNorm twin included, trained, converted or new.

Example:

>>> import nfnet_keras as nk
>>> from nfnet_keras.models import transfer
>>> model = nk.build_model("tiny")
>>> transfer.backbone(model).output_shape
(None, 32)
>>> {k: v.shape[1:] for k, v in transfer.feature_extractor(model).output.items()}
{'stem': (32, 32, 8), 'stage1': (32, 32, 16), 'stage2': (16, 16, 32), 'final': (16, 16, 32)}
>>> transfer.with_new_head(model, 100).output_shape
(None, 100)
>>> transfer.freeze(model, ["stem", "stage1"])
['stem_conv1', 'stage1_block1']
"""

import os
import zipfile

import keras
import numpy as np

from nfnet_keras.models.stages import STEM, check_stages, stage_of

POOL = "pool"
CLASSIFIER = "classifier"
POOLINGS = ("avg", "max", None)
_POOLING_LAYERS = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}


class WeightsMismatch(ValueError):
    """The source of `copy_weights` is not a model of the same network.

    Attributes:
        detail: str. The first difference found, and how many more there are.
    """

    def __init__(self, model_name, detail):
        super().__init__(f"the weights are not those of the network {model_name!r}: {detail}.")
        self.detail = detail


# === Reading a model's layout ===


def _head_start(model):
    """The index in `model.layers` of the global pooling layer `pool`, or None (a backbone without pooling)."""
    names = [layer.name for layer in model.layers]
    return names.index(POOL) if POOL in names else None


def head_layers(model):
    """The layers from the global pooling layer on (`pool`, `dropout`, `classifier`, ...); [] without `pool`."""
    start = _head_start(model)
    return [] if start is None else list(model.layers[start:])


def stage_layers(model):
    """`{"stem": [layers], "stage1": [layers], ..., "final": [layers]}`: the model's top-level layers by stage.

    Raises:
        ValueError: the model has no layers named like the package's networks.
    """
    stages = {}
    for layer in model.layers:
        stage = stage_of(layer.name)
        if stage is not None:
            stages.setdefault(stage, []).append(layer)
    if STEM not in stages or len(stages) < 2:
        raise ValueError(f"Model {model.name!r} has no layers named stem_* and stage<k>_*: it is not a network of "
                         "nfnet_keras (build one with nfnet_keras.build_model).")
    return stages


def _body_output(model):
    """The tensor the head pools: the input of `pool`, or the model's output for a backbone without pooling."""
    start = _head_start(model)
    if start is None:
        stage_layers(model)  # a network of the package
        return model.output
    return model.layers[start].input


# === Backbones and heads ===


def backbone(model, pooling="avg", name=None):
    """The body of `model` (everything before its head), pooled or as a feature map.

    The backbone shares its layers (and so its weights) with `model`.

    Args:
        model: keras.Model. A network of the package (`build_model`, a loaded
            `.keras` file of one).
        pooling: `"avg"`, `"max"` or None. Global pooling of the last feature
            map: `(batch, channels)` features; None: the map itself,
            `(batch, height, width, channels)`. Defaults to `"avg"`.
        name: str or None. The backbone's name. Defaults to
            `"<model name>_backbone"`.

    Returns:
        A `keras.Model` from the model's input.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of 'avg', 'max' or None, got {pooling!r}.")
    x = _body_output(model)
    if pooling is not None:
        x = _POOLING_LAYERS[pooling](name=POOL)(x)
    return keras.Model(model.input, x, name=name or f"{model.name}_backbone")


def feature_extractor(model, name=None):
    """A model of `model`'s input returning the output of the stem and of every stage, by name.

    The outputs are `{"stem": ..., "stage1": ..., ..., "stage{N}": ...}`, each the
    output of the last layer of that stage: for an NF-ResNet the stem's last
    conv and the residual stream after each stage's last block (before the
    next block's pre-activation), then `"final"`, the map its head pools (after
    the final conv and activation, where the preset has them); for the speed
    network the stem's activation and each conv-pool group's output. The
    extractor shares its layers with `model`.

    Args:
        model: keras.Model. A network of the package, or a backbone of one.
        name: str or None. Defaults to `"<model name>_features"`.

    Returns:
        A `keras.Model` whose output is a dict of 4-D feature maps.
    """
    outputs = {stage: layers[-1].output for stage, layers in stage_layers(model).items()}
    return keras.Model(model.input, outputs, name=name or f"{model.name}_features")


def with_new_head(model, num_classes, name=None):
    """`model` with a new, freshly initialised classifier of `num_classes` classes.

    The head is rebuilt after the global pooling layer as it was (dropout, the
    speed network's logit scale), with a new `classifier` made from the old one's
    config (the same initializer, bias and float32 output) but `num_classes`
    units. Every layer before the head is shared with `model`: the body weights
    are those of `model` (training the new model trains them in both; clone
    `model` first, `keras.models.clone_model` and `set_weights`, to keep a copy).

    Args:
        model: keras.Model. A network of the package with its head.
        num_classes: int. Classes of the new classifier.
        name: str or None. Defaults to `model.name`.

    Returns:
        A `keras.Model` returning `(batch, num_classes)` logits.
    """
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    head = head_layers(model)
    if CLASSIFIER not in [layer.name for layer in head]:
        raise ValueError(f"Model {model.name!r} has no {CLASSIFIER!r} layer after a {POOL!r} layer: give a full "
                         "network of the package (build_model with include_top=True).")
    x = head[0].output
    for layer in head[1:]:
        config = layer.get_config()
        if layer.name == CLASSIFIER:
            config["units"] = num_classes
        x = type(layer).from_config(config)(x)  # fresh copies: the new head owns its layers
    return keras.Model(model.input, x, name=name or model.name)


# === Freezing ===


def freeze(model, stages, trainable=False):
    """Makes every layer of the named stages non-trainable (or trainable again with `trainable=True`).

    A frozen layer's weights get no gradient and no optimizer update, and a
    frozen BatchNorm (the BatchNorm twin) normalizes with its moving statistics
    and does not update them, as Keras does for any layer with
    `trainable = False`. Compile (again) after freezing.

    Args:
        model: keras.Model. A network of the package.
        stages: str or sequence of str. Stage names (`"stem"`, `"stage1"`, ...,
            `"final"` where the model has it), or one comma-separated string
            (`"stem,stage1"`).
        trainable: bool. The value to set. Defaults to `False` (freeze).

    Returns:
        list of str. The names of the layers changed.

    Raises:
        ValueError: one line, for a stage the model does not have, naming its stages.
    """
    layers = stage_layers(model)
    names = check_stages(stages, list(layers), f"cannot freeze stages of {model.name!r}")
    changed = []
    for stage in names:
        for layer in layers[stage]:
            layer.trainable = trainable
            changed.append(layer.name)
    return changed


# === Weights from another model of the same network ===


def _weights_by_key(model):
    """`({key: variable} of the body, {key: variable} of the head)`, a key being the variable's path from its
    top-level layer on (`"stage1_block1/conv0/kernel"`), whatever the model's name."""
    head = {layer.name for layer in head_layers(model)}
    body, top = {}, {}
    for layer in model.layers:
        for variable in layer.weights:
            path = variable.path
            at = path.find(f"{layer.name}/")
            key = path[at:] if at >= 0 else f"{layer.name}/{path}"
            (top if layer.name in head else body)[key] = variable
    return body, top


def _differences(target, source):
    """The keys of `target` missing from `source` or of another shape there, then those only in `source`."""
    problems = []
    for key, variable in target.items():
        if key not in source:
            problems.append(f"the source lacks {key}")
        elif tuple(source[key].shape) != tuple(variable.shape):
            problems.append(f"{key} is {tuple(source[key].shape)} in the source, {tuple(variable.shape)} here")
    problems += [f"the source has {key}, this network has not" for key in source if key not in target]
    return problems


def copy_weights(model, source):
    """Copies `source`'s weights into `model` by layer path: the body always, the head where its shapes agree.

    The body (every layer before `pool`) must be the same network: the same
    variables at the same paths with the same shapes, whatever the input size or
    the number of classes. The head is copied when the classifier has the same
    shape (the same classes); otherwise `model` keeps its own, freshly
    initialised one. Data-dependent values (the whitening stem, BatchNorm moving
    statistics) are weights and are copied too.

    Args:
        model: keras.Model. The network to fill (e.g. `build_model(preset,
            num_classes=...)`).
        source: keras.Model or str/path. A model of the same network, or a
            `.keras` file of one (`load_model_file`).

    Returns:
        bool. Whether the head was copied too (False: `model` keeps its own).

    Raises:
        WeightsMismatch: the bodies differ; nothing is copied.
        ValueError: `source` is a path that is not a loadable `.keras` model.
    """
    if not isinstance(source, keras.Model):
        source = load_model_file(source)
    body, head = _weights_by_key(model)
    source_body, source_head = _weights_by_key(source)
    problems = _differences(body, source_body)
    if problems:
        more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        raise WeightsMismatch(model.name, problems[0] + more)
    copy_head = bool(head) and not _differences(head, source_head)
    pairs = list(body.items()) + (list(head.items()) if copy_head else [])
    for key, variable in pairs:
        source_weights = source_body if key in source_body else source_head
        variable.assign(np.asarray(keras.ops.convert_to_numpy(source_weights[key]), dtype=variable.dtype))
    return copy_head


def load_model_file(path):
    """Loads a `.keras` model file (uncompiled); raises a one-line ValueError for anything else."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"{path} is not a .keras file; give a model saved with model.save (e.g. a run's "
                         "model.keras, or nfnet-convert's output).")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a loadable .keras model (not a zip archive).")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras' errors on a broken or foreign file, made one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a loadable .keras model ({reason}).") from e
