"""What a training run shows in TensorBoard: scalars, HParams and signal-propagation plots.

A run of `python -m nfnet_keras.fit` writes under `<run>/logs/`:

```
fit/                  the HParams session: hyperparameters, experiment, signal-propagation plot
fit/train/            loss, accuracy and learning rate, per epoch
fit/validation/       loss and accuracy, per epoch
fit/test/             test loss and accuracy, at the step of the last epoch
fit/signal_propagation.json   the numbers behind the plot
```

TensorBoard names a run by its folder's path below `--logdir` and links an
HParams session only to the runs *below* the session's folder. With the
session in `fit/`, its metrics show both under `tensorboard --logdir <run>/logs`
(session `fit`) and under `tensorboard --logdir runs` (session
`<time>/logs/fit`); and since the session's folder also holds the plot, no run
appears that holds nothing but hyperparameters. A grid-search trial is a
session too: KerasTuner writes its hyperparameters into
`<log_dir>/<trial_id>/execution<i>/`, above that trial's `train/` and
`validation/` (see `nfnet_keras.tuner.hypermodel`).
"""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, {
    ".callbacks": ["SESSION", "SIGNAL_FILE", "SIGNAL_TAG", "SignalPropagationLogger", "TensorBoard",
                   "log_test_metrics", "session_dir"],
    ".hparams": ["FIT_HPARAMS", "FIT_METRICS", "experiment", "fit_experiment", "fit_hparams", "format_overrides",
                 "hparam", "log_hparams", "metric"],
    ".signal_plot": ["logged_epochs", "measure", "plot_signal", "signal_caption"],
})
