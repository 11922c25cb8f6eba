"""The NFNet-F presets compute timm's dm_nfnet_f* (DeepMind's weights in PyTorch), through the converter.

timm's model with random weights, every gain, skip gain, bias and Squeeze-Excite
weight moved off its initial value -> its state dict saved -> `nfnet-convert`'s
converter -> `.keras` -> `build_model(..., weights=)`: the logits must equal
timm's to 1e-4 (float32). The parity tests skip when timm is not installed
(it is not in the test extra: `pip install -e '.[timm]'`, docs/model.md); the
converter's refusals of bad checkpoints run everywhere, on state dicts made here.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nfnet_keras.convert import main as convert_main
from nfnet_keras.models.nf_resnet.convert import (
    convert_timm_state_dict,
    keras_model_from_timm,
    tensor_mapping,
)
from nfnet_keras.models.nf_resnet.presets import PRESETS, NFResNetConfig
from nfnet_keras.models.registry import build_model, load_weights_into

from conftest import checkout_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


# === Parity with timm (random weights) ===


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per variant, made once: timm's model, its .pth, the .keras file the converter wrote, and that file
    loaded by `build_model(variant, weights=...)` (1000 classes, any image size)."""
    import types

    import torch

    from benchmarks.timm_parity import perturbed_timm_model

    made = {}

    def get(variant):
        if variant not in made:
            folder = tmp_path_factory.mktemp(variant)
            reference = perturbed_timm_model(variant)
            checkpoint = folder / f"dm_{variant}.pth"
            torch.save(reference.state_dict(), checkpoint)
            out = folder / f"{variant}.keras"
            convert_timm_state_dict(str(checkpoint), variant, str(out))
            model = build_model(variant, num_classes=1000, input_shape=(None, None, 3), weights=out)
            made[variant] = types.SimpleNamespace(reference=reference, checkpoint=checkpoint, out=out, model=model)
        return made[variant]

    return get


def max_logit_diff(reference, model, size, seed=0):
    from benchmarks.timm_parity import keras_logits, random_images, timm_logits

    images = random_images(size, batch=2, seed=seed)
    ref = timm_logits(reference, images)
    assert np.abs(ref).max() > 0.05  # logits that a wrong layer would change, not ~0
    return float(np.abs(keras_logits(model, images) - ref).max())


@pytest.mark.parametrize("variant", ["nfnet_f0", "nfnet_f1"])
def test_converted_model_computes_timm_logits(converted, variant):
    made = converted(variant)
    # 64: even sizes everywhere; 72: the shortcut pools and strided convs see odd sizes (9, 5).
    for size in (64, 72):
        assert max_logit_diff(made.reference, made.model, size) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["nfnet_f0", "nfnet_f1"])
def test_converted_model_computes_timm_logits_at_train_resolution(converted, variant):
    from benchmarks.timm_parity import RESOLUTIONS

    made = converted(variant)
    assert max_logit_diff(made.reference, made.model, RESOLUTIONS[variant][0]) <= TOLERANCE


def test_safetensors_checkpoint_converts_to_the_same_model(converted, tmp_path):
    from safetensors.torch import save_file

    reference = converted("nfnet_f0").reference
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    assert convert_main([str(path), "-o", str(tmp_path / "f0.keras")]) == 0  # the variant found by depth
    model = build_model("nfnet_f0", num_classes=1000, input_shape=(None, None, 3), weights=tmp_path / "f0.keras")
    assert max_logit_diff(reference, model, 64) <= TOLERANCE


def test_every_timm_tensor_is_used_once(converted):
    made = converted("nfnet_f0")
    model = made.model
    rows = tensor_mapping(model, PRESETS["nfnet_f0"])
    names = [name for _, name, _, _ in rows]
    assert sorted(names) == sorted(made.reference.state_dict())
    assert len({id(v) for v, _, _, _ in rows}) == len(model.weights) == len(rows)


def test_timm_folds_are_needed(converted):
    # Each difference the converter folds changes the logits far beyond the tolerance
    # when left out: the weight-standardization eps and the Squeeze-Excite's ReLU gamma.
    import nfnet_keras.models.nf_resnet.convert as convert

    made = converted("nfnet_f0")
    for attribute, value in (("TIMM_STD_CONV_EPS", 0.0), ("GAMMAS", {"relu": 1.0})):
        saved = getattr(convert, attribute)
        setattr(convert, attribute, value)
        try:
            model = keras_model_from_timm(str(made.checkpoint), "nfnet_f0")
        finally:
            setattr(convert, attribute, saved)
        assert max_logit_diff(made.reference, model, 64) > 100 * TOLERANCE


