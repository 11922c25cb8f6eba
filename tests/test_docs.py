"""The README's and docs' code blocks, so that they cannot drift from the code.

Every ```python block runs (one preceded by a line `<!-- not run: REASON -->`
is skipped, e.g. one that needs a TF Serving server); every flag that a
```bash block gives one of the package's commands is one that command's
`--help` lists.
"""

import contextlib
import glob
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# How a code line names a command, and the module whose `main` it runs.
COMMANDS = {
    "nfnet-fit": "nfnet_keras.fit", "nfnet-evaluate": "nfnet_keras.evaluate", "nfnet-predict": "nfnet_keras.predict",
    "nfnet-export": "nfnet_keras.export", "nfnet-serve-client": "nfnet_keras.serving",
    "nfnet-grid": "nfnet_keras.tuner.grid", "nfnet-convert": "nfnet_keras.convert",
    "python -m tuner.grid": "nfnet_keras.tuner.grid",
}
COMMANDS.update({f"python -m {module}": module for module in set(COMMANDS.values())})


def code_blocks(language):
    """[(file, line, code)] of the fenced blocks of `language` not marked `<!-- not run: ... -->`."""
    found = []
    for path in DOCS:
        with open(path) as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != f"```{language}" or (i and lines[i - 1].startswith("<!-- not run")):
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found.append((os.path.relpath(path, ROOT), i + 1, "\n".join(lines[i + 1:end])))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("where, line, code", code_blocks("python"), ids=lambda v: str(v)[:40])
def test_python_blocks_run(where, line, code):
    exec(compile(code, f"{where}:{line}", "exec"), {"__name__": "__docs__"})


def _help(module):
    import importlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    return out.getvalue()


def command_flags():
    """[(file, line, module, flag)] of every `--flag` a bash block gives one of the package's commands."""
    found = []
    for where, start, code in code_blocks("bash"):
        for offset, text in enumerate(code.replace("\\\n", " ").splitlines()):
            text = text.split("#")[0]
            for name, module in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
                at = re.search(rf"(^|[\s;&|(]){re.escape(name)}(\s|$)", text)
                if at:
                    rest = text[at.end():].split("|")[0].split("&&")[0]
                    flags = re.findall(r"(--[a-z][a-z0-9-]*)", rest)
                    found += [(where, start + offset, module, flag) for flag in flags]
                    break
    return found


def test_every_documented_flag_exists():
    helps, missing = {}, []
    for where, line, module, flag in command_flags():
        helps.setdefault(module, _help(module))
        if not re.search(rf"{re.escape(flag)}\b", helps[module]):
            missing.append(f"{where}:{line}: {module} has no {flag}")
    assert not missing, "\n".join(missing)
    assert len(helps) >= 5  # the check saw the commands
