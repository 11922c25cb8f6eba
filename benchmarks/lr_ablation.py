"""Why lr 0.1 trains here but died in the report: the same run with one NF ingredient changed at a time.

The report's network went to NaN at lr 0.1 for every batch size (10.14%
validation accuracy). This trains the report's network at the report's
per-trial settings (SGD momentum 0.9, weight decay 2e-4, constant lr, the
report's augmentation, the 45,000/5,000 split) for `--epochs`, once per
variant:

- `nf`: the package's network (SkipInit: skip gains start at 0; beta = std);
- `no_skipinit`: skip gains start at 1 (`skip_gain_init=1`);
- `beta_var`: blocks divide by the expected variance, as the report's code did;
- `report_code`: both of the above;
- `ws_no_fan_in`: weight standardization without its fan-in scaling
  (`(W - mean) / std`, sqrt(N) times the standardized kernel), SkipInit kept;
- `ws_no_fan_in_no_skipinit`: the same with skip gains at 1;
- `plain_conv`: no weight standardization (He-initialised `Conv2D`), SkipInit kept;
- `plain_conv_no_skipinit`: no weight standardization and skip gains at 1.

For each it records where the loss first became NaN/inf (if it did), the
validation accuracy per epoch, and the signal-propagation statistics at
initialisation on 64 real validation images. Writes
`benchmarks/results/lr_ablation.json` and prints a Markdown table.

    NFNET_DATA_DIR=... python -m benchmarks.lr_ablation [--lr 0.1] [--batch-size 64] [--epochs 1]
        [--variants nf,no_skipinit,...] [--train-limit N] [--precision mixed_bfloat16] [--smoke]
"""

import dataclasses
import math
import time

import keras

from benchmarks import common
from nfnet_keras import data as data_lib
from nfnet_keras import training
from nfnet_keras.config import TrainConfig
from nfnet_keras.layers import WSConv2D
from nfnet_keras.models import build_model, signal_propagation


@keras.saving.register_keras_serializable(package="nfnet_keras_benchmarks")
class WSConv2DNoFanIn(WSConv2D):
    """Weight standardization without the fan-in scaling: `gain * (W - mean) / std` (benchmark only)."""

    def standardized_kernel(self, kernel=None, scale=None):
        shape = (self._kernel if kernel is None else kernel).shape
        return super().standardized_kernel(kernel, scale) * math.sqrt(shape[0] * shape[1] * shape[2])


# variant -> (preset overrides, conv layer)
VARIANTS = {
    "nf": ({}, None),
    "no_skipinit": ({"skip_gain_init": 1.0}, None),
    "beta_var": ({"beta": "var"}, None),
    "report_code": ({"skip_gain_init": 1.0, "beta": "var"}, None),
    "ws_no_fan_in": ({}, WSConv2DNoFanIn),
    "ws_no_fan_in_no_skipinit": ({"skip_gain_init": 1.0}, WSConv2DNoFanIn),
    "plain_conv": ({}, keras.layers.Conv2D),
    "plain_conv_no_skipinit": ({"skip_gain_init": 1.0}, keras.layers.Conv2D),
}
DEFAULTS = dict(preset="report_resnet", lr=0.1, batch_size=64, epochs=1, train_limit=None, val_size=5000,
                precision="float32", variants=list(VARIANTS))
SMOKE = dict(preset="tiny", epochs=1, train_limit=256, val_size=64, variants=["nf", "no_skipinit"])


def parse_args(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--val-size", type=int)
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--variants", type=common.str_list, help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: $NFNET_DATA_DIR)")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; use any of {', '.join(VARIANTS)}")
    return args


def run_variant(name, config, splits):
    """Trains one variant; returns its record."""
    overrides, conv_layer = VARIANTS[name]
    config = dataclasses.replace(config, overrides=dict(overrides)).validate()
    train, val = splits
    training.setup_runtime(config)
    kwargs = {} if conv_layer is None else {"conv_layer": conv_layer}
    model = build_model(config.preset, **kwargs, **config.overrides)
    training.compile_model(model, config, math.ceil(len(train[0]) / config.batch_size))
    start_stats = signal_propagation(model, data_lib.preprocess(val[0][:64]))
    train_ds, val_ds = training.make_datasets(config, train, val)
    start = time.perf_counter()
    result = training.fit_model(model, config, train_ds, val_ds, verbose=0)
    record = dict(
        variant=name,
        overrides=overrides,
        conv_layer=conv_layer.__name__ if conv_layer else "WSConv2D",
        diverged_at=result.diverged_at,
        val_accuracy=result.history.get("val_accuracy", []),
        loss=result.history.get("loss", []),
        seconds=round(time.perf_counter() - start, 1),
        signal_at_init=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                        for s in start_stats],
    )
    keras.backend.clear_session()
    return record


def _row(record):
    at = record["diverged_at"]
    accs = record["val_accuracy"]
    stage_var = [s["avg_var"] for s in record["signal_at_init"]]
    return dict(
        variant=record["variant"],
        outcome=f"NaN at epoch {at['epoch']}, step {at['step']}" if at else "trains",
        val_accuracy="" if at or not accs else f"{100 * accs[-1]:.2f}",
        last_block_var=f"{stage_var[-1]:.3g}",
        seconds=record["seconds"],
    )


def main(argv=None):
    args = parse_args(argv)
    config = TrainConfig(preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         schedule="constant", precision=args.precision, train_limit=args.train_limit,
                         val_size=args.val_size, data_dir=args.data_dir).validate()
    train, val, _ = training.load_splits(config)
    with common.benchmark_run("lr_ablation", args) as payload:
        records = []
        for name in args.variants:
            common.log(args, f"{name}: training {config.epochs} epoch(s) at lr {config.lr}, batch {config.batch_size}")
            records.append(run_variant(name, config, (train, val)))
            common.log(args, "   ", _row(records[-1]))
        payload["config"] = config.to_dict()
        payload["variants"] = records
        table = common.format_table([_row(r) for r in records], [
            ("variant", "variant"), ("outcome", "outcome"), ("val_accuracy", "val accuracy (%)"),
            ("last_block_var", "last block output variance at init"), ("seconds", "s")])
        payload["table"] = table
    print(table)
    print(f"Wrote {payload['json_path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