BACKEND_SCRIPT = r"""
import json, sys
import numpy as np
import keras
import nfnet_keras.models.registry  # registers the package's layers for loading
model = keras.saving.load_model(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype("float32")
print(json.dumps(dict(backend=keras.backend.backend(),
                      logits=np.asarray(keras.ops.convert_to_numpy(model(x, training=False))).tolist())))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_converted_file_gives_timm_logits_on_other_backends(converted, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    from benchmarks.timm_parity import random_images, timm_logits

    made = converted("nfnet_f0")
    env = checkout_env(KERAS_BACKEND=backend)
    proc = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT, str(made.out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    ref = timm_logits(made.reference, random_images(64, batch=2, seed=0))
    assert np.abs(np.asarray(result["logits"]) - ref).max() <= TOLERANCE


def test_timm_imports_beside_the_test_extras_torch():
    # The workaround in import_timm applies exactly when a plain `import timm` hits pytorch/pytorch#122494.
    env = checkout_env()
    plain = subprocess.run([sys.executable, "-c", "import timm"], env=env, capture_output=True, text=True, timeout=300)
    code = ("from benchmarks.timm_parity import _TORCHVISION_SCHEMAS, import_timm\n"
            "model = import_timm().create_model('dm_nfnet_f0', num_classes=3)\n"
            "print(len(_TORCHVISION_SCHEMAS), type(model).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    declared, name = proc.stdout.split()
    assert name == "NormFreeNet"
    if plain.returncode == 0:
        assert declared == "0"
    else:
        assert "operator torchvision::nms does not exist" in plain.stderr
        assert declared == "1"


# === Bad checkpoints: one-line errors, nothing written (no timm needed) ===


@pytest.fixture(scope="module")
def f0_state():
    """A valid timm-layout state dict of nfnet_f0 (10 classes), made from the Keras model's mapping."""
    model = build_model("nfnet_f0", num_classes=10, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype("float32") * 0.1 + (1.0 if name.endswith("gain") else 0.0)
            for _, name, shape, _ in tensor_mapping(model, PRESETS["nfnet_f0"])}


def f1_depth_keys(state):
    """`state` with the stage depths of nfnet_f1 (blocks copied), for the wrong-variant error."""
    out = {}
    for name, value in state.items():
        out[name] = value
        if name.startswith("stages."):
            _, s, j, rest = name.split(".", 3)
            depth = PRESETS["nfnet_f0"].depths[int(s)]
            out[f"stages.{s}.{int(j) + depth}.{rest}"] = value
    return out


def assert_refused(tmp_path, source, variant, message):
    out = tmp_path / "out" / "model.keras"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(ValueError) as info:
        convert_timm_state_dict(source, variant, out)
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert os.listdir(out.parent) == []  # nothing written, no temporary left


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    resnet50 = {"conv1.weight": np.zeros((64, 3, 7, 7), "float32"), "bn1.weight": np.ones(64, "float32"),
                "bn1.bias": np.zeros(64, "float32"), "fc.weight": np.zeros((1000, 2048), "float32")}
    assert_refused(tmp_path, resnet50, "nfnet_f0",
                   "The checkpoint is not a timm NFNet state dict (no 'stem.conv1.weight'; its first keys: "
                   "'conv1.weight', 'bn1.weight', 'bn1.bias'); give the state dict of a timm dm_nfnet_f* model.")


def test_weights_of_another_variant_are_refused_naming_it(tmp_path, f0_state):
    assert_refused(tmp_path, f1_depth_keys(f0_state), "nfnet_f0",
                   "The checkpoint has stage depths (2, 4, 12, 6), which is nfnet_f1's; nfnet_f0 has (1, 2, 6, 3). "
                   "Convert it as nfnet_f1.")
    state = dict(f0_state)
    state["stages.3.3.conv1.weight"] = state["stages.3.2.conv1.weight"]
    assert_refused(tmp_path, state, "nfnet_f0",
                   "The checkpoint has stage depths (1, 2, 6, 4), which is no NFNet-F variant's; nfnet_f0 has "
                   "(1, 2, 6, 3). Give the state dict of timm's dm_nfnet_f0.")


def test_missing_tensor_is_refused(tmp_path, f0_state):
    state = {k: v for k, v in f0_state.items() if k != "stages.2.3.conv2b.gain"}
    assert_refused(tmp_path, state, "nfnet_f0", "The checkpoint lacks tensor 'stages.2.3.conv2b.gain'.")


