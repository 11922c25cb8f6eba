"""The HParams dashboard of TensorBoard: the columns of a fit run's table and its values."""

import time

from nfnet_keras.config import FIELD_KINDS, FIELDS
from nfnet_keras.models.presets import PRESETS

_KINDS = {float: "DATA_TYPE_FLOAT64", int: "DATA_TYPE_FLOAT64", bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}


def hparam(name, kind, values=None, shown=False, display_name=None, description=""):
    """The HParams dashboard's column for one hyperparameter.

    Args:
        name: str. The hyperparameter's key in each session.
        kind: `float`, `int`, `bool` or `str`.
        values: sequence or None. Every value it can take (a discrete domain:
            the dashboard offers one check box each); `None` for any value of
            `kind`. Defaults to `None`.
        shown: bool. Whether the dashboard shows the column before the user
            asks for it. TensorBoard lists the columns marked `differs` first
            and shows the first five; this sets `differs`. Defaults to `False`.
        display_name: str or None. The column's title. Defaults to `name`.
        description: str. Its tooltip. Defaults to `""`.

    Returns:
        An `api_pb2.HParamInfo`.
    """
    from tensorboard.plugins.hparams import api_pb2

    info = api_pb2.HParamInfo(name=name, display_name=display_name or name, description=description,
                              type=api_pb2.DataType.Value(_KINDS[kind]), differs=shown)
    if values is not None:
        info.domain_discrete.extend([kind(v) for v in values])
    return info


def metric(tag, group, display_name):
    """The HParams dashboard's column for the last value of scalar `tag` in run `<session>/<group>`."""
    from tensorboard.plugins.hparams import api as hp

    return hp.Metric(tag, group=group, display_name=display_name).as_proto()


def experiment(hparams, metrics):
    """An HParams experiment: the columns of the dashboard, in the order given.

    Args:
        hparams: list of `api_pb2.HParamInfo` (from `hparam`).
        metrics: list of `api_pb2.MetricInfo` (from `metric`). The dashboard
            shows the first five.

    Returns:
        An `api_pb2.Experiment`.
    """
    from tensorboard.plugins.hparams import api_pb2

    return api_pb2.Experiment(hparam_infos=hparams, metric_infos=metrics, time_created_secs=time.time())


def experiment_summary(exp):
    """`exp` as the serialized summary TensorBoard reads an HParams experiment from."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.EXPERIMENT_TAG,
                      metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=exp)),
                      tensor=metadata.NULL_TENSOR)
    return summary.SerializeToString()


def _fit_hparams():
    """The columns of a fit run, one per `TrainConfig` field with an `hparam` description, shown ones first:
    (field, kind, values or None, shown at first, description)."""
    rows = []
    for field in FIELDS:
        meta = field.metadata
        if meta["hparam"] is None:
            continue
        kind, values = FIELD_KINDS[field.name], meta["choices"]
        if field.name == "preset":
            values = tuple(PRESETS)
        elif kind is bool:
            values = (False, True)
        elif kind is dict:  # the overrides, as text (`format_overrides`)
            kind = str
        rows.append((field.name, kind, values, meta["shown"], meta["hparam"]))
    return tuple(sorted(rows, key=lambda row: not row[3]))


# The columns of a fit run: (config field, kind, values, shown by default, description).
FIT_HPARAMS = _fit_hparams()
FIT_METRICS = (
    ("epoch_accuracy", "validation", "validation accuracy"),
    ("epoch_loss", "validation", "validation loss"),
    ("epoch_accuracy", "test", "test accuracy"),
    ("epoch_accuracy", "train", "train accuracy"),
    ("epoch_loss", "train", "train loss"),
    ("epoch_loss", "test", "test loss"),
)


def fit_experiment():
    """The HParams experiment of a fit run: `FIT_HPARAMS` and `FIT_METRICS`.

    Every fit run declares the same one, so TensorBoard started on a folder of
    many runs shows them in one table.
    """
    return experiment([hparam(name, kind, values, shown, description=text)
                       for name, kind, values, shown, text in FIT_HPARAMS],
                      [metric(*m) for m in FIT_METRICS])


def format_overrides(overrides):
    """`{"depths": [1, 1], "activation": "gelu"}` -> `"activation=gelu, depths=(1, 1)"`; `{}` -> `"none"`."""
    if not overrides:
        return "none"
    text = {k: str(tuple(v)) if isinstance(v, (list, tuple)) else str(v) for k, v in overrides.items()}
    return ", ".join(f"{k}={text[k]}" for k in sorted(text))


def fit_hparams(config):
    """The values of `FIT_HPARAMS` for `config` (a `TrainConfig`); unset ones are left out."""
    values = config.to_dict()
    values["overrides"] = format_overrides(values["overrides"])
    return {name: kind(values[name]) for name, kind, *_ in FIT_HPARAMS if values[name] is not None}


def log_hparams(log_dir, config):
    """Makes `log_dir` a fit run's HParams session: writes the experiment and the run's values.

    Args:
        log_dir: str. The session folder (`session_dir(...)`); the run's
            `train/`, `validation/` and `test/` go below it.
        config: TrainConfig.
    """
    import tensorflow as tf
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    # No group name: TensorBoard then names the group after the session's run,
    # which is unique, where a name of our own could merge two runs' rows.
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in fit_hparams(config).items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, str):
            start.hparams[name].string_value = value
        else:
            start.hparams[name].number_value = value
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.SESSION_START_INFO_TAG,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        tensor=metadata.NULL_TENSOR,
    )
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(experiment_summary(fit_experiment()), step=0)
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)
    writer.close()
