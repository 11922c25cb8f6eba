"""`TrainConfig`: every setting a training run depends on, and the named recipes.

A config is plain data: it is written to `<run>/config.json`, compared on
resume, and passed from the command line, a `--hparams` JSON file, a recipe or
Python. `validate()` checks the type and range of every field however it
arrived.
"""

import dataclasses
import math
import typing

SCHEDULES = ("step", "cosine", "onecycle", "triangle", "constant")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("none", "mirrored", "data_parallel")
# Augmentation policies (implemented in `nfnet_keras.data`): the report's
# per-image policy, pad-4 crop + flip, +-2 px reflect-padded translation + flip, the same translation
# with each image mirrored on alternate epochs (airbench94's), and none.
AUGMENTATIONS = ("noise_rotate_flip", "standard", "translate_flip", "translate_altflip", "none")
# What normalizes the network: nothing (Normalizer-Free), or BatchNorm where the NF
# network has its scaled activations (the BatchNorm twin, for comparisons).
NORMS = ("none", "batch")
# How the conv kernels start: He normal, or with their first C_in filters the identity (airbench94's
# Dirac init, `nfnet_keras.layers.initializers.PartialDirac`; not the stem).
CONV_INITS = ("he_normal", "dirac")
# Test-time augmentation of fit's final report and `evaluate --tta`: each policy's views and their weights
# (summing to 1), declared once; `nfnet_keras.inference` implements the views (`TTA_VIEWS`) and `with_tta`.
TTA_VIEW_NAMES = ("identity", "mirror", "translate(-1,-1)", "translate(+1,+1)", "mirror+translate(-1,-1)",
                  "mirror+translate(+1,+1)")
TTA_POLICY_WEIGHTS = {
    "none": (("identity", 1.0),),
    "flip": (("identity", 0.5), ("mirror", 0.5)),
    "flip_translate": tuple((view, 1 / 6) for view in TTA_VIEW_NAMES),
    # airbench94's weighting: 0.5 for the (image, mirror) pair, 0.25 for each pair moved by one pixel.
    "flip_translate_weighted": (
        ("identity", 0.25), ("mirror", 0.25),
        ("translate(-1,-1)", 0.125), ("translate(+1,+1)", 0.125),
        ("mirror+translate(-1,-1)", 0.125), ("mirror+translate(+1,+1)", 0.125),
    ),
}
# The policies that average log-probabilities (logit-equivalent) instead of probabilities.
TTA_LOG_AVERAGED = frozenset({"flip_translate_weighted"})
TTA_POLICIES = tuple(TTA_POLICY_WEIGHTS)
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
# The kinds of labelled image source (`nfnet_keras.sources`): CIFAR-10, a folder of class subfolders, a TFDS dataset.
DATASET_KINDS = ("folder", "tfds")

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
    # The CIFAR speed network at 192/512/512 (`cifar_speed_wider`: whitening stem, three conv-pool groups) for
    # 10 epochs at batch 128: Muon on the conv kernels (lr 0.12, momentum 0.6: airbench94_muon's momentum, half
    # its lr), Nesterov SGD (lr 0.2) on the rest, a triangular lr, label smoothing 0.2, an EMA of the weights for
    # evaluation, +-2 px translation and alternating flips, AGC, and six-view test-time augmentation. The weight
    # decay (5e-3) is 10x the fast recipe's: the weight-standardized kernels are scale-invariant, so
    # lr x decay sets their effective step. The network without normalization fits faster with more,
    # smaller steps: at batch 128 it ends 0.4 points above the same recipe at batch 512 (lrs doubled), and
    # 1.6 above it with SGD on the kernels and random flips; each widening of airbench94's widths (64/256/256)
    # added 0.6 and 0.4 points (docs/training.md#the-speed-recipe).
    "speed": dict(preset="cifar_speed_wider", epochs=10, batch_size=128, lr=0.2, momentum=0.9, nesterov=True,
                  schedule="triangle", weight_decay=5e-3, label_smoothing=0.2, agc=0.04, ema=0.98,
                  optimizer="muon", kernel_lr=0.12, kernel_momentum=0.6,
                  augment="translate_altflip", tta="flip_translate", val_size=1000, precision="mixed_bfloat16"),
}
# The speed recipe's BatchNorm twin with airbench94's BatchNorm settings (moving statistics at momentum 0.4 in
# Keras' convention, epsilon 1e-12, the scale frozen), no EMA (Keras averages no BatchNorm statistics) and dirac
# init (93.79% mean over 3 seeds in 10 epochs, 6-view TTA, on a GPU), and its biases at 64 times the lr, as
# airbench94's: 93.94 ± 0.17% over 3 seeds on a 2-core CPU, against airbench94's 94.01%. It trains at batch 512
# with lr 0.4 and the kernels' 0.24 (airbench94_muon's), on airbench94's network (`cifar_speed`), where it
# was measured.
RECIPES["speed_twin"] = dict(RECIPES["speed"], preset="cifar_speed", norm="batch", bn_momentum=0.4,
                             bn_epsilon=1e-12, gain_lr_mult=0.0, ema=0.0, conv_init="dirac", bias_lr_mult=64.0,
                             batch_size=512, lr=0.4, kernel_lr=0.24)


