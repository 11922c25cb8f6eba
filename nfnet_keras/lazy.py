"""Lazy package attributes (PEP 562): a package's public names import their module on first use.

The package's `__init__` files declare which module defines each public name;
importing the package imports none of them, so a command can parse its flags
and answer `--help` before Keras and TensorFlow are loaded.
"""

import importlib
import sys


def attach(package, exports, submodules=()):
    """The `__getattr__`, `__dir__` and `__all__` of a package whose names load on first use.

    Args:
        package: str. The package's `__name__`.
        exports: dict. `{module: names}`, modules relative to the package
            (e.g. `".wsconv"`) or absolute, each with the public names it defines.
        submodules: sequence of str. Subpackages and modules reachable as
            attributes (`nfnet_keras.models`) before anything imported them.

    Returns:
        `(__getattr__, __dir__, __all__)`, to assign at the package's top level.

    Example:

    ```python
    __getattr__, __dir__, __all__ = lazy.attach(__name__, {".wsconv": ["WSConv2D"]})
    ```
    """
    where = {name: module for module, names in exports.items() for name in names}
    if len(where) != sum(len(names) for names in exports.values()):
        raise ValueError(f"{package}: a public name is declared by two modules.")
    submodules = frozenset(submodules)

    def __getattr__(name):
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # the next access is a plain attribute
        return value

    def __dir__():
        return sorted(set(where) | submodules | set(vars(sys.modules[package])))

    return __getattr__, __dir__, sorted(where)
