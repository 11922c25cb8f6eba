"""timm's NFNet-F state dicts (DeepMind's weights, `dm_nfnet_f0` ... `dm_nfnet_f6`) -> `.keras` files.

`convert_timm_state_dict(source, variant, out_path)` builds the package's
`nfnet_f{k}` preset, fills it from the state dict and saves it atomically. The
model then computes timm's function (docs/model.md, "NFNet-F parity with
DeepMind's models"): each tensor is transposed to Keras' layout, and two
differences between the implementations are folded into the weights:

- Weight standardization. timm divides by `sqrt(N * (var + 1e-5))`, the
  package (as DeepMind's code) by `sqrt(max(N * var, 1e-4))`; each conv's gain
  is multiplied by the ratio of the two, computed in float64 from the kernel.
- The Squeeze-Excite's hidden ReLU. timm's (as DeepMind's) is plain, the
  package's is scaled by its gamma; ReLU is positively homogeneous, so the
  excite kernel is divided by that gamma.

Every check runs before anything is written: a state dict of another
architecture, of another NFNet-F variant, with a missing or extra tensor or a
tensor of the wrong shape is refused with a one-line ValueError.
"""

import os
import pathlib
import re
from collections.abc import Mapping

import numpy as np

from nfnet_keras.fileio import atomic_path
from nfnet_keras.layers.gammas import GAMMAS
from nfnet_keras.models.nf_resnet.presets import PRESETS

# timm's ScaledStdConv2dSame eps (NfCfg.std_conv_eps), added to the variance.
TIMM_STD_CONV_EPS = 1e-5
VARIANTS = tuple(f"nfnet_f{k}" for k in range(7))
# The keys a timm NFNet state dict always has; their absence means another architecture.
_SIGNATURE = ("stem.conv1.weight", "stem.conv1.gain", "stages.0.0.conv1.weight", "final_conv.weight",
              "head.fc.weight")
_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.")
# Block sublayer (Keras) -> module (timm).
_BLOCK_CONVS = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
                "shortcut_conv": "downsample.conv"}


