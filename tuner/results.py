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

from nfnet_keras.training import TrainConfig
from tuner.oracle import is_diverged

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


def collect(oracle, lrs, batch_sizes):
    """{(batch_size, lr): Cell} from the oracle's trials (the chief's in a distributed search)."""
    cells = {(b, lr): Cell(lr, b, "not run") for b in batch_sizes for lr in lrs}
    for trial in oracle.trials.values():
        values = trial.hyperparameters.values
        key = (values.get("batch_size"), values.get("lr"))
        if key not in cells:
            continue
        cell = Cell(key[1], key[0], "running", trial_id=trial.trial_id)
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


def markdown_table(cells, lrs, batch_sizes):
    """The report's table: one row per batch size, one column per lr, best validation accuracy in %."""
    best = best_cell(cells)
    lines = ["| batch | " + " | ".join(_lr_label(lr) for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for b in batch_sizes:
        lines.append(f"| {b} | " + " | ".join(_text(cells[(b, lr)], best) for lr in lrs) + " |")
    return "\n".join(lines)


def csv_table(cells, lrs, batch_sizes):
    """The same table as CSV: accuracy in % (2 decimals), or the status (`diverged`, `failed`, ...)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["batch_size"] + [f"lr={lr:g}" for lr in lrs])
    for b in batch_sizes:
        row = []
        for lr in lrs:
            cell = cells[(b, lr)]
            row.append(f"{100 * cell.val_accuracy:.2f}" if cell.status == "ok" else cell.status)
        writer.writerow([b] + row)
    return out.getvalue()


def best_hparams(cell, config):
    """The `--hparams` JSON of `nfnet_keras.fit`: the best lr and batch size, the preset, and the
    study's non-default settings among `CARRIED_SETTINGS` (their keys are TrainConfig fields)."""
    defaults = TrainConfig()
    hparams = {"lr": cell.lr, "batch_size": cell.batch_size, "preset": config.preset}
    for key in CARRIED_SETTINGS:
        if getattr(config, key) != getattr(defaults, key):
            hparams[key] = getattr(config, key)
    return hparams


def output_paths(directory, project_name):
    """`<directory>/<project>_results.md`, `..._results.csv`, `..._best_hparams.json`: beside the project."""
    stem = os.path.join(directory, project_name)
    return dict(markdown=f"{stem}_results.md", csv=f"{stem}_results.csv", best=f"{stem}_best_hparams.json")


def write_outputs(cells, lrs, batch_sizes, config, directory, project_name, title=""):
    """Writes the Markdown and CSV tables and (if any trial finished) best_hparams.json.

    Returns:
        (paths dict, markdown text, best Cell or None).
    """
    paths = output_paths(directory, project_name)
    table = markdown_table(cells, lrs, batch_sizes)
    best = best_cell(cells)
    _atomic_write(paths["markdown"], (f"{title}\n\n" if title else "") + table + "\n")
    _atomic_write(paths["csv"], csv_table(cells, lrs, batch_sizes))
    if best is not None:
        _atomic_write(paths["best"], json.dumps(best_hparams(best, config), indent=2) + "\n")
    return paths, table, best


def _atomic_write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
