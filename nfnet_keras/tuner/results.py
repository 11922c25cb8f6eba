"""The study's outputs: the report's table (batch size x learning rate), as Markdown and CSV,
and the best hyperparameters as a JSON that `python -m nfnet_keras.fit --hparams FILE` reads.
"""

import csv
import dataclasses
import io
import json
import math
import os

from keras_tuner.src.engine import trial as trial_module

from nfnet_keras import fileio
from nfnet_keras.config import TrainConfig
from nfnet_keras.tuner.oracle import is_diverged

# Fixed training settings that change which lr / batch size is best: carried into
# best_hparams.json when the study used a non-default value. (Not epochs, schedule
# or data: the final run chooses its own.)
CARRIED_SETTINGS = ("preset", "momentum", "nesterov", "weight_decay", "label_smoothing", "agc", "augment",
                    "precision")


@dataclasses.dataclass
class Cell:
    """One grid point's outcome."""

    lr: float
    batch_size: int
    status: str  # "ok", "diverged", "failed", "running", "not run"
    val_accuracy: float | None = None
    trial_id: str | None = None
    diverged_epoch: int | None = None
    agc: float | None = None  # the trial's AGC factor when AGC is a grid axis


def collect(oracle, lrs, batch_sizes, agcs=(None,)):
    """{(batch_size, lr, agc): Cell} from the oracle's trials (the chief's in a distributed search).

    `agcs` is `(None,)` unless AGC is an axis of the grid.
    """
    cells = {(b, lr, a): Cell(lr, b, "not run", agc=a) for b in batch_sizes for lr in lrs for a in agcs}
    for trial in oracle.trials.values():
        values = trial.hyperparameters.values
        key = (values.get("batch_size"), values.get("lr"), values.get("agc"))
        if key not in cells:
            continue
        cell = Cell(key[1], key[0], "running", trial_id=trial.trial_id, agc=key[2])
        if is_diverged(trial):
            cell.status = "diverged"
            if trial.metrics.exists("diverged_epoch"):
                cell.diverged_epoch = int(trial.metrics.get_last_value("diverged_epoch"))
        elif trial.status == trial_module.TrialStatus.COMPLETED and trial.score is not None:
            cell.status, cell.val_accuracy = "ok", float(trial.score)
        elif trial.status in (trial_module.TrialStatus.FAILED, trial_module.TrialStatus.INVALID):
            cell.status = "failed"
        cells[key] = cell
    return cells


def best_cell(cells):
    """The finished cell with the highest validation accuracy, or None."""
    ok = [c for c in cells.values() if c.status == "ok" and not math.isnan(c.val_accuracy)]
    return max(ok, key=lambda c: c.val_accuracy) if ok else None


def _text(cell, best):
    if cell.status == "ok":
        text = f"{100 * cell.val_accuracy:.2f}"
        return f"**{text}**" if cell is best else text
    if cell.status == "diverged" and cell.diverged_epoch:
        return f"diverged (epoch {cell.diverged_epoch})"
    return cell.status


def _lr_label(lr):
    return f"lr {lr:g}"


def _agc_label(agc):
    return "off" if not agc else f"{agc:g}"


def _rows(batch_sizes, agcs):
    """(batch, agc) per table row: AGC values side by side within each batch size."""
    return [(b, a) for b in batch_sizes for a in agcs]


def markdown_table(cells, lrs, batch_sizes, agcs=(None,)):
    """The report's table: one row per batch size (and AGC factor, when it is a grid axis), one
    column per lr, best validation accuracy in %."""
    best = best_cell(cells)
    with_agc = agcs != (None,)
    head = "| batch | " + ("AGC | " if with_agc else "")
    lines = [head + " | ".join(_lr_label(lr) for lr in lrs) + " |",
             "|---|" + ("---|" if with_agc else "") + "---|" * len(lrs)]
    for b, a in _rows(batch_sizes, agcs):
        agc_text = f"{_agc_label(a)} | " if with_agc else ""
        lines.append(f"| {b} | {agc_text}" + " | ".join(_text(cells[(b, lr, a)], best) for lr in lrs) + " |")
    return "\n".join(lines)


def csv_table(cells, lrs, batch_sizes, agcs=(None,)):
    """The same table as CSV: accuracy in % (2 decimals), or the status (`diverged`, `failed`, ...)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    with_agc = agcs != (None,)
    writer.writerow(["batch_size"] + (["agc"] if with_agc else []) + [f"lr={lr:g}" for lr in lrs])
    for b, a in _rows(batch_sizes, agcs):
        row = []
        for lr in lrs:
            cell = cells[(b, lr, a)]
            row.append(f"{100 * cell.val_accuracy:.2f}" if cell.status == "ok" else cell.status)
        writer.writerow([b] + ([f"{a:g}"] if with_agc else []) + row)
    return out.getvalue()


def best_hparams(cell, config):
    """The `--hparams` JSON of `nfnet_keras.fit`: the best lr and batch size, the preset, and the
    study's non-default settings among `CARRIED_SETTINGS` (their keys are TrainConfig fields)."""
    defaults = TrainConfig()
    hparams = {"lr": cell.lr, "batch_size": cell.batch_size, "preset": config.preset}
    for key in CARRIED_SETTINGS:
        if getattr(config, key) != getattr(defaults, key):
            hparams[key] = getattr(config, key)
    if cell.agc is not None:
        hparams["agc"] = cell.agc
    return hparams


def output_paths(directory, project_name):
    """`<directory>/<project>_results.md`, `..._results.csv`, `..._best_hparams.json`: beside the project."""
    stem = os.path.join(directory, project_name)
    return dict(markdown=f"{stem}_results.md", csv=f"{stem}_results.csv", best=f"{stem}_best_hparams.json")


def write_outputs(cells, lrs, batch_sizes, config, directory, project_name, title="", agcs=(None,)):
    """Writes the Markdown and CSV tables and (if any trial finished) best_hparams.json.

    Returns:
        (paths dict, markdown text, best Cell or None).
    """
    paths = output_paths(directory, project_name)
    table = markdown_table(cells, lrs, batch_sizes, agcs)
    best = best_cell(cells)
    _write_text(paths["markdown"], (f"{title}\n\n" if title else "") + table + "\n")
    _write_text(paths["csv"], csv_table(cells, lrs, batch_sizes, agcs))
    if best is not None:
        _write_text(paths["best"], json.dumps(best_hparams(best, config), indent=2) + "\n")
    return paths, table, best


def _write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with fileio.atomic_write(path) as f:
        f.write(text)
