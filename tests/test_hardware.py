"""The machine checks read before training: bfloat16 kernels on the CPU, a GPU, and what fit does with them."""

import json

import pytest

from nfnet_keras import fit, hardware
from nfnet_keras.tuner import grid

X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_AMX = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_PLAIN = "Features\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize("text, fast", [(X86_AVX2, False), (X86_AMX, True), (ARM_BF16, True), (ARM_PLAIN, False),
                                        ("flags\t: avx2 avx512f\n", True), ("flags\t: avx2 avx_ne_convert\n", True)])
def test_bfloat16_kernels_are_read_off_the_cpu_flags(tmp_path, text, fast):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    flags = hardware.cpu_flags(str(path))
    assert isinstance(flags, frozenset) and text.split(":")[-1].split()[0] in flags
    assert hardware.cpu_has_fast_bfloat16(flags) is fast


def test_unknown_cpu_flags_change_nothing(tmp_path, monkeypatch):
    assert hardware.cpu_flags(str(tmp_path / "absent")) is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: None)
    assert hardware.cpu_has_fast_bfloat16() is None
    assert hardware.precision_for_machine("mixed_bfloat16", explicit=False, gpu=False) == ("mixed_bfloat16", None)


def test_cuda_visible_devices_empty_hides_the_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.gpu_attached() is False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert hardware.gpu_attached() is False


def test_a_recipes_bfloat16_becomes_float32_only_on_a_slow_machine():
    precision, note = hardware.precision_for_machine("mixed_bfloat16", explicit=False, fast_bfloat16=False, gpu=False)
    assert precision == "float32" and note.startswith("note: this CPU has no bfloat16 kernels")
    assert "training in float32 (--precision mixed_bfloat16 insists)." in note
    precision, warning = hardware.precision_for_machine("mixed_bfloat16", explicit=True, fast_bfloat16=False, gpu=False)
    assert precision == "mixed_bfloat16" and warning.startswith("warning: ") and "--precision float32" in warning
    for fast, gpu in ((True, False), (False, True)):
        assert hardware.precision_for_machine("mixed_bfloat16", False, fast, gpu) == ("mixed_bfloat16", None)
    assert hardware.precision_for_machine("float32", False, False, False) == ("float32", None)
    assert hardware.precision_for_machine("mixed_float16", False, False, False) == ("mixed_float16", None)


@pytest.fixture
def slow_bfloat16(monkeypatch):
    """A machine with an AVX2-only CPU and no GPU."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bfloat16", lambda flags=None: False)
    monkeypatch.setattr(hardware, "gpu_attached", lambda: False)


def test_the_speed_recipe_trains_in_float32_on_a_cpu_without_bfloat16(slow_bfloat16, tmp_path):
    config, args = fit.parse_config(["--recipe", "speed", "--no-export"])
    assert config.precision == "float32" and args.precision_message.startswith("note: ")
    config, args = fit.parse_config(["--recipe", "speed", "--precision", "mixed_bfloat16", "--no-export"])
    assert config.precision == "mixed_bfloat16" and args.precision_message.startswith("warning: ")
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"precision": "mixed_bfloat16"}))
    config, args = fit.parse_config(["--recipe", "speed", "--hparams", str(hparams), "--no-export"])
    assert config.precision == "mixed_bfloat16" and args.precision_message.startswith("warning: ")
    config, args = fit.parse_config(["--recipe", "speed", "--precision", "float32", "--no-export"])
    assert config.precision == "float32" and args.precision_message is None


def test_the_speed_recipe_keeps_bfloat16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bfloat16", lambda flags=None: True)
    monkeypatch.setattr(hardware, "gpu_attached", lambda: False)
    config, args = fit.parse_config(["--recipe", "speed", "--no-export"])
    assert config.precision == "mixed_bfloat16" and args.precision_message is None


def test_the_grid_warns_about_bfloat16_on_a_slow_machine_and_goes_on(slow_bfloat16, tmp_path, capsys):
    """The warning comes before the search: a bad --directory still exits 2 after it, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    status = grid.main(["--precision", "mixed_bfloat16", "--directory", str(blocker / "sub")])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and err[0].startswith("warning: this CPU has no bfloat16 kernels")
    assert err[1].startswith("error: --directory")