def check_variant(variant):
    """Returns `variant` if it is one of `VARIANTS`, else raises a one-line ValueError."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown NFNet variant {variant!r}. Use one of: {', '.join(VARIANTS)}.")
    return variant


def load_state_dict(source):
    """A timm state dict as `{name: float32 numpy array}`.

    Args:
        source: a mapping of names to tensors (torch or NumPy), or the path of a
            `.safetensors` file or of a `torch.save`d state dict (`.pth`, `.pt`,
            `.bin`), read with `torch.load(weights_only=True)`.

    Raises:
        ValueError: one line, if the file is missing or unreadable or holds no state dict.
    """
    if isinstance(source, Mapping):
        items = source.items()
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise ValueError(f"Checkpoint {str(path)!r} does not exist (give a timm state dict: .pth or .safetensors).")
        try:
            if path.suffix == ".safetensors":
                from safetensors.numpy import load_file

                items = load_file(str(path)).items()
            else:
                import torch

                loaded = torch.load(str(path), map_location="cpu", weights_only=True)
                if not isinstance(loaded, Mapping):
                    raise ValueError(
                        f"Checkpoint {str(path)!r} holds a {type(loaded).__name__}, not a state dict "
                        "(save model.state_dict())."
                    )
                items = loaded.items()
        except ValueError:
            raise
        except ImportError as e:
            package = "safetensors" if path.suffix == ".safetensors" else "torch"
            raise ValueError(f"Reading checkpoint {str(path)!r} needs {package}: pip install {package}.") from e
        except Exception as e:  # torch's and safetensors' own errors, made one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"Cannot read checkpoint {str(path)!r}: {first}") from e
    state = {}
    for name, value in items:
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        if not hasattr(value, "shape"):
            raise ValueError(f"State dict entry {name!r} is a {type(value).__name__}, not a tensor.")
        state[str(name)] = np.asarray(value, dtype=np.float32)
    return state


def stage_depths(state):
    """The blocks per stage of a timm NFNet state dict, from its `stages.I.J.` keys."""
    depths = {}
    for name in state:
        match = _BLOCK_KEY.match(name)
        if match:
            stage, block = int(match[1]), int(match[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return tuple(depths.get(i, 0) for i in range(max(depths) + 1)) if depths else ()


def variant_of_depths(depths):
    """The NFNet-F variant with these stage depths, or None."""
    for variant in VARIANTS:
        if PRESETS[variant].depths == tuple(depths):
            return variant
    return None


def infer_variant(state):
    """The NFNet-F variant of a timm state dict, by its stage depths; a one-line ValueError if none."""
    _check_architecture(state, None, check_depths=False)
    depths = stage_depths(state)
    found = variant_of_depths(depths)
    if found is None:
        raise ValueError(
            f"The checkpoint has stage depths {depths}, which is no NFNet-F variant's "
            f"({', '.join(f'{v} {PRESETS[v].depths}' for v in VARIANTS)})."
        )
    return found


def _check_architecture(state, variant, check_depths=True):
    missing = [key for key in _SIGNATURE if key not in state]
    if missing:
        sample = ", ".join(repr(k) for k in list(state)[:3])
        raise ValueError(
            f"The checkpoint is not a timm NFNet state dict (no {missing[0]!r}; its first keys: {sample}); "
            "give the state dict of a timm dm_nfnet_f* model."
        )
    if not check_depths:
        return
    depths, want = stage_depths(state), PRESETS[variant].depths
    if depths != want:
        found = variant_of_depths(depths)
        looks = f"which is {found}'s" if found else "which is no NFNet-F variant's"
        raise ValueError(
            f"The checkpoint has stage depths {depths}, {looks}; {variant} has {want}. "
            + (f"Convert it as {found}." if found else f"Give the state dict of timm's dm_{variant}.")
        )


def _conv_mapping(prefix, layer):
    """(keras variable, timm name, torch shape, to-keras function) for a WSConv2D."""
    kernel_shape = tuple(layer.kernel.shape)  # (kh, kw, in / groups, out)
    torch_kernel = (kernel_shape[3], kernel_shape[2], kernel_shape[0], kernel_shape[1])

    def gain(state):
        w = state[f"{prefix}.weight"].astype(np.float64)
        fan_in = np.prod(w.shape[1:])
        var = w.reshape(w.shape[0], -1).var(axis=1)
        fold = np.sqrt(np.maximum(fan_in * var, layer.eps)) / np.sqrt(fan_in * (var + TIMM_STD_CONV_EPS))
        return state[f"{prefix}.gain"].reshape(-1).astype(np.float64) * fold

    rows = [(layer.kernel, f"{prefix}.weight", torch_kernel, lambda s: s[f"{prefix}.weight"].transpose(2, 3, 1, 0))]
    if layer.use_bias:
        rows.append((layer.bias, f"{prefix}.bias", (kernel_shape[3],), lambda s: s[f"{prefix}.bias"]))
    rows.append((layer.gain, f"{prefix}.gain", (kernel_shape[3], 1, 1, 1), gain))
    return rows


def _dense_mapping(prefix, layer, kernel_scale=1.0):
    """Rows for a Dense layer from a timm Linear (`prefix`) or 1x1 Conv2d with bias."""
    n_in, n_out = tuple(layer.kernel.shape)
    conv = not prefix.startswith("head.")
    shape = (n_out, n_in, 1, 1) if conv else (n_out, n_in)
    kernel = lambda s: s[f"{prefix}.weight"].reshape(n_out, n_in).T * kernel_scale
    return [(layer.kernel, f"{prefix}.weight", shape, kernel),
            (layer.bias, f"{prefix}.bias", (n_out,), lambda s: s[f"{prefix}.bias"])]


def tensor_mapping(model, config):
    """Every variable of a built `nfnet_f*` model with the timm tensor it comes from.

    Returns:
        A list of `(keras variable, timm name, torch shape, function state -> value)`.
    """
    rows = []
    for i in range(len(config.stem_widths)):
        rows += _conv_mapping(f"stem.conv{i + 1}", model.get_layer(f"stem_conv{i + 1}"))
    for s, depth in enumerate(config.depths):
        for j in range(depth):
            block, prefix = model.get_layer(f"stage{s + 1}_block{j + 1}"), f"stages.{s}.{j}"
            for keras_name, timm_name in _BLOCK_CONVS.items():
                layer = getattr(block, keras_name)
                if layer is not None:
                    rows += _conv_mapping(f"{prefix}.{timm_name}", layer)
            if block.se is not None:
                se_gamma = GAMMAS[block.se.activation]
                rows += _dense_mapping(f"{prefix}.attn_last.fc1", block.se.squeeze)
                rows += _dense_mapping(f"{prefix}.attn_last.fc2", block.se.excite, kernel_scale=1.0 / se_gamma)
            rows.append((block.skip_gain, f"{prefix}.skipinit_gain", (), lambda st, p=prefix: st[f"{p}.skipinit_gain"]))
    rows += _conv_mapping("final_conv", model.get_layer("final_conv"))
    rows += _dense_mapping("head.fc", model.get_layer("classifier"))
    return rows


def _check_tensors(state, rows):
    expected = {name: shape for _, name, shape, _ in rows}
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"The checkpoint lacks tensor {missing[0]!r}{more}.")
    extra = [name for name in state if name not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"The checkpoint has an unexpected tensor {extra[0]!r}{more}.")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(
                f"Tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}."
            )


def keras_model_from_timm(source, variant):
    """The `variant` preset filled from a timm state dict (checked first).

    Args:
        source: a state dict or its path (see `load_state_dict`).
        variant: str or None. One of `VARIANTS`, or None to take the one whose
            stage depths the state dict has. The number of classes is the state dict's.

    Returns:
        A `keras.Model` computing the timm model's logits from NHWC images
        (timm takes the same images as NCHW).

    Raises:
        ValueError: one line, on an unreadable checkpoint, another architecture
            or variant, a missing or extra tensor, or a shape mismatch.
    """
    from nfnet_keras.models.registry import build_model

    if variant is not None:
        check_variant(variant)
    state = load_state_dict(source)
    if variant is None:
        variant = infer_variant(state)
    _check_architecture(state, variant)
    classes_shape = state["head.fc.weight"].shape
    if len(classes_shape) != 2:
        raise ValueError(f"Tensor 'head.fc.weight' has shape {tuple(classes_shape)}, expected (classes, features).")
    model = build_model(variant, num_classes=int(classes_shape[0]), input_shape=(None, None, 3))
    rows = tensor_mapping(model, PRESETS[variant])
    _check_tensors(state, rows)
    for variable, _, _, value in rows:
        variable.assign(np.asarray(value(state), dtype=np.float32).reshape(tuple(variable.shape)))
    return model


def convert_timm_state_dict(state_dict_or_path, variant, out_path):
    """Converts a timm NFNet-F state dict to a `.keras` file, written atomically.

    Args:
        state_dict_or_path: a state dict (names -> torch or NumPy tensors) or
            the path of a `.pth` or `.safetensors` file of one, e.g. of
            `timm.create_model("dm_nfnet_f0", pretrained=True)`.
        variant: str or None. The preset, `"nfnet_f0"` ... `"nfnet_f6"`; None:
            the one whose stage depths the state dict has.
        out_path: str or path. The `.keras` file to write.

    Returns:
        The converted `keras.Model`.

    Raises:
        ValueError: one line, on a bad checkpoint or output path; nothing is written then.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".keras"):
        raise ValueError(f"The output path must end in .keras, got {out_path!r}.")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise ValueError(f"The output folder {folder!r} does not exist.")
    model = keras_model_from_timm(state_dict_or_path, variant)
    with atomic_path(out_path) as tmp:
        model.save(tmp)
    return model
