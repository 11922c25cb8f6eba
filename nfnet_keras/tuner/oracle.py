"""`ResumableGridSearchOracle` and `NFNetGridSearch`: KerasTuner's grid search, resumable.

KerasTuner 1.4.8's `GridSearchOracle` keeps its traversal (a linked list of
tried combinations and a queue of trials whose successor is still to be made)
in memory only; `oracle.json` does not hold it. Rerun after a kill with
`overwrite=False`, the tuner says "Reloading Tuner" and runs 0 new trials, or,
killed during a trial, reruns that one and then fails with a KeyError
(https://github.com/keras-team/keras-tuner/issues/1055). The same traversal
also hands out the successor of a trial only when that trial ends, so with
several workers all but one of them wait (`IDLE`) most of the time.

The fix lives here, in one class: the next combination is derived from what
is on disk, not from in-memory traversal state. `populate_space` walks the
grid in GridSearch's own order (`_get_next_combination`) and returns the first
combination that no trial has taken yet; `reload` rebuilds the set of taken
combinations from the saved trials and sends every unfinished trial (one a
killed process left `RUNNING`) back to run again. Killed after k trials, the
same command finishes the remaining ones and every grid point runs once.
`oracle.json`, the `trial.json` files and the tuner's file are written
atomically (KerasTuner truncates and rewrites them in place).

Diverged trials (see `tuner.hypermodel`) report a NaN objective and the
metric `diverged = 1`: KerasTuner marks them `FAILED`; this oracle never
retries them and does not count them towards `max_consecutive_failed_trials`
(a divergence is a result; the report's lr 0.1 column diverges four times in
a row).
"""

import json
import os

import keras_tuner
from keras_tuner.src import utils as kt_utils
from keras_tuner.src.distribute import utils as dist_utils
from keras_tuner.src.engine import metrics_tracking
from keras_tuner.src.engine import trial as trial_module

from nfnet_keras import fileio
from nfnet_keras.tuner import distributed

DIVERGED = "diverged"  # metric set to 1.0 by a trial whose loss became NaN/inf

_FINISHED = (trial_module.TrialStatus.COMPLETED, trial_module.TrialStatus.FAILED)


def save_json_atomically(path, state):
    """Writes `state` as JSON to `path` through a temporary file, so a kill never leaves half a file."""
    if "://" in str(path):  # a remote filesystem (gs://...): KerasTuner's own writer
        return kt_utils.save_json(path, state)
    with fileio.atomic_write(path) as f:
        f.write(json.dumps(state))


def trial_number(trial_id):
    """The 1-based number a log shows for `trial_id` (KerasTuner's ids count from 0, its "Trial N" from 1)."""
    text = str(trial_id)
    return int(text) + 1 if text.isdigit() else text


def is_diverged(trial):
    """Whether `trial` reported the `diverged` metric as nonzero."""
    metrics = trial.metrics
    return metrics.exists(DIVERGED) and bool(metrics.get_last_value(DIVERGED))


class ResumableGridSearchOracle(keras_tuner.oracles.GridSearchOracle):
    """A `GridSearchOracle` that resumes after a kill and keeps every worker busy.

    Takes the arguments of `keras_tuner.oracles.GridSearchOracle`. Set
    `max_trials` to the size of the grid so that idle workers stop at the end
    instead of polling the chief.
    """

    def grid(self):
        """Every combination of the current search space, in GridSearch's order."""
        space = self.get_space()
        values = {hp.name: hp.default for hp in space.space if space.is_active(hp)}
        while values is not None:
            yield values
            values = self._get_next_combination(values)

    def populate_space(self, trial_id):
        # Stateless: the first combination that no trial has taken yet.
        # `_tried_so_far` holds the hashes of every trial's values; it is
        # saved in oracle.json and rebuilt from the trial files in `reload`.
        for values in self.grid():
            if not self._duplicate(values):
                return {"status": trial_module.TrialStatus.RUNNING, "values": values}
        if self.ongoing_trials:
            return {"status": trial_module.TrialStatus.IDLE, "values": None}
        return {"status": trial_module.TrialStatus.STOPPED, "values": None}

    def reload(self):
        # keras-tuner#1055: the parent restores the trials and oracle.json but
        # not GridSearch's traversal. Reconcile oracle.json with the trial
        # files (a kill can fall between writing one and the other).
        super().reload()
        self._tried_so_far = set()
        self._id_to_hash.clear()
        for trial in self.trials.values():
            self._record_values(trial)
            if trial.trial_id not in self.start_order:
                self.start_order.append(trial.trial_id)
        finished = [t for t in self.start_order if self.trials[t].status in _FINISHED]
        self.end_order = [t for t in self.end_order if t in finished] + [
            t for t in finished if t not in self.end_order
        ]
        self._retry_queue = [t for t in self._retry_queue if self.trials[t].status not in _FINISHED]
        for trial_id in self.start_order:
            trial = self.trials[trial_id]
            if trial.status in _FINISHED:
                continue
            # Started by a process that no longer runs: run it again, from scratch.
            trial.metrics = metrics_tracking.MetricsTracker()
            trial.status = trial_module.TrialStatus.IDLE
            if trial_id not in self._retry_queue:
                self._retry_queue.append(trial_id)

    def save(self):
        save_json_atomically(self._get_oracle_fname(), self.get_state())

    def _save_trial(self, trial):
        save_json_atomically(os.path.join(self._get_trial_dir(trial.trial_id), "trial.json"), trial.get_state())

    def _retry(self, trial):
        if is_diverged(trial):
            trial.status = trial_module.TrialStatus.FAILED
            return False
        return super()._retry(trial)

    def _check_consecutive_failures(self):
        failures = 0
        for trial_id in self.end_order:
            trial = self.trials[trial_id]
            if is_diverged(trial):
                continue
            failures = failures + 1 if trial.status == trial_module.TrialStatus.FAILED else 0
            if failures == self.max_consecutive_failed_trials:
                raise RuntimeError(
                    f"Number of consecutive failures exceeded the limit of "
                    f"{self.max_consecutive_failed_trials}.\n" + (trial.message or "")
                )

    def unfinished_values(self):
        """The grid points without a finished trial, in grid order."""
        done = {
            self._compute_values_hash(t.hyperparameters.values)
            for t in self.trials.values()
            if t.status in _FINISHED
        }
        return [v for v in self.grid() if self._compute_values_hash(v) not in done]


