"""`TrainConfig`: every setting a training run depends on, and the named recipes.

A config is plain data: it is written to `<run>/config.json`, compared on
resume, and passed from the command line, a `--hparams` JSON file, a recipe or
Python. `validate()` checks the type and range of every field however it
arrived, and turns aliases into canonical names.
"""

import dataclasses
import math

SCHEDULES = ("step", "cosine", "onecycle", "triangle", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("none", "mirrored", "data_parallel")
# Augmentation policies (implemented in `nfnet_keras.data`): the report's
# per-image policy, pad-4 crop + flip, +-2 px reflect-padded translation + flip, the same translation
# with each image mirrored on alternate epochs (airbench94's), and none.
AUGMENTATIONS = ("noise_rotate_flip", "standard", "translate_flip", "translate_altflip", "none")
AUGMENTATION_ALIASES = {"seed": "noise_rotate_flip"}
# What normalizes the network: nothing (Normalizer-Free), or BatchNorm where the NF
# network has its scaled activations (the BatchNorm twin, for comparisons).
NORMS = ("none", "batch")
# How the conv kernels start: He normal, or with their first C_in filters the identity (airbench94's
# Dirac init, `nfnet_keras.layers.initializers.PartialDirac`; not the stem).
CONV_INITS = ("he_normal", "dirac")
# Test-time augmentation of fit's final report and `evaluate --tta` (views in nfnet_keras.inference).
TTA_POLICIES = ("none", "flip", "flip_translate", "flip_translate_weighted")
# How weight decay acts (nfnet_keras.optimizers.groups): decoupled (Keras) or coupled (L2 in the gradient).
WEIGHT_DECAY_MODES = ("decoupled", "coupled")
# How Lookahead's slow weights step (nfnet_keras.optimizers.lookahead): a constant alpha, or airbench94's schedule.
LOOKAHEAD_SCHEDULES = ("constant", "airbench")
# The optimizer of the conv kernels (nfnet_keras.optimizers): SGD like the rest, SGD that keeps every
# filter at unit norm, or Muon; the rest is always (group) SGD.
OPTIMIZERS = ("sgd", "renorm_sgd", "muon")
# Fields that say where things are (or how often a checkpoint is written), not what the experiment
# is: they may differ between the runs of one experiment (e.g. on resume, after moving the data).
LOCATION_FIELDS = ("data_dir", "tfds_dir", "checkpoint_every")

# Named sets of TrainConfig values: `python -m nfnet_keras.fit --recipe NAME`
# (explicit flags and --hparams win). docs/training.md explains each choice.
RECIPES = {
    # The defaults: the report's final run (200 epochs, lr 0.01, batch 64, step schedule).
    "report": {},
    # 20 epochs, one-cycle to lr 0.1 at batch 128 with Nesterov momentum, pad-crop-flip,
    # label smoothing 0.1, weight decay 5e-4, 49,000 training images (1,000 held out),
    # NFNet's avg-pool + 1x1 transition shortcuts (a strided 1x1 conv drops 3/4 of the
    # positions and trained 4-10 points behind in the first epochs). 89.42% test after 20 epochs.
    "fast": dict(epochs=20, batch_size=128, lr=0.1, schedule="onecycle", nesterov=True, weight_decay=5e-4,
                 label_smoothing=0.1, augment="standard", val_size=1000, overrides={"shortcut_pool": True}),
    # The CIFAR speed network (`cifar_speed`: whitening stem, three conv-pool groups) for 10 epochs
    # at batch 512: Nesterov SGD, a triangular lr, label smoothing 0.2, an EMA of the weights for
    # evaluation, +-2 px translation and flips, AGC, and six-view test-time augmentation. The
    # weight decay (5e-3) is 10x the fast recipe's: the weight-standardized kernels are scale-
    # invariant, so lr x decay sets their effective step; lr 0.4 with it trained 2.2 points above
    # lr 0.2 with 5e-4 in a 5-epoch screen (docs/training.md#the-speed-recipe).
    "speed": dict(preset="cifar_speed", epochs=10, batch_size=512, lr=0.4, momentum=0.9, nesterov=True,
                  schedule="triangle", weight_decay=5e-3, label_smoothing=0.2, agc=0.04, ema=0.98,
                  augment="translate_flip", tta="flip_translate", val_size=1000, precision="mixed_bfloat16"),
}


def canonical_augmentation(name):
    """The policy name for `name` (an alias such as `seed` gives `noise_rotate_flip`)."""
    return AUGMENTATION_ALIASES.get(name, name)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the report's final run."""

    preset: str = "report_resnet"
    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "step"
    warmup_epochs: float = 0.0
    weight_decay: float = 2e-4
    label_smoothing: float = 0.0
    agc: float = 0.0  # AGC clipping factor; 0 disables it
    ema: float = 0.0  # momentum of an exponential moving average of the weights; 0 disables it
    weight_decay_mode: str = "decoupled"
    bias_lr_mult: float = 1.0  # learning-rate multipliers of the parameter groups
    gain_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    lookahead: int = 0  # Lookahead's sync period k in steps; 0 disables it
    lookahead_alpha: float = 0.5
    lookahead_schedule: str = "constant"
    optimizer: str = "sgd"
    kernel_lr: float | None = None  # peak lr of the conv kernels' optimizer (renorm_sgd, muon); None: --lr
    kernel_momentum: float | None = None  # its momentum; None: --momentum
    muon_ns_steps: int = 5
    augment: str = "noise_rotate_flip"
    jit: bool | None = None  # None: True on GPU, False on CPU (measured faster there)
    precision: str = "float32"
    seed: int = 0
    deterministic: bool = False
    train_limit: int | None = None
    # Test images of the final evaluation; None: all, or `default_test_limit(train_limit)` with --train-limit.
    test_limit: int | None = None
    val_size: int = 5000
    data_dir: str | None = None
    tfds_dir: str | None = None
    strategy: str = "none"
    norm: str = "none"
    tta: str = "flip"
    conv_init: str = "he_normal"
    whitening_bias_epochs: int | None = None  # epochs the whitening stem's bias trains; None: all of them
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends (and on SIGTERM/Ctrl-C)
    overrides: dict = dataclasses.field(default_factory=dict)  # preset overrides

    def validate(self):
        """Checks every field; canonicalises aliases. Returns `self`.

        Raises:
            ValueError: one line naming the flag, the bad value and what is allowed.
        """
        self._check_types()
        import keras

        from nfnet_keras.models.conv_groups.presets import ConvGroupsConfig
        from nfnet_keras.models.registry import resolve_config

        self.augment = canonical_augmentation(self.augment)
        resolved = resolve_config(self.preset, self.overrides)
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}."),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}."),
            (self.lr > 0, f"--lr must be a positive number, got {self.lr}."),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}."),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}."),
            (0 <= self.warmup_epochs < self.epochs,
             f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}."),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}."),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}."),
            (self.agc >= 0, f"--agc must be >= 0 (0 disables it), got {self.agc}."),
            (0 <= self.ema < 1, f"--ema must be in [0, 1) (0 disables it), got {self.ema}."),
            (self.weight_decay_mode in WEIGHT_DECAY_MODES,
             f"--weight-decay-mode must be one of {', '.join(WEIGHT_DECAY_MODES)}, got {self.weight_decay_mode!r}."),
            (self.bias_lr_mult > 0, f"--bias-lr-mult must be a positive number, got {self.bias_lr_mult}."),
            (self.gain_lr_mult > 0, f"--gain-lr-mult must be a positive number, got {self.gain_lr_mult}."),
            (self.head_lr_mult > 0, f"--head-lr-mult must be a positive number, got {self.head_lr_mult}."),
            (self.lookahead >= 0,
             f"--lookahead must be >= 0 (steps between syncs; 0 disables it), got {self.lookahead}."),
            (0 < self.lookahead_alpha <= 1, f"--lookahead-alpha must be in (0, 1], got {self.lookahead_alpha}."),
            (self.lookahead_schedule in LOOKAHEAD_SCHEDULES, f"--lookahead-schedule must be one of "
             f"{', '.join(LOOKAHEAD_SCHEDULES)}, got {self.lookahead_schedule!r}."),
            (self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}."),
            (self.kernel_lr is None or self.kernel_lr > 0,
             f"--kernel-lr must be a positive number, got {self.kernel_lr}."),
            (self.kernel_momentum is None or 0 <= self.kernel_momentum < 1,
             f"--kernel-momentum must be in [0, 1), got {self.kernel_momentum}."),
            (self.muon_ns_steps >= 1, f"--muon-ns-steps must be >= 1, got {self.muon_ns_steps}."),
            (not (self.lookahead and self.strategy == "mirrored"),
             "--lookahead is not supported with --strategy mirrored; use --strategy none or data_parallel."),
            (self.norm in NORMS, f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}."),
            (self.conv_init in CONV_INITS,
             f"--conv-init must be one of {', '.join(CONV_INITS)}, got {self.conv_init!r}."),
            (self.tta in TTA_POLICIES, f"--tta must be one of {', '.join(TTA_POLICIES)}, got {self.tta!r}."),
            (self.augment in AUGMENTATIONS,
             f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}."),
            (self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}."),
            (self.strategy in STRATEGIES,
             f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}."),
            (self.val_size >= 1, f"--val-size must be >= 1, got {self.val_size}."),
            (self.train_limit is None or self.train_limit >= 1,
             f"--train-limit must be >= 1, got {self.train_limit}."),
            (self.checkpoint_every >= 0,
             f"--checkpoint-every must be >= 0 (steps; 0: only at epoch ends), got {self.checkpoint_every}."),
            (self.test_limit is None or self.test_limit >= 1,
             f"--test-limit must be >= 1, got {self.test_limit}."),
            (self.whitening_bias_epochs is None or self.whitening_bias_epochs >= 0,
             f"--whitening-bias-epochs must be >= 0 (unset: every epoch), got {self.whitening_bias_epochs}."),
            (self.whitening_bias_epochs is None or isinstance(resolved, ConvGroupsConfig),
             f"--whitening-bias-epochs needs a network with a whitening stem (e.g. --preset cifar_speed); "
             f"{self.preset} has none."),
            (self.whitening_bias_epochs is None or keras.backend.backend() == "tensorflow",
             f"--whitening-bias-epochs needs KERAS_BACKEND=tensorflow (it freezes a layer during fit, done here "
             f"on TensorFlow only), got {keras.backend.backend()}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def _check_types(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = field_type_problem(field.name, value)
            if problem:
                raise ValueError(f"--{field.name.replace('_', '-')} {problem}.")
            if _FIELD_KINDS[field.name] is float and value is not None:
                setattr(self, field.name, float(value))

    def evaluation_test_limit(self):
        """How many test images (the first ones) the final evaluation uses; None: all.

        `--test-limit` if given; else, with `--train-limit N`, `default_test_limit(N)`.
        """
        if self.test_limit is not None:
            return self.test_limit
        if self.train_limit is not None:
            return default_test_limit(self.train_limit)
        return None

    def to_dict(self):
        return dataclasses.asdict(self)

    def identity(self):
        """What makes two runs the same experiment: every field but the locations."""
        return {k: v for k, v in self.to_dict().items() if k not in LOCATION_FIELDS}


def default_test_limit(train_limit):
    """The test images of a run with `--train-limit N` and no `--test-limit`: min(10000, max(1000, N)).

    A quick run on a few thousand images is then not mostly its final
    evaluation (plain, flipped and with the TTA policy), while 1,000 images
    still measure its accuracy to about +-1.5 points.
    """
    return min(10000, max(1000, train_limit))


def with_defaults(recorded):
    """A recorded config dict with the fields it lacks at their defaults.

    A run or search recorded before a field existed ran with what is now that
    field's default, so it compares equal to a config that sets the default.
    """
    defaults = TrainConfig().to_dict()
    return {**{k: v for k, v in defaults.items() if k not in recorded}, **recorded}


_FIELD_KINDS = dict(
    preset=str, epochs=int, batch_size=int, lr=float, momentum=float, nesterov=bool, schedule=str,
    warmup_epochs=float, weight_decay=float, label_smoothing=float, agc=float, ema=float,
    weight_decay_mode=str, bias_lr_mult=float, gain_lr_mult=float, head_lr_mult=float,
    lookahead=int, lookahead_alpha=float, lookahead_schedule=str, optimizer=str, kernel_lr=float,
    kernel_momentum=float, muon_ns_steps=int, augment=str, jit=bool,
    precision=str, seed=int, deterministic=bool, train_limit=int, test_limit=int, val_size=int, data_dir=str,
    tfds_dir=str, strategy=str, norm=str, tta=str, conv_init=str, whitening_bias_epochs=int, checkpoint_every=int,
    overrides=dict,
)
_OPTIONAL = ("jit", "train_limit", "test_limit", "data_dir", "tfds_dir", "whitening_bias_epochs", "kernel_lr",
             "kernel_momentum")


def field_type_problem(name, value):
    """Why `value` cannot be the `TrainConfig` field `name` (e.g. "must be a finite number, got 'fast' (str)"), or None.

    Args:
        name: str. A field of `TrainConfig`.
        value: the value, as it came from a flag, a JSON file or Python.

    Returns:
        str or None.
    """
    kind = _FIELD_KINDS[name]
    if value is None and name in _OPTIONAL:
        return None
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
    elif kind is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif kind is str:
        ok, what = isinstance(value, str), "a string"
    else:
        ok, what = isinstance(value, dict), "an object of preset keys"
    return None if ok else f"must be {what}, got {value!r} ({type(value).__name__})"
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
assert set(_FIELD_KINDS) == CONFIG_FIELDS, "every TrainConfig field needs a kind"
