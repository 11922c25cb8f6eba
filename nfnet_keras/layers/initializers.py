"""`PartialDirac`: convolution kernels whose first filters pass their input channels through.

airbench94 (Jordan 2024, https://github.com/KellerJordan/cifar10-airbench) starts every conv
after its whitening stem with its first `C_in` filters set to the identity (PyTorch's
`dirac_` on `weight[:C_in]`), the others keeping their default init: at step 0 each conv
carries its input forward, as a residual connection would.
"""

import keras
import numpy as np
from keras import ops


def dirac_mask(shape, groups=1):
    """Where the identity part of a `PartialDirac` kernel is, and its values.

    For an HWIO kernel `(kh, kw, c_in / groups, c_out)`, within each group `g`
    of `c_out / groups` filters, filter `g * c_out / groups + i` for
    `i < min(c_in, c_out) / groups` takes input channel `i` of its group
    (channel `g * c_in / groups + i` of the layer's input) at the kernel centre
    `(kh // 2, kw // 2)` with weight 1 and 0 everywhere else. With one group and
    `c_out >= c_in` that is output channel `i` = input channel `i` for every
    input channel.

    Args:
        shape: tuple of 4 ints. The kernel's shape, HWIO.
        groups: int. The conv's groups. Defaults to `1`.

    Returns:
        `(mask, identity)`: a bool array of `shape` (True on every weight of
        an identity filter) and a float32 array of `shape` (the identity
        filters' values, 0 outside them).

    Raises:
        ValueError: `shape` is not 4-D or its output channels do not split into `groups`.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 4:
        raise ValueError(f"PartialDirac needs a 4-D HWIO conv kernel shape, got {shape}.")
    kh, kw, group_in, c_out = shape
    if not (isinstance(groups, int) and groups >= 1 and c_out % groups == 0):
        raise ValueError(f"groups must be an int >= 1 dividing the {c_out} output channels, got {groups!r}.")
    group_out = c_out // groups
    mask = np.zeros(shape, bool)
    identity = np.zeros(shape, "float32")
    for g in range(groups):
        for i in range(min(group_in, group_out)):
            mask[:, :, :, g * group_out + i] = True
            identity[kh // 2, kw // 2, i, g * group_out + i] = 1.0
    return mask, identity


@keras.saving.register_keras_serializable(package="nfnet_keras")
class PartialDirac(keras.initializers.Initializer):
    """A conv kernel whose first `C_in` filters are the identity, the others from `base`.

    See `dirac_mask` for where the identity sits (kernel centre, per group).
    Works for any kernel size (1x1 and 3x3 alike) and for grouped convs
    (`groups`). A weight-standardized conv (`WSConv2D`) standardizes each
    filter: an identity filter of fan-in `N` (one 1, `N - 1` zeros) becomes
    `sqrt(1 - 1/N)` at its centre and `-1 / (N sqrt(1 - 1/N))` elsewhere, so it
    gives `(x_i - mean of its N inputs) / sqrt(1 - 1/N)`: its channel minus the
    mean over its window, close to but not exactly the identity.

    Args:
        base: str, dict or `keras.initializers.Initializer`. The initializer of
            the other filters (called on the whole shape, so its fan-in and
            fan-out are the kernel's). Defaults to `"he_normal"`.
        groups: int. The conv's groups. Defaults to `1`.

    Example:

    >>> kernel = PartialDirac()((3, 3, 4, 8))
    >>> float(kernel[1, 1, 2, 2]), float(kernel[0, 0, 2, 2])
    (1.0, 0.0)
    """

    def __init__(self, base="he_normal", groups=1):
        if isinstance(base, keras.initializers.Initializer):
            base = keras.initializers.serialize(base)
        self.base = base
        self.groups = groups
        self._base = keras.initializers.get(base)
        if self._base is None:
            raise ValueError(f"PartialDirac: unknown base initializer {base!r}.")

    def __call__(self, shape, dtype=None):
        mask, identity = dirac_mask(shape, self.groups)
        values = self._base(shape, dtype=dtype)
        return ops.where(mask, ops.cast(identity, values.dtype), values)

    def get_config(self):
        return dict(base=self.base, groups=self.groups)

