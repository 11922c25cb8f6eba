"""Command-line flags shared by `python -m nfnet_keras.fit` and `python -m nfnet_keras.tuner.grid`.

Both commands describe a `config.TrainConfig`; the flags that set the same
field are declared once here, with its default and help.
"""

import argparse
import ast

from nfnet_keras.config import (
    AUGMENTATION_ALIASES,
    AUGMENTATIONS,
    CONFIG_FIELDS,
    CONV_INITS,
    LOOKAHEAD_SCHEDULES,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    WEIGHT_DECAY_MODES,
)
from nfnet_keras.models.registry import PRESETS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless its help already tells the default, or it has none to tell."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text.lower() or nothing or action.default == [] or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def parse_override(text):
    """`KEY=VALUE` -> (key, value); the value is a Python literal or else a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override takes KEY=VALUE (e.g. depths=(2,2,2)), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string, e.g. activation=gelu


def add_model_flags(group, defaults):
    group.add_argument("--preset", default=defaults.preset, help=f"model preset: {', '.join(PRESETS)}")
    group.add_argument("--override", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                       help="replace a preset key, e.g. --override 'widths=(96,192,384)'; repeatable")
    group.add_argument("--norm", choices=NORMS, default=defaults.norm,
                       help="none: Normalizer-Free; batch: the BatchNorm twin of the same network")
    group.add_argument("--conv-init", choices=CONV_INITS, default=defaults.conv_init,
                       help="he_normal; or dirac: every conv but the stem starts with its first C_in filters "
                       "the identity (airbench94's init)")
    group.add_argument("--whitening-bias-epochs", type=int, default=defaults.whitening_bias_epochs, metavar="N",
                       help="train the whitening stem's bias for the first N epochs only, as airbench94 (3); "
                       "default: every epoch")


def add_optimisation_flags(group, defaults, schedule_help):
    """Every optimisation flag but --epochs, --batch-size and --lr (which the two commands set differently)."""
    d = defaults
    group.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov,
                       help="Nesterov momentum")
    group.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=schedule_help)
    group.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up (cosine)")
    group.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="weight decay (not applied to gains, skip gains, biases)")
    group.add_argument("--weight-decay-mode", choices=WEIGHT_DECAY_MODES, default=d.weight_decay_mode,
                       help="decoupled: w -= lr*wd*w before the step (Keras); coupled: wd*w added to the gradient "
                       "before momentum (L2, torch SGD)")
    for name in ("bias", "gain", "head"):
        what = {"bias": "biases", "gain": "WS gains and skip gains", "head": "the classifier's kernel and bias"}[name]
        group.add_argument(f"--{name}-lr-mult", type=float, default=getattr(d, f"{name}_lr_mult"), metavar="M",
                           help=f"learning-rate multiplier of {what}")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                       help="the conv kernels' optimizer: sgd (as the rest); renorm_sgd: Nesterov SGD on per-filter "
                       "normalized gradients, filters kept at unit norm; muon: Muon on the filters. The rest: SGD")
    group.add_argument("--kernel-lr", type=float, default=d.kernel_lr, metavar="LR",
                       help="peak lr of the conv kernels' optimizer under renorm_sgd/muon (default: --lr)")
    group.add_argument("--kernel-momentum", type=float, default=d.kernel_momentum, metavar="M",
                       help="momentum of the conv kernels' optimizer under renorm_sgd/muon (default: --momentum)")
    group.add_argument("--muon-ns-steps", type=int, default=d.muon_ns_steps, metavar="N",
                       help="Newton-Schulz iterations of Muon (airbench94_muon: 3)")
    group.add_argument("--lookahead", type=int, default=d.lookahead, metavar="K",
                       help="Lookahead: sync slow weights every K steps; 0 disables it")
    group.add_argument("--lookahead-alpha", type=float, default=d.lookahead_alpha, metavar="A",
                       help="Lookahead: slow <- slow + A * (fast - slow) (schedule constant)")
    group.add_argument("--lookahead-schedule", choices=LOOKAHEAD_SCHEDULES, default=d.lookahead_schedule,
                       help="constant: alpha; airbench: alpha = 1 - 0.95**K * (step/steps)**3, and the slow "
                       "weights at the end")
    group.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing factor")
    group.add_argument("--agc", type=float, default=d.agc, metavar="LAMBDA",
                       help="adaptive gradient clipping factor (e.g. 0.01); 0 disables it")
    group.add_argument("--ema", type=float, default=d.ema, metavar="MOMENTUM",
                       help="evaluate and keep an exponential moving average of the weights (e.g. 0.99); 0: off")
    group.add_argument("--augment", choices=AUGMENTATIONS + tuple(AUGMENTATION_ALIASES), default=d.augment,
                       help="noise_rotate_flip (alias seed): the report's per-image policy; "
                       "standard: pad-4 crop + flip; translate_flip: +-2 px reflect-padded shift + flip; "
                       "translate_altflip: the same shift, each image mirrored on alternate epochs; none")


def add_data_flags(group, defaults):
    d = defaults
    group.add_argument("--data-dir", default=d.data_dir,
                       help="folder with cifar-10-batches-py/ or cifar-10-python.tar.gz "
                       "(default: $NFNET_DATA_DIR, then TFDS)")
    group.add_argument("--tfds-dir", default=d.tfds_dir, help="TFDS data_dir (default: ~/tensorflow_datasets)")
    group.add_argument("--train-limit", type=int, default=d.train_limit,
                       help="train on the first N training images (default: all)")
    group.add_argument("--val-size", type=int, default=d.val_size, help="validation images held out of the 50,000")


def add_test_flags(group, defaults):
    """The final test evaluation's flags (fit only: a grid search reports validation accuracy)."""
    group.add_argument("--test-limit", type=int, default=defaults.test_limit, metavar="N",
                       help="evaluate the trained model on the first N test images (default: all 10,000; with "
                       "--train-limit N: min(10000, max(1000, N)))")


def add_runtime_flags(group, defaults):
    d = defaults
    jit = group.add_mutually_exclusive_group()
    jit.add_argument("--jit", dest="jit", action="store_true", default=None,
                     help="XLA-compile the train step (default: on with a GPU or under KERAS_BACKEND=jax, off for "
                     "TensorFlow on CPU where it is slower)")
    jit.add_argument("--no-jit", dest="jit", action="store_false", help="do not XLA-compile the train step")
    group.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                       help="float32, or mixed precision (mixed_bfloat16 on CPUs with native bf16, "
                       "mixed_float16 on GPUs)")
    group.add_argument("--seed", type=int, default=d.seed, help="random seed (weights, shuffling, augmentation)")
    group.add_argument("--deterministic", action="store_true", help="op determinism: bitwise-reproducible runs")


def add_checkpoint_flags(group, defaults):
    """How often a run is checkpointed inside an epoch (fit only: a grid trial restarts)."""
    group.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="N",
                       help="also checkpoint every N training steps inside an epoch (the newest two are kept); "
                       "0: only at epoch ends. SIGTERM and Ctrl-C checkpoint at the next step either way")


def config_values(args):
    """The `TrainConfig` fields among the parsed flags (overrides as a dict)."""
    values = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS and k != "overrides"}
    values["overrides"] = dict(getattr(args, "override", []))
    return values
