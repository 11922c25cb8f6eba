"""Layer classes passed as arguments (DeepMind's `which_conv`): resolving and serializing them."""

import keras


def resolve_layer_class(layer, base, arg):
    """Returns the layer class that `layer` names, checked to subclass `base`.

    Args:
        layer: a class, or its registered name (`keras.saving.get_registered_name`,
            e.g. `"nfnet_keras>WSConv2D"`, or a Keras layer's class name such as
            `"Conv2D"` or `"BatchNormalization"`).
        base: the `keras.layers` class `layer` must subclass.
        arg: str. The argument's name, for the error message.

    Raises:
        ValueError: if `layer` names no class, or one that does not subclass `base`.
    """
    cls = layer
    if isinstance(layer, str):
        cls = keras.saving.get_registered_object(layer, module_objects=vars(keras.layers))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(
            f"{arg} must be a keras.layers.{base.__name__} subclass or its registered name, "
            f"got {layer!r}."
        )
    return cls


def layer_class_name(cls, arg):
    """Returns the name `resolve_layer_class` turns back into `cls` (for `get_config`).

    Raises:
        ValueError: if `cls` is not registered (`keras.saving.register_keras_serializable`)
            and is not a Keras layer, so that a saved model could not find it again.
    """
    name = keras.saving.get_registered_name(cls)
    found = keras.saving.get_registered_object(name, module_objects=vars(keras.layers))
    if found is not cls:
        raise ValueError(
            f"{arg} {cls.__qualname__} cannot be serialized: register it with "
            "`keras.saving.register_keras_serializable` or use a Keras layer."
        )
    return name
