"""Start-up: the commands answer `--help` and bad flags before loading Keras; the library registers its layers.

Timing is measured in `benchmarks/startup.py`, not here: these tests pin what a
command imports and what `import nfnet_keras` makes available.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flags each command refuses, and the start of its one-line error.
COMMANDS = {
    "nfnet_keras.fit": (["--lr", "-1"], "--lr must be a positive number"),
    "nfnet_keras.evaluate": (["--model", "m.keras", "--limit", "0"], "--limit must be >= 1"),
    "nfnet_keras.predict": (["--model", "m.keras", "--images", "x.npy", "--out", "p.txt"], "--out p.txt"),
    "nfnet_keras.convert": (["x.pth"], "the following arguments are required: -o/--output"),
    "nfnet_keras.export": (["--model", "m.keras", "--name", "x"], "--model m.keras: no such file"),
    "nfnet_keras.serving": (["--model-name", "m", "--protocol", "ftp"], "invalid choice: 'ftp'"),
    "nfnet_keras.tuner.grid": (["--batch-sizes", "0"], "--batch-sizes"),
}


def _imported(module, flags, tmp_path):
    """(exit status, stderr, the top-level packages imported) of `python -m module flags`."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.splitlines()
    packages = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    errors = [line for line in lines if not line.startswith("import time:")]
    return done.returncode, errors, packages


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_and_bad_flags_load_no_framework(module, tmp_path):
    code, _, packages = _imported(module, ["--help"], tmp_path)
    assert code == 0
    assert not packages & {"keras", "tensorflow", "jax", "torch"}, sorted(packages & {"keras", "tensorflow"})
    flags, message = COMMANDS[module]
    code, errors, packages = _imported(module, flags, tmp_path)
    assert code == 2 and message in errors[-1], errors
    assert not packages & {"keras", "tensorflow"}


def test_import_registers_every_keras_object_the_files_name():
    script = (
        "import nfnet_keras, keras\n"
        "names = ['NFBlock', 'PreActBottleneck', 'ConvGroup', 'NormConvGroup', 'WSConv2D', 'ScaledActivation',\n"
        "         'PatchWhitening', 'SqueezeExcite', 'StochasticDepth', 'NormActivation', 'PartialDirac',\n"
        "         'Triangle', 'OneCycle', 'Lookahead', 'GroupSGD', 'RenormSGD', 'ConvMuon']\n"
        "missing = [n for n in names if keras.saving.get_registered_object('nfnet_keras>' + n) is None]\n"
        "print(missing)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_public_names_load_on_first_use():
    import nfnet_keras as nk

    assert nk.build_model is nk.models.registry.build_model
    assert set(nk.__all__) <= set(dir(nk))
    with pytest.raises(AttributeError, match="module 'nfnet_keras' has no attribute 'nope'"):
        nk.nope  # noqa: B018