class NFNetGridSearch(keras_tuner.GridSearch):
    """`keras_tuner.GridSearch` with `ResumableGridSearchOracle`.

    Args:
        hypermodel: keras_tuner.HyperModel. Declares the grid in `build(hp)`.
        objective: str or keras_tuner.Objective. Defaults to `"val_accuracy"`.
        max_trials: int or None. Set it to the grid size. Defaults to `None`.
        seed: int. The oracle's seed. Defaults to `1`.
        max_retries_per_trial: int. Retries of a crashed trial (never of a
            diverged one). Defaults to `0`.
        max_consecutive_failed_trials: int. Crashes in a row that stop the
            search (divergences do not count). Defaults to `3`.
        chief_timeout: float. In a distributed search, seconds a worker waits
            for the chief to answer, at start and on every request, before
            `nfnet_keras.tuner.distributed.ChiefUnreachable`. Defaults to `300`.
        **kwargs: `keras_tuner.Tuner` arguments (`directory`, `project_name`,
            `overwrite`, `executions_per_trial`, ...).
    """

    def __init__(
        self,
        hypermodel,
        objective="val_accuracy",
        max_trials=None,
        seed=1,
        max_retries_per_trial=0,
        max_consecutive_failed_trials=3,
        chief_timeout=300.0,
        **kwargs,
    ):
        self.seed = seed
        oracle = ResumableGridSearchOracle(
            objective=objective,
            max_trials=max_trials,
            seed=seed,
            max_retries_per_trial=max_retries_per_trial,
            max_consecutive_failed_trials=max_consecutive_failed_trials,
        )
        # GridSearch.__init__ only makes a GridSearchOracle; skip to Tuner's.
        keras_tuner.Tuner.__init__(self, oracle, hypermodel, **kwargs)
        # KerasTuner reloads a project only if the tuner's file exists, and writes that file first
        # after the oracle's files at the end of trial 1: killed in between, a rerun would start
        # afresh and run the finished trial again. Written now, a rerun always reloads.
        if not self._is_worker() and not os.path.exists(self._get_tuner_fname()):
            self.save()
        if self._is_worker():  # KerasTuner made its OracleClient: bound its waits on the chief
            distributed.bounded_client(self.oracle, chief_timeout)

    def search(self, *fit_args, **fit_kwargs):
        if not dist_utils.is_chief_oracle():
            return super().search(*fit_args, **fit_kwargs)
        # BaseTuner.search's chief branch, with `distributed.serve` for KerasTuner's `start_server`.
        if "verbose" in fit_kwargs:
            self.oracle.verbose = fit_kwargs["verbose"]
        self.save()
        distributed.serve(self.oracle)
        # KerasTuner's end_trial saves oracle.json before it drops the trial from `ongoing_trials`: saved
        # again, the file ends with no trial running.
        self.save()

    def save(self):
        # BaseTuner.save, with atomic writes.
        if not self._is_worker():
            self.oracle.save()
        save_json_atomically(self._get_tuner_fname(), self.get_state())

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        values = ", ".join(f"{k}={v}" for k, v in trial.hyperparameters.values.items())
        print(f"[{self.tuner_id}] trial {trial_number(trial.trial_id)} starts: {values}", flush=True)
        begin = getattr(self.hypermodel, "begin_trial", None)
        if begin is not None:
            begin(trial.trial_id)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        """Each trial's TensorBoard run in `<log_dir>/<trial_id>/execution<i>`, with its HParams session.

        KerasTuner 1.4.8 does this only under the TensorFlow backend; under JAX
        and PyTorch every trial would write into the same `train/` and
        `validation/` runs with no HParams. TensorBoard's writers need
        TensorFlow, which the grid's data pipeline loads under every backend.
        """
        from keras_tuner.src.engine import tuner_utils
        from tensorboard.plugins.hparams import api as hparams_api

        for callback in list(callbacks):
            if callback.__class__.__name__ == "TensorBoard":
                callback.log_dir = self._get_tensorboard_dir(callback.log_dir, trial.trial_id, execution)
                hparams = tuner_utils.convert_hyperparams_to_hparams(trial.hyperparameters, hparams_api)
                callbacks.append(hparams_api.KerasCallback(writer=callback.log_dir, hparams=hparams,
                                                           trial_id=trial.trial_id))
