"""The Keras callbacks of TensorBoard logging: per-epoch scalars, the test metrics, the signal-propagation plot."""

import os

import keras
import numpy as np

from nfnet_keras import fileio
from nfnet_keras.tensorboard.hparams import experiment_summary
from nfnet_keras.tensorboard.signal_plot import logged_epochs, measure, plot_signal, signal_caption

SESSION = "fit"
SIGNAL_TAG = "signal_propagation"
SIGNAL_FILE = "signal_propagation.json"


def session_dir(log_dir):
    """The folder of a fit run's HParams session, `<log_dir>/fit`."""
    return os.path.join(log_dir, SESSION)


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, per epoch, without the graph and the `*_vs_iterations` copies.

    Keras writes each validation metric twice: per epoch in `validation/`
    (`epoch_accuracy`) and against the optimizer's step
    (`evaluation_accuracy_vs_iterations`). With one validation per epoch the
    second chart repeats the first, so it is not written.

    The class keeps Keras' name: KerasTuner recognises a TensorBoard callback by
    its class name, writes each trial to `<log_dir>/<trial_id>/execution<i>`
    and adds its HParams callback there.

    Args:
        log_dir: str. The session folder; `train/` and `validation/` go below it.
        experiment: `api_pb2.Experiment` or None. An HParams experiment (see
            `experiment`), written into the `train/` run when training starts.
            TensorBoard reads the experiment from whichever run holds it; a
            folder of its own would show up as a run with nothing in it.
            Defaults to `None`.

    Example:

    ```python
    model.fit(x, y, validation_data=(xv, yv), callbacks=[TensorBoard("logs/fit")])
    ```
    """

    def __init__(self, log_dir, experiment=None):
        super().__init__(log_dir, write_graph=False, update_freq="epoch", profile_batch=0)
        # Bytes, not the message: KerasTuner deep-copies its callbacks.
        self._experiment = None if experiment is None else experiment_summary(experiment)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._experiment is not None:
            import tensorflow as tf

            with self._train_writer.as_default():
                tf.summary.experimental.write_raw_pb(self._experiment, step=0)

    def on_test_end(self, logs=None):
        self._pop_writer()  # Keras' version also writes `evaluation_<metric>_vs_iterations`


def log_test_metrics(log_dir, step, loss, accuracy):
    """Writes the test loss and accuracy of a fit run and closes its HParams session.

    The values go to `<log_dir>/test/` as `epoch_loss` and `epoch_accuracy` at
    `step` (the last epoch's, so they appear on the train and validation
    charts), where the HParams session in `log_dir` finds them as its test
    metrics; the session is marked successful.

    Args:
        log_dir: str. The session folder (`session_dir(...)`).
        step: int. The step of the last epoch's scalars (epochs trained - 1).
        loss: float. Test loss.
        accuracy: float. Test accuracy (a fraction).
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary as hp_summary

    writer = tf.summary.create_file_writer(os.path.join(log_dir, "test"))
    with writer.as_default(step=step):
        tf.summary.scalar("epoch_loss", float(loss))
        tf.summary.scalar("epoch_accuracy", float(accuracy))
    writer.close()
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(hp_summary.session_end_pb(api_pb2.STATUS_SUCCESS).SerializeToString(),
                                             step=0)
    writer.close()


class SignalPropagationLogger(keras.callbacks.Callback):
    """Plots the per-block signal statistics at initialisation, after a few epochs and at the end.

    The plot (`plot_signal`) is the image `signal_propagation` of `log_dir`, at
    step 0 (before training), after each epoch of `logged_epochs(epochs)`, and
    at the end of training if that ended elsewhere (a divergence); each shows
    the model on unit-Gaussian input and on `images`. The numbers go to
    `<log_dir>/signal_propagation.json`, which a resumed run reads back, so
    `stats` holds the start of the run even after a restart.

    Args:
        log_dir: str. The HParams session folder (`session_dir(...)`).
        images: float array `(n, h, w, c)`. Preprocessed real images (e.g. 64
            validation images).
        seed: int. Seed of the unit-Gaussian input (same shape as `images`).
            Defaults to `0`.
    """

    def __init__(self, log_dir, images, seed=0):
        super().__init__()
        self.log_dir = log_dir
        self.images = np.asarray(images, dtype="float32")
        self.gaussian = np.random.default_rng(seed).standard_normal(self.images.shape).astype("float32")
        self.path = os.path.join(log_dir, SIGNAL_FILE)
        saved = fileio.read_json(self.path, default=None) or {}
        self.measured = {int(step): profile for step, profile in saved.get("steps", {}).items()}
        self._writer = None
        self._epochs_done = 0
        self._last_step = None

    @property
    def stats(self):
        """`start`, `end` (on the images) and `start_unit_gaussian`, `end_unit_gaussian` rows."""
        out = {}
        if 0 in self.measured:
            out.update(start=self.measured[0]["images"], start_unit_gaussian=self.measured[0]["unit_gaussian"])
        if self._last_step is not None:
            last = self.measured[self._last_step]
            out.update(end=last["images"], end_unit_gaussian=last["unit_gaussian"])
        return out

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 0 and 0 not in self.measured:
            self._log(0)

    def on_epoch_end(self, epoch, logs=None):
        self._epochs_done = epoch + 1
        if self._epochs_done in logged_epochs(self.params.get("epochs") or self._epochs_done):
            self._log(self._epochs_done)

    def on_train_end(self, logs=None):
        if self._last_step is None or self._last_step < self._epochs_done:  # the end is not drawn yet
            self._log(self._epochs_done)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _log(self, step):
        import tensorflow as tf

        profile = dict(images=measure(self.model, self.images), unit_gaussian=measure(self.model, self.gaussian))
        self.measured[step] = profile
        self._last_step = step
        steps = {str(k): v for k, v in sorted(self.measured.items())}
        fileio.write_json(self.path, dict(images=len(self.images), steps=steps))
        png = plot_signal(profile, "at initialisation" if step == 0 else f"after {_plural(step, 'epoch')}",
                          n_images=len(self.images))
        if self._writer is None:  # created late: the session's hyperparameters are written first
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.image(SIGNAL_TAG, tf.image.decode_png(png, channels=4)[None], step=step,
                             description=signal_caption(self.model, len(self.images)))
        self._writer.flush()


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")