def test_extra_tensor_is_refused(tmp_path, f0_state):
    state = dict(f0_state, **{"stages.1.0.attn_last.bn.weight": np.ones(256, "float32")})
    assert_refused(tmp_path, state, "nfnet_f0",
                   "The checkpoint has an unexpected tensor 'stages.1.0.attn_last.bn.weight'.")


def test_shape_mismatch_is_refused_naming_both_shapes(tmp_path, f0_state):
    state = dict(f0_state, **{"stages.1.0.conv2.weight": np.zeros((256, 64, 3, 3), "float32")})
    assert_refused(tmp_path, state, "nfnet_f0",
                   "Tensor 'stages.1.0.conv2.weight' has shape (256, 64, 3, 3), expected (256, 128, 3, 3).")


def test_unknown_variant_missing_file_and_bad_output_are_refused(tmp_path, f0_state):
    assert_refused(tmp_path, f0_state, "nfnet_f7",
                   "Unknown NFNet variant 'nfnet_f7'. Use one of: nfnet_f0, nfnet_f1, nfnet_f2, nfnet_f3, nfnet_f4, "
                   "nfnet_f5, nfnet_f6.")
    missing = tmp_path / "nope.pth"
    assert_refused(tmp_path, str(missing), "nfnet_f0",
                   f"Checkpoint {str(missing)!r} does not exist (give a timm state dict: .pth or .safetensors).")
    with pytest.raises(ValueError, match=r"^The output path must end in \.keras, got '.*model\.h5'\.$"):
        convert_timm_state_dict(f0_state, "nfnet_f0", tmp_path / "model.h5")
    assert not (tmp_path / "model.h5").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_pth_that_is_not_a_state_dict_is_refused(tmp_path):
    import torch

    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    assert_refused(tmp_path, str(path), "nfnet_f0",
                   f"Checkpoint {str(path)!r} holds a list, not a state dict (save model.state_dict()).")


@pytest.fixture(scope="module")
def f0_file(tmp_path_factory, f0_state):
    """`f0_state` converted to a .keras file."""
    out = tmp_path_factory.mktemp("f0_state") / "f0.keras"
    convert_timm_state_dict(f0_state, "nfnet_f0", out)
    return out


def test_converter_fills_every_weight_and_the_file_loads_into_build_model(f0_file, f0_state):
    model = build_model("nfnet_f0", num_classes=10, input_shape=(None, None, 3), weights=f0_file)
    block = model.get_layer("stage2_block1")
    np.testing.assert_array_equal(np.asarray(block.skip_gain), f0_state["stages.1.0.skipinit_gain"])
    np.testing.assert_array_equal(np.asarray(block.conv1.kernel),
                                  f0_state["stages.1.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.get_layer("classifier").kernel), f0_state["head.fc.weight"].T)
    # The SE's excite kernel carries 1 / gamma(relu): the Keras SE scales its hidden ReLU by it.
    np.testing.assert_allclose(np.asarray(block.se.excite.kernel) * 1.7139588594436646,
                               f0_state["stages.1.0.attn_last.fc2.weight"][:, :, 0, 0].T, rtol=1e-6)


def test_weights_of_another_network_are_refused_by_build_model(tmp_path, f0_file):
    out = f0_file
    with pytest.raises(ValueError, match=r"^Weights file '.*f0\.keras' does not fit model 'nfnet_f0': "):
        build_model("nfnet_f0", num_classes=1000, input_shape=(None, None, 3), weights=out)
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"^Weights file '.*f0\.keras' does not fit model 'tiny': "):
        load_weights_into(model, out)
    with pytest.raises(ValueError, match=r"^Weights file '.*absent\.keras' does not exist\.$"):
        build_model("tiny", weights=tmp_path / "absent.keras")


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert convert_main([str(missing), "-o", str(tmp_path / "out.keras")]) == 2
    err = capsys.readouterr().err
    assert err == (f"nfnet-convert: error: Checkpoint {str(missing)!r} does not exist "
                   "(give a timm state dict: .pth or .safetensors).\n")
    assert os.listdir(tmp_path) == []


def test_se_activation_is_checked_and_defaults_to_the_block_activation():
    with pytest.raises(ValueError, match=r"^Unknown activation 'gelu_tanh'\. Use one of: "):
        NFResNetConfig(se_activation="gelu_tanh")
    f0 = PRESETS["nfnet_f0"]
    assert (f0.activation, f0.se_activation) == ("gelu_exact", "relu")
    model = build_model("tiny_grouped")
    assert model.get_layer("stage1_block1").se.activation == "gelu"


def test_safetensors_file_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    assert_refused(tmp_path, str(path), "nfnet_f0",
                   f"Reading checkpoint {str(path)!r} needs safetensors: pip install safetensors.")