def option(default=None, help="", *, group, choices=None, metavar=None, commands=("fit", "grid"), hparam=None,
           shown=False, default_factory=None):
    """A `TrainConfig` field and everything said about it: its flag, its HParams column, its docs row.

    Args:
        default: the field's default (`default_factory` for a mutable one).
        help: str. The flag's help, and the docs table's text.
        group: str. The `--help` section and docs table group: "model",
            "optimisation", "data", "runtime" or "output".
        choices: tuple or None. The values a string field takes (its flag's
            choices, checked by `validate`, listed in HParams).
        metavar: str or None. The flag's value name in `--help`.
        commands: the commands with the flag (`"fit"`, `"grid"`); `()`: none.
        hparam: str or None. The HParams column's description; None: no column.
        shown: bool. Whether the HParams dashboard shows the column at first.
        default_factory: callable or None. Makes the default (e.g. `dict`).
    """
    metadata = dict(help=help, group=group, choices=choices, metavar=metavar, commands=tuple(commands),
                    hparam=hparam, shown=shown)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_MODEL, _OPT, _DATA, _RUNTIME, _OUTPUT = "model", "optimisation", "data", "runtime", "output"


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the report's final run.

    Each field is declared once, with `option`: its type and default here, its
    flag (`nfnet_keras.cli.add_config_flags`), its HParams column
    (`nfnet_keras.tensorboard.hparams.FIT_HPARAMS`) and its row of the flags
    table in docs/training.md (`nfnet_keras.cli.flags_markdown`) follow from it.
    """

    # === Model ===
    preset: str = option("report_resnet", "model preset: {presets}", group=_MODEL, hparam="model variant",
                         shown=True)
    overrides: dict = option(default_factory=dict, group=_MODEL, metavar="KEY=VALUE",
                             help="replace a preset key, e.g. --override 'widths=(96,192,384)'; repeatable",
                             hparam="preset keys changed (none: the preset as is)")
    norm: str = option("none", "none: Normalizer-Free; batch: the BatchNorm twin of the same network", group=_MODEL,
                       choices=NORMS, hparam="normalization: none (NF) or batch (the BatchNorm twin)", shown=True)
    bn_momentum: float | None = option(
        None, "with --norm batch: the momentum of BatchNorm's moving statistics, Keras' convention (stat = m * stat "
        "+ (1 - m) * batch; airbench94's torch momentum 0.6 is 0.4 here); default: Keras' 0.99", group=_MODEL,
        metavar="M", hparam="BatchNorm's moving-statistics momentum (unset: 0.99)")
    bn_epsilon: float | None = option(
        None, "with --norm batch: BatchNorm's epsilon; default: Keras' 1e-3", group=_MODEL, metavar="EPS",
        hparam="BatchNorm's epsilon (unset: 1e-3)")
    conv_init: str = option("he_normal", "he_normal; or dirac: every conv but the stem starts with its first C_in "
                            "filters the identity (airbench94's init)", group=_MODEL, choices=CONV_INITS,
                            hparam="conv kernel initialization")
    data_init: int = option(
        0, "set every WS conv's gain and bias so that each activation's input has mean 0 and variance 1 per channel "
        "on the first N training images, as after a BatchNorm at the start (the speed network without "
        "normalization; weight normalization's data-dependent init); 0: off", group=_MODEL, metavar="N",
        hparam="training images the gains and biases were initialised on (0: none)")
    whitening_bias_epochs: int | None = option(
        None, "train the whitening stem's bias for the first N epochs only, as airbench94 (3); default: every epoch",
        group=_MODEL, metavar="N", hparam="epochs the whitening stem's bias trains (unset: all)")
    init_from: str | None = option(
        None, "start from the weights of this .keras model of the same --preset/--override/--norm (a trained run's "
        "model.keras, nfnet-convert's output): the body's, and the classifier's if it has the data's classes (else "
        "a fresh one); its whitening stem is kept, not adapted. A resumed run restores its checkpoint instead",
        group=_MODEL, metavar="PATH", commands=("fit",), hparam="the .keras model the weights started from (unset: "
        "initialised)")
    freeze: str | None = option(
        None, "comma-separated stages not trained (weights, BatchNorm statistics): stem, stage1, ..., final (an "
        "NF-ResNet's final conv and activation); e.g. stem,stage1", group=_MODEL, metavar="STAGES", commands=("fit",),
        hparam="stages not trained (unset: none)")
    # === Optimisation ===
    epochs: int = option(200, "training epochs", group=_OPT, hparam="epochs of the run", shown=True)
    batch_size: int = option(64, "images per step", group=_OPT, commands=("fit",), hparam="images per step",
                             shown=True)
    lr: float = option(0.01, "peak learning rate", group=_OPT, commands=("fit",), hparam="peak learning rate",
                       shown=True)
    momentum: float = option(0.9, "SGD momentum", group=_OPT, hparam="SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum", group=_OPT, hparam="Nesterov momentum")
    schedule: str = option("step", "step: lr/10 at 25/50/75%% of the epochs; cosine; onecycle; triangle: 0.2x -> 1x "
                           "at 23%% -> 0.07x; constant", group=_OPT, choices=SCHEDULES,
                           hparam="learning-rate schedule")
    warmup_epochs: float = option(0.0, "linear warm-up of the cosine schedule, in epochs", group=_OPT,
                                  hparam="linear warm-up, in epochs")
    weight_decay: float = option(2e-4, "weight decay (not applied to gains, skip gains, biases)", group=_OPT,
                                 hparam="weight decay")
    weight_decay_mode: str = option(
        "decoupled", "decoupled: w -= lr*wd*w before the step (Keras); coupled: wd*w added to the gradient before "
        "momentum (L2, torch SGD)", group=_OPT, choices=WEIGHT_DECAY_MODES,
        hparam="decoupled, or coupled (L2 through momentum)")
    bias_lr_mult: float = option(1.0, "learning-rate multiplier of biases", group=_OPT, metavar="M",
                                 hparam="learning-rate multiplier of the biases")
    gain_lr_mult: float = option(1.0, "learning-rate multiplier of WS gains and skip gains (0 freezes them)",
                                 group=_OPT, metavar="M",
                                 hparam="learning-rate multiplier of the gains")
    head_lr_mult: float = option(1.0, "learning-rate multiplier of the classifier's kernel and bias", group=_OPT,
                                 metavar="M", hparam="learning-rate multiplier of the classifier")
    optimizer: str = option("sgd", "the conv kernels' optimizer: sgd (as the rest); renorm_sgd: Nesterov SGD whose "
                            "step turns each unit-norm filter by the lr (its radial part removed, normalized per "
                            "filter); muon: Muon on the filters. "
                            "The rest: SGD", group=_OPT, choices=OPTIMIZERS, hparam="the conv kernels' optimizer")
    kernel_lr: float | None = option(None, "peak lr of the conv kernels' optimizer under renorm_sgd/muon (default: "
                                     "--lr)", group=_OPT, metavar="LR",
                                     hparam="peak lr of the conv kernels' optimizer (unset: lr)")
    kernel_momentum: float | None = option(None, "momentum of the conv kernels' optimizer under renorm_sgd/muon "
                                           "(default: --momentum)", group=_OPT, metavar="M",
                                           hparam="momentum of the conv kernels' optimizer (unset: momentum)")
    kernel_peak_pct: float | None = option(None, "where the conv kernels' triangle lr peaks under renorm_sgd/muon, "
                                           "as a fraction of the steps (default: the schedule's 0.23)", group=_OPT,
                                           metavar="F", hparam="peak of the conv kernels' triangle lr, fraction of "
                                           "the steps (unset: 0.23)")
    kernel_weight_decay: float | None = option(None, "decoupled weight decay of the conv kernels under muon "
                                               "(default: --weight-decay; 0: none, as airbench94_muon)", group=_OPT,
                                               metavar="WD", hparam="weight decay of the conv kernels under muon "
                                               "(unset: weight decay)")
    muon_normalize: bool = option(False, "under muon: rescale each conv kernel to norm sqrt(filters) before its step, "
                                  "as airbench94_muon, so that the lr alone sets how far a step turns it (the "
                                  "kernels' decay then has no effect)", group=_OPT,
                                  hparam="Muon rescales each kernel before its step")
    muon_ns_steps: int = option(5, "Newton-Schulz iterations of Muon (airbench94_muon: 3)", group=_OPT, metavar="N",
                                hparam="Newton-Schulz iterations of Muon")
    lookahead: int = option(0, "Lookahead: sync slow weights every K steps; 0 disables it", group=_OPT, metavar="K",
                            hparam="Lookahead sync period in steps (0: off)")
    lookahead_alpha: float = option(0.5, "Lookahead: slow <- slow + A * (fast - slow) (schedule constant)",
                                    group=_OPT, metavar="A", hparam="Lookahead step of the slow weights")
    lookahead_schedule: str = option("constant", "constant: alpha; airbench: alpha = 1 - 0.95**K * (step/steps)**3, "
                                     "and the slow weights at the end", group=_OPT, choices=LOOKAHEAD_SCHEDULES,
                                     hparam="Lookahead schedule")
    label_smoothing: float = option(0.0, "label smoothing factor", group=_OPT, hparam="label smoothing")
    agc: float = option(0.0, "adaptive gradient clipping factor (e.g. 0.01); 0 disables it", group=_OPT,
                        metavar="LAMBDA", hparam="adaptive gradient clipping factor (0: off)")
    ema: float = option(0.0, "evaluate and keep an exponential moving average of the weights (e.g. 0.99); 0: off",
                        group=_OPT, metavar="MOMENTUM", hparam="momentum of the weights' moving average (0: off)")
    bn_recalibrate: int = option(0, "with --ema and --norm batch: recompute the BatchNorm statistics of the averaged "
                                 "weights from the first N training images before each evaluation; 0: off "
                                 "(the raw weights' statistics)", group=_OPT, metavar="N",
                                 hparam="training images the EMA weights' BatchNorm statistics are recomputed from "
                                 "(0: off)")
    augment: str = option("noise_rotate_flip", "noise_rotate_flip: the report's per-image policy; standard: pad-4 "
                          "crop + flip; translate_flip: +-2 px reflect-padded shift + flip; translate_altflip: the "
                          "same shift, each image mirrored on alternate epochs; none", group=_OPT,
                          choices=AUGMENTATIONS, hparam="augmentation policy")
    # === Data ===
    dataset: str = option("cifar10", "the images: cifar10; folder:PATH, one subfolder of images per class (train/ and "
                          "test/ inside if given, else a fixed fifth of each class is tested on); or tfds:NAME, a TFDS "
                          "image classification dataset prepared in --tfds-dir (docs/training.md#your-own-images)",
                          group=_DATA, metavar="SOURCE", commands=("fit",), hparam="the training images")
    image_size: int | None = option(None, "resize every image to N x N (default: the data's own size)", group=_DATA,
                                    metavar="N", commands=("fit",), hparam="image size (unset: the data's own)")
    data_dir: str | None = option(None, "folder with cifar-10-batches-py/ or cifar-10-python.tar.gz (default: "
                                  "$NFNET_DATA_DIR, then TFDS)", group=_DATA)
    tfds_dir: str | None = option(None, "TFDS data_dir: where --dataset tfds:NAME is read, and CIFAR-10 when no "
                                  "--data-dir or $NFNET_DATA_DIR is given (default: ~/tensorflow_datasets)",
                                  group=_DATA)
    train_limit: int | None = option(None, "train on the first N training images (default: all)", group=_DATA,
                                     metavar="N", hparam="training images used (unset: all)")
    val_size: int = option(5000, "validation images held out of the training images (of a dataset other than "
                           "CIFAR-10's 50,000: at most a tenth of them)", group=_DATA,
                           hparam="validation images held out of the training set")
    test_limit: int | None = option(None, "evaluate the trained model on the first N test images (default: all "
                                    "10,000; with --train-limit N: min(10000, max(1000, N)))", group=_DATA,
                                    metavar="N", commands=("fit",), hparam="test images of the final evaluation")
    # === Runtime ===
    jit: bool | None = option(None, "XLA-compile the train step (default: on with a GPU or under KERAS_BACKEND=jax, "
                              "off for TensorFlow on CPU where it is slower)", group=_RUNTIME)
    precision: str = option("float32", "float32, or mixed precision (mixed_bfloat16 on CPUs with native bf16, "
                            "mixed_float16 on GPUs)", group=_RUNTIME, choices=PRECISIONS, hparam="Keras dtype policy")
    seed: int = option(0, "random seed (weights, shuffling, augmentation)", group=_RUNTIME, hparam="random seed")
    deterministic: bool = option(False, "op determinism: bitwise-reproducible runs", group=_RUNTIME)
    checkpoint_every: int = option(0, "also checkpoint every N training steps inside an epoch (the newest two are "
                                   "kept); 0: only at epoch ends. SIGTERM and Ctrl-C checkpoint at the next step "
                                   "either way", group=_RUNTIME, metavar="N", commands=("fit",))
    strategy: str = option("none", "mirrored: tf.distribute.MirroredStrategy over all GPUs (2 logical CPUs without "
                           "one; TensorFlow backend); data_parallel: keras.distribution.DataParallel over all devices "
                           "(KERAS_BACKEND=jax; see docs/backends.md)", group=_RUNTIME, choices=STRATEGIES,
                           commands=("fit",))
    # === Output ===
    tta: str = option("flip", "the test-time augmentation reported at the end besides flip: none, flip, "
                      "flip_translate (6 views), or flip_translate_weighted (the same views weighted as airbench94's, "
                      "log-probabilities averaged)", group=_OUTPUT, choices=TTA_POLICIES, commands=("fit",),
                      hparam="test-time augmentation of the final report")
    recipe: str = option("report", "the recipe whose defaults the run started from (fit's --recipe)", group=_OUTPUT,
                         choices=tuple(RECIPES), commands=(), hparam="the recipe the run started from")

    def validate(self):
        """Checks every field. Returns `self`.

        Raises:
            ValueError: one line naming the flag, the bad value and what is allowed.
        """
        self._check_types()
        self._check_choices()
        from nfnet_keras.console import keras_backend
        from nfnet_keras.models.conv_groups.presets import ConvGroupsConfig
        from nfnet_keras.models.presets import resolve_config
        from nfnet_keras.models.stages import STEM, check_stages

        resolved = resolve_config(self.preset, self.overrides)
        frozen = [] if self.freeze is None else check_stages(self.freeze, resolved.stage_names, "--freeze")
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}."),
            (self.bn_momentum is None or 0 <= self.bn_momentum < 1,
             f"--bn-momentum must be in [0, 1), got {self.bn_momentum}."),
            (self.bn_epsilon is None or self.bn_epsilon > 0, f"--bn-epsilon must be > 0, got {self.bn_epsilon}."),
            (self.norm == "batch" or (self.bn_momentum, self.bn_epsilon) == (None, None),
             "--bn-momentum and --bn-epsilon set the BatchNorm twin's layers: add --norm batch, or drop them."),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}."),
            (self.lr > 0, f"--lr must be a positive number, got {self.lr}."),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}."),
            (0 <= self.warmup_epochs < self.epochs,
             f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs}."),
            (self.warmup_epochs == 0 or self.schedule == "cosine",
             f"--warmup-epochs is the cosine schedule's warm-up; --schedule {self.schedule} has none of it "
             "(use --schedule cosine, or drop --warmup-epochs)."),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}."),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}."),
            (self.agc >= 0, f"--agc must be >= 0 (0 disables it), got {self.agc}."),
            (0 <= self.ema < 1, f"--ema must be in [0, 1) (0 disables it), got {self.ema}."),
            (self.bn_recalibrate >= 0, f"--bn-recalibrate must be >= 0 (0 disables it), got {self.bn_recalibrate}."),
            (not self.bn_recalibrate or (self.ema and self.norm == "batch"),
             "--bn-recalibrate recomputes the BatchNorm statistics of the EMA weights: it needs --ema and --norm "
             f"batch, got --ema {self.ema:g} --norm {self.norm} (or drop --bn-recalibrate)."),
            (self.bias_lr_mult >= 0, f"--bias-lr-mult must be >= 0 (0 freezes the group), got {self.bias_lr_mult}."),
            (self.gain_lr_mult >= 0, f"--gain-lr-mult must be >= 0 (0 freezes the group), got {self.gain_lr_mult}."),
            (self.head_lr_mult >= 0, f"--head-lr-mult must be >= 0 (0 freezes the group), got {self.head_lr_mult}."),
            (self.lookahead >= 0,
             f"--lookahead must be >= 0 (steps between syncs; 0 disables it), got {self.lookahead}."),
            (0 < self.lookahead_alpha <= 1, f"--lookahead-alpha must be in (0, 1], got {self.lookahead_alpha}."),
            (self.kernel_lr is None or self.kernel_lr > 0,
             f"--kernel-lr must be a positive number, got {self.kernel_lr}."),
            (self.kernel_momentum is None or 0 <= self.kernel_momentum < 1,
             f"--kernel-momentum must be in [0, 1), got {self.kernel_momentum}."),
            (self.kernel_peak_pct is None or 0 < self.kernel_peak_pct < 1,
             f"--kernel-peak-pct must be in (0, 1), got {self.kernel_peak_pct}."),
            (self.kernel_peak_pct is None or (self.schedule == "triangle" and self.optimizer != "sgd"),
             f"--kernel-peak-pct moves the peak of the conv kernels' own triangle lr: it needs --schedule triangle "
             f"and --optimizer muon or renorm_sgd, got --schedule {self.schedule} --optimizer {self.optimizer} (or "
             f"drop --kernel-peak-pct)."),
            (self.kernel_weight_decay is None or self.kernel_weight_decay >= 0,
             f"--kernel-weight-decay must be >= 0 (0: none), got {self.kernel_weight_decay}."),
            (self.kernel_weight_decay is None or self.optimizer == "muon",
             f"--kernel-weight-decay is the decay of Muon's conv kernels: it needs --optimizer muon, got "
             f"--optimizer {self.optimizer} (--weight-decay covers the kernels under sgd; renorm_sgd keeps them at "
             f"unit norm)."),
            (self.muon_ns_steps >= 1, f"--muon-ns-steps must be >= 1, got {self.muon_ns_steps}."),
            (not self.muon_normalize or self.optimizer == "muon",
             f"--muon-normalize rescales the kernels Muon steps: it needs --optimizer muon, got --optimizer "
             f"{self.optimizer}."),
            (not (self.lookahead and self.strategy == "mirrored"),
             "--lookahead is not supported with --strategy mirrored; use --strategy none or data_parallel."),
            (self.val_size >= 1, f"--val-size must be >= 1, got {self.val_size}."),
            (not dataset_problem(self.dataset), f"--dataset {dataset_problem(self.dataset)}."),
            (self.image_size is None or self.image_size >= 8,
             f"--image-size must be >= 8 (pixels), got {self.image_size}."),
            (self.train_limit is None or self.train_limit >= 1,
             f"--train-limit must be >= 1, got {self.train_limit}."),
            (self.checkpoint_every >= 0,
             f"--checkpoint-every must be >= 0 (steps; 0: only at epoch ends), got {self.checkpoint_every}."),
            (self.test_limit is None or self.test_limit >= 1,
             f"--test-limit must be >= 1, got {self.test_limit}."),
            (self.data_init >= 0, f"--data-init must be >= 0 (training images; 0: off), got {self.data_init}."),
            (not self.data_init or (isinstance(resolved, ConvGroupsConfig) and self.norm == "none"),
             f"--data-init initializes the speed network without normalization (e.g. --preset cifar_speed --norm "
             f"none); got --preset {self.preset} --norm {self.norm}."),
            (not (self.data_init and self.init_from),
             "--data-init and --init-from both set the starting weights; give one of them."),
            (self.whitening_bias_epochs is None or self.whitening_bias_epochs >= 0,
             f"--whitening-bias-epochs must be >= 0 (unset: every epoch), got {self.whitening_bias_epochs}."),
            (self.whitening_bias_epochs is None or isinstance(resolved, ConvGroupsConfig),
             f"--whitening-bias-epochs needs a network with a whitening stem (e.g. --preset cifar_speed); "
             f"{self.preset} has none."),
            (self.whitening_bias_epochs is None or keras_backend() == "tensorflow",
             f"--whitening-bias-epochs needs KERAS_BACKEND=tensorflow (it freezes a layer during fit, done here "
             f"on TensorFlow only), got {keras_backend()}."),
            (self.whitening_bias_epochs is None or STEM not in frozen,
             "--freeze stem keeps the whitening stem's bias fixed from the start; drop --whitening-bias-epochs or "
             "stem from --freeze."),
            (self.init_from is None or self.init_from.endswith(".keras"),
             f"--init-from takes a .keras model file (a run's model.keras, nfnet-convert's output), got "
             f"{self.init_from!r}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def _check_choices(self):
        for field in dataclasses.fields(self):
            choices = field.metadata["choices"]
            value = getattr(self, field.name)
            if choices is not None and value not in choices and not (value is None and field.name in OPTIONAL_FIELDS):
                raise ValueError(f"{flag_name(field.name)} must be one of {', '.join(choices)}, got {value!r}.")

    def _check_types(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = field_type_problem(field.name, value)
            if problem:
                raise ValueError(f"{flag_name(field.name)} {problem}.")
            if FIELD_KINDS[field.name] is float and value is not None:
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
        """What makes two runs the same experiment (`identity_of`)."""
        return identity_of(self.to_dict())


def dataset_problem(value):
    """Why `value` is not a `--dataset` (cifar10, folder:PATH, tfds:NAME), as one line, or None."""
    kind, sep, rest = value.partition(":") if isinstance(value, str) else ("", "", "")
    if value == "cifar10" or (sep and kind in DATASET_KINDS and rest):
        return None
    return f"must be cifar10, folder:PATH or tfds:NAME, got {value!r}"


def default_test_limit(train_limit):
    """The test images of a run with `--train-limit N` and no `--test-limit`: min(10000, max(1000, N)).

    A quick run on a few thousand images is then not mostly its final
    evaluation (plain, flipped and with the TTA policy), while 1,000 images
    still measure its accuracy to about +-1.5 points.
    """
    return min(10000, max(1000, train_limit))


def identity_of(config_dict):
    """What makes two runs the same experiment: every field but the locations and the recipe's name.

    A recorded config that lacks a field counts with that field's default (`with_defaults`).
    """
    return {k: v for k, v in with_defaults(config_dict).items() if k not in LOCATION_FIELDS + ("recipe",)}


def with_defaults(recorded):
    """A recorded config dict with the fields it lacks at their defaults.

    A run or search recorded before a field existed ran with what is now that
    field's default, so it compares equal to a config that sets the default.
    """
    defaults = TrainConfig().to_dict()
    return {**{k: v for k, v in defaults.items() if k not in recorded}, **recorded}


def _kind(annotation):
    """(kind, optional) of a field's annotation: `int | None` -> (int, True)."""
    args = typing.get_args(annotation)
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return annotation, False


FIELDS = dataclasses.fields(TrainConfig)
CONFIG_FIELDS = frozenset(f.name for f in FIELDS)
# Each field's kind (int, float, bool, str, dict), and the fields that may be None (unset).
FIELD_KINDS = {f.name: _kind(f.type)[0] for f in FIELDS}
OPTIONAL_FIELDS = frozenset(f.name for f in FIELDS if _kind(f.type)[1])


def flag_name(field):
    """The flag of a `TrainConfig` field: `batch_size` -> `--batch-size` (`overrides` -> `--override`)."""
    return "--override" if field == "overrides" else "--" + field.replace("_", "-")


def field_type_problem(name, value):
    """Why `value` cannot be the `TrainConfig` field `name` (e.g. "must be a finite number, got 'fast' (str)"), or None.

    Args:
        name: str. A field of `TrainConfig`.
        value: the value, as it came from a flag, a JSON file or Python.

    Returns:
        str or None.
    """
    kind = FIELD_KINDS[name]
    if value is None and name in OPTIONAL_FIELDS:
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
