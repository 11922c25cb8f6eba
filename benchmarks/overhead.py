"""The trainer's overhead: the speed recipe through the package's trainer against a bare `model.fit`.

Both sides train the same network (`--preset`, default `cifar_speed`; the recipe's is
`cifar_speed_wider`) at batch 512 (`--batch-size`; the twin recipe's, 4 times the NF recipe's) in the
recipe's precision (`mixed_bfloat16`), without
XLA (what `fit` chooses on a CPU), on the same synthetic images (random uint8
pixels and labels: the speed of a step does not depend on them):

    trainer  what `nfnet-fit --recipe speed` runs for an epoch: the run's
             callbacks (checkpoints, CSV history, TensorBoard, signal
             propagation, divergence monitor, epoch timer, epoch feed, EMA
             swap), the recipe's optimizer (Muon on the conv kernels, Nesterov
             SGD on the rest, triangle schedule, decay, EMA of the weights, AGC),
             label smoothing and the accuracy
             metric, the `make_epoch_dataset` pipeline (translate_flip) and the
             validation of each epoch (the recipe's 1,000 images), through
             `training._train` into a fresh run folder;
    bare     `model.fit` of the same network for one epoch of the same images,
             already preprocessed and cached in memory as a `tf.data` dataset:
             plain SGD (momentum 0.9), sparse cross-entropy, no callbacks, no
             validation, no metrics.

A window is a one-epoch run of `--steps` batches; the two sides alternate
(trainer, bare, bare, trainer, ...) `--repeats` times after an untimed round.
Reported: seconds per window and per epoch (first step to the epoch's end), the
per-round trainer / bare ratio of the epochs (target: overhead <= 15%), and the
ratio projected to an epoch of the 10-epoch recipe (`project_recipe_epoch`:
ceil(49,000 / batch) steps at each side's step time, the trainer's per-epoch costs, a tenth of
each side's per-run set-up).

Then where the overhead goes:
    phases     the trainer's window split into set-up (before `fit` and
               before its first step), training steps, validation and epoch end;
    callbacks  wall time spent in each callback's hooks per window;
    step       the train step alone (one in-memory batch repeated, no pipeline):
               bare SGD, then the recipe's loss and metric, decay, EMA and AGC
               added one at a time (interleaved windows of `--profile-steps`);
    pipeline   `make_epoch_dataset` alone: batches/s and the cores it needs to
               feed the bare training rate.

Usage:
    python -m benchmarks.overhead [--steps 96] [--repeats 3] [--profile-steps 10] [--quick]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from nfnet_keras import contract, training  # noqa: E402
from nfnet_keras import data as data_lib  # noqa: E402
from nfnet_keras.config import RECIPES, TrainConfig  # noqa: E402
from nfnet_keras.optimization import make_loss, make_optimizer  # noqa: E402
from nfnet_keras.tensorboard.signal_plot import logged_epochs  # noqa: E402

TARGET_OVERHEAD = 0.15
# the speed recipe's training images: CIFAR-10's 50,000 less those it holds out for validation
RECIPE_TRAIN_IMAGES = 50_000 - RECIPES["speed"]["val_size"]


def recipe_epoch_steps(batch_size):
    """The steps of one epoch of the speed recipe's training images at `batch_size`."""
    return math.ceil(RECIPE_TRAIN_IMAGES / batch_size)


DEFAULTS = dict(preset="cifar_speed", batch_size=512, steps=recipe_epoch_steps(512), repeats=3,
                profile_steps=10, val_size=RECIPES["speed"]["val_size"])
SMOKE = dict(preset="tiny_speed", batch_size=16, steps=2, repeats=2, profile_steps=1, val_size=16)
# The train step's ingredients, added one at a time: (name, what it adds, TrainConfig changes from the bare step).
STEP_VARIANTS = (
    ("bare", "SGD momentum 0.9, sparse cross-entropy", None),
    ("loss_metric", "+ label smoothing (one-hot labels) and the accuracy metric", None),
    ("nesterov_decay", "+ the recipe's optimizer (Muon on the conv kernels, Nesterov SGD), triangle, decay",
     dict(agc=0.0, ema=0.0)),
    ("ema", "+ the EMA of the weights", dict(agc=0.0)),
    ("recipe", "+ AGC: the recipe's step", {}),
)
HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
         "on_train_batch_end", "on_batch_begin", "on_batch_end", "on_test_begin", "on_test_end",
         "on_test_batch_begin", "on_test_batch_end")


# === The two sides ===


def recipe_config(args):
    """The speed recipe for one epoch of `args.steps` batches, as `nfnet-fit --recipe speed` builds it."""
    recipe = {k: v for k, v in RECIPES["speed"].items() if k != "overrides"}
    recipe.update(preset=args.preset, batch_size=args.batch_size, epochs=1, val_size=args.val_size,
                  train_limit=args.steps * args.batch_size, recipe="speed")
    return TrainConfig(**recipe).validate()


def synthetic_split(count, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, count).astype(np.int64)


class PhaseClock(keras.callbacks.Callback):
    """Timestamps of a one-epoch `fit`: first step, validation start and end, epoch end."""

    def __init__(self, fit_start):
        super().__init__()
        self.marks = {"fit_start": fit_start}

    def on_train_batch_begin(self, batch, logs=None):
        self.marks.setdefault("first_step", time.perf_counter())

    def on_test_begin(self, logs=None):
        self.marks.setdefault("validation_start", time.perf_counter())

    def on_test_end(self, logs=None):
        self.marks["validation_end"] = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.marks["epoch_end"] = time.perf_counter()


class CallbackTimes:
    """Wall seconds spent in each callback hook, as `"Class.hook"` (re-entrant calls counted once)."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, callback):
        depth = [0]
        for hook in HOOKS:
            method = getattr(callback, hook, None)
            if method is None or getattr(method, "_is_default", False):
                continue  # Keras skips (or dispatches asynchronously around) hooks left at their default
            key = f"{type(callback).__name__}.{hook}"
            self.seconds.setdefault(key, 0.0)

            def timed(*a, _method=method, _key=key, **kw):
                depth[0] += 1
                start = time.perf_counter()
                try:
                    return _method(*a, **kw)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        self.seconds[_key] += time.perf_counter() - start

            setattr(callback, hook, timed)
        return callback


class Trainer:
    """`training._train` (what `nfnet-fit` runs around `fit`) for one epoch, into a fresh run folder per window."""

    def __init__(self, config, train, val, root):
        self.config, self.train, self.val, self.root = config, train, val, root
        self.model = training._build_compiled(config, tf.distribute.get_strategy(), train)
        self.windows = []  # per window: phases and callback seconds
        original_fit = self.model.fit

        def instrumented_fit(*args, callbacks=(), **kwargs):
            clock, times = PhaseClock(time.perf_counter()), CallbackTimes()
            callbacks = [times.wrap(cb) for cb in callbacks] + [clock]
            history = original_fit(*args, callbacks=callbacks, **kwargs)
            clock.marks["fit_end"] = time.perf_counter()
            self._current.update(marks=clock.marks, callbacks=times.seconds)
            return history

        self.model.fit = instrumented_fit

    def run(self):
        run_dir = tempfile.mkdtemp(prefix="trainer-", dir=self.root)
        self._current = {}
        with common.Stopwatch() as sw:
            data = training.Splits(self.train, self.val, self.val, contract.CLASS_NAMES, [])
            result, _, _ = training._train(self.config, run_dir, self.model, data, verbose=0)
        shutil.rmtree(run_dir, ignore_errors=True)
        if result.diverged:
            raise SystemExit(f"the trainer's loss diverged at {result.diverged_at}: the window is not a full epoch.")
        self.windows.append(dict(self._current, seconds=sw.seconds))
        return sw


class Bare:
    """`model.fit` of the same network on the same images, preprocessed and cached in memory; plain SGD."""

    def __init__(self, config, train):
        self.model = training.build_for(config)
        training.adapt_to(self.model, train[0])
        common.compile_for_benchmark(self.model, training.resolve_jit(config))
        images = data_lib.preprocess(train[0]).numpy()
        self.dataset = (tf.data.Dataset.from_tensor_slices((images, train[1])).batch(config.batch_size).cache()
                        .prefetch(tf.data.AUTOTUNE))

        self.windows = []

    def run(self):
        with common.Stopwatch() as sw:
            clock = PhaseClock(time.perf_counter())
            self.model.fit(self.dataset, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
            clock.marks["fit_end"] = time.perf_counter()
        self.windows.append(dict(marks=clock.marks, callbacks={}, seconds=sw.seconds))
        return sw


# === The profile ===


def phase_seconds(window):
    """Set-up, training steps, validation and epoch-end seconds of one trainer window."""
    m = window["marks"]
    steps_end = m.get("validation_start", m["epoch_end"])
    validation = m.get("validation_end", steps_end) - steps_end
    return {
        "before_fit": window["seconds"] - (m["fit_end"] - m["fit_start"]),
        "fit_until_first_step": m["first_step"] - m["fit_start"],
        "training_steps": steps_end - m["first_step"],
        "validation": validation,
        "epoch_end": m["epoch_end"] - steps_end - validation,
        "after_epoch": m["fit_end"] - m["epoch_end"],
    }


def step_profile(config, train, args):
    """Interleaved train-step rates (one in-memory batch, no pipeline) of `STEP_VARIANTS`."""
    x, y = data_lib.preprocess(train[0][: args.batch_size]).numpy(), train[1][: args.batch_size]
    steppers = {}
    for name, _, changes in STEP_VARIANTS:
        keras.utils.set_random_seed(0)
        model = training.build_for(config)
        training.adapt_to(model, train[0])
        if changes is None and name == "bare":
            common.compile_for_benchmark(model, training.resolve_jit(config))
            labels = y
        else:
            variant = dataclasses.replace(config, **(changes or {}))
            optimizer = (keras.optimizers.SGD(0.01, momentum=0.9) if changes is None
                         else make_optimizer(variant, math.ceil(len(train[0]) / config.batch_size)))
            model.compile(optimizer=optimizer, loss=make_loss(config), metrics=["accuracy"],
                          jit_compile=training.resolve_jit(config))
            labels = keras.utils.to_categorical(y, 10)
        iterator = iter(common.repeated_batch_dataset(x, labels))
        steppers[name] = common.TrainStepper(model, iterator, args.batch_size).warm_up(0)
    samples = common.interleave({k: (lambda s=s: s.measure(args.profile_steps)) for k, s in steppers.items()},
                                args.repeats, warmups={k: (lambda s=s: s.run(1)) for k, s in steppers.items()})
    rows = []
    for name, adds, _ in STEP_VARIANTS:
        per = samples[name]
        rows.append(dict(variant=name, adds=adds,
                         ms_per_step=common.summarize([1000 * args.batch_size / s["rate"] for s in per], 2),
                         images_per_s=common.summarize(common.rates(per), 2),
                         images_per_cpu_s=common.summarize(common.rates(per, "cpu_rate"), 2)))
    common.release(*(s.model for s in steppers.values()))
    return rows


def pipeline_profile(config, train, val, batches):
    """`make_epoch_dataset` alone: wall and CPU seconds per batch over `batches` batches (after one)."""
    train_ds, _ = training.make_datasets(config, train, val)
    iterator = iter(train_ds)
    next(iterator)
    with common.Stopwatch() as sw:
        for _ in range(batches):
            next(iterator)
    return {"batches": batches, "seconds_per_batch": sw.seconds / batches,
            "cpu_seconds_per_batch": sw.cpu_seconds / batches}


# === Report ===


def median(values):
    return statistics.median(values) if values else 0.0


def epoch_seconds(window):
    """Seconds from the first step to the epoch's end (steps, validation, epoch-end callbacks): the per-epoch part."""
    m = window["marks"]
    return m["epoch_end"] - m["first_step"]


def project_recipe_epoch(args, trainer_windows, bare_windows):
    """The trainer / bare ratio of one epoch of a whole recipe run (96 steps, 10 epochs), from the windows.

    A window is a one-epoch run: its per-run costs (before the first step and
    after the epoch) count once per 10 epochs here, and the signal-propagation
    plot, drawn twice in a window (before and after the epoch), is drawn 5
    times in a 10-epoch run (`logged_epochs`).
    """
    phases = [phase_seconds(w) for w in trainer_windows]
    med = lambda key: median([p[key] for p in phases])
    signal = median([w["callbacks"].get("SignalPropagationLogger.on_epoch_begin", 0.0)
                     + w["callbacks"].get("SignalPropagationLogger.on_epoch_end", 0.0) for w in trainer_windows])
    signal_end = median([w["callbacks"].get("SignalPropagationLogger.on_epoch_end", 0.0) for w in trainer_windows])
    epochs = RECIPES["speed"]["epochs"]
    plots_per_epoch = (len(logged_epochs(epochs)) + 1) / epochs
    step_trainer = med("training_steps") / args.steps
    per_epoch = med("validation") + med("epoch_end") - signal_end + plots_per_epoch * signal / 2
    per_run = med("before_fit") + med("fit_until_first_step") + med("after_epoch") - (signal - signal_end)
    bare_phases = [phase_seconds(w) for w in bare_windows]
    step_bare = median([p["training_steps"] for p in bare_phases]) / args.steps
    bare_per_run = median([p["before_fit"] + p["fit_until_first_step"] + p["after_epoch"] for p in bare_phases])
    epoch_steps = recipe_epoch_steps(args.batch_size)
    trainer_epoch = epoch_steps * step_trainer + per_epoch + per_run / epochs
    bare_epoch = epoch_steps * step_bare + bare_per_run / epochs
    ratio = trainer_epoch / bare_epoch
    return dict(steps=epoch_steps, epochs=epochs, trainer_seconds_per_step=round(step_trainer, 4),
                trainer_seconds_per_epoch_end=round(per_epoch, 3), trainer_seconds_per_run=round(per_run, 3),
                bare_seconds_per_step=round(step_bare, 4), bare_seconds_per_run=round(bare_per_run, 3),
                trainer_seconds_per_epoch=round(trainer_epoch, 2), bare_seconds_per_epoch=round(bare_epoch, 2),
                ratio=round(ratio, 4), overhead=round(ratio - 1, 4), target_met=ratio - 1 <= TARGET_OVERHEAD)


def summarize_windows(args, trainer, bare, samples, pipeline, steps_rows):
    """The payload's results: window seconds, ratios, the projection to a recipe epoch, the breakdown."""
    n = args.repeats  # the warm-up round's windows are left out
    timed, timed_bare = trainer.windows[-n:], bare.windows[-n:]
    trainer_s, bare_s = [w["seconds"] for w in timed], [w["seconds"] for w in timed_bare]
    trainer_epoch, bare_epoch = [epoch_seconds(w) for w in timed], [epoch_seconds(w) for w in timed_bare]
    phases = {k: common.summarize([phase_seconds(w)[k] for w in timed]) for k in phase_seconds(timed[0])}
    bare_phases = {k: common.summarize([phase_seconds(w)[k] for w in timed_bare]) for k in phase_seconds(timed[0])}
    callbacks = {k: common.summarize([w["callbacks"][k] for w in timed]) for k in timed[0]["callbacks"]}
    ratio = common.paired_ratios(trainer_epoch, bare_epoch)
    bare_rate = args.batch_size * args.steps / median(bare_epoch)
    return dict(
        seconds_per_window={"trainer": common.summarize(trainer_s), "bare": common.summarize(bare_s)},
        cpu_seconds_per_window={"trainer": common.summarize([s.cpu_seconds for s in samples["trainer"]]),
                                "bare": common.summarize([s.cpu_seconds for s in samples["bare"]])},
        seconds_per_epoch={"trainer": common.summarize(trainer_epoch), "bare": common.summarize(bare_epoch)},
        ratio=ratio, overhead=round(ratio["median"] - 1, 4), target_met=ratio["median"] - 1 <= TARGET_OVERHEAD,
        ratio_whole_window=common.paired_ratios(trainer_s, bare_s),
        projected_recipe_epoch=project_recipe_epoch(args, timed, timed_bare),
        phases=phases, bare_phases=bare_phases, callbacks=callbacks, step=steps_rows,
        pipeline=dict(pipeline, cores_to_feed_bare_rate=round(pipeline["cpu_seconds_per_batch"] * bare_rate
                                                              / args.batch_size, 3)),
    )


def print_report(args, payload):
    r = payload["results"]
    print(f"Trainer overhead, preset {args.preset!r}, batch {args.batch_size}, mixed_bfloat16, one epoch of "
          f"{args.steps} steps per window, {args.repeats} interleaved rounds (synthetic images):")
    rows = []
    for side in ("trainer", "bare"):
        epoch, window = r["seconds_per_epoch"][side], r["seconds_per_window"][side]
        rows.append(dict(side=side, min=epoch["min"], med=epoch["median"], max=epoch["max"], window=window["median"],
                         cpu=r["cpu_seconds_per_window"][side]["median"]))
    print(common.format_table(rows, [("side", "side"), ("min", "epoch s min"), ("med", "epoch s median"),
                                     ("max", "epoch s max"), ("window", "window s median"),
                                     ("cpu", "window CPU-s median")]))
    print(f"trainer / bare per epoch (first step to epoch end): median {r['ratio']['median']:.3f} (min "
          f"{r['ratio']['min']:.3f}, max {r['ratio']['max']:.3f}): overhead {100 * r['overhead']:.1f}% "
          f"({'meets' if r['target_met'] else 'misses'} <= {100 * TARGET_OVERHEAD:.0f}%); whole windows "
          f"{r['ratio_whole_window']['median']:.3f}")
    p = r["projected_recipe_epoch"]
    print(f"projected to an epoch of the {p['epochs']}-epoch recipe ({p['steps']} steps): {p['ratio']:.3f}, overhead "
          f"{100 * p['overhead']:.1f}% (trainer {p['trainer_seconds_per_step']:.3f} s/step + "
          f"{p['trainer_seconds_per_epoch_end']:.2f} s per epoch + {p['trainer_seconds_per_run']:.2f} s per run; "
          f"bare {p['bare_seconds_per_step']:.3f} s/step + {p['bare_seconds_per_run']:.2f} s per run)")
    print("\nWhere a window's time goes (medians, seconds):")
    print(common.format_table([dict(part=k, t=v["median"], b=r["bare_phases"][k]["median"])
                               for k, v in r["phases"].items()],
                              [("part", "phase"), ("t", "trainer"), ("b", "bare")]))
    print(common.format_table(
        [dict(cb=k, s=v["median"]) for k, v in sorted(r["callbacks"].items(), key=lambda kv: -kv[1]["median"])
         if v["median"] >= 0.001],
        [("cb", "callback hook"), ("s", "seconds per window")]))
    print(f"\nThe train step alone (one in-memory batch, {args.profile_steps} steps a window):")
    bare_ms = r["step"][0]["ms_per_step"]["median"]
    print(common.format_table([dict(v=row["variant"], adds=row["adds"], ms=row["ms_per_step"]["median"],
                                    rel=row["ms_per_step"]["median"] / bare_ms,
                                    cpu=row["images_per_cpu_s"]["median"]) for row in r["step"]],
                              [("v", "step"), ("adds", "adds"), ("ms", "ms/step median"), ("rel", "x bare"),
                               ("cpu", "img per CPU-s")]))
    pipe = r["pipeline"]
    print(f"\nmake_epoch_dataset alone: {pipe['seconds_per_batch'] * 1000:.1f} ms and "
          f"{pipe['cpu_seconds_per_batch'] * 1000:.1f} CPU-ms per batch; feeding the bare rate takes "
          f"{pipe['cores_to_feed_bare_rate']:.2f} cores.")
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--quick", dest="smoke", action="store_true", help="the same as --smoke")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 512)")
    parser.add_argument("--val-size", type=int, help="validation images per epoch (default: the recipe's 1000)")
    parser.add_argument("--profile-steps", type=int, help="steps per window of the train-step profile (default 10)")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    for flag in ("batch_size", "val_size", "profile_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")
    config = recipe_config(args)
    training.setup_runtime(config)
    train = synthetic_split(args.steps * args.batch_size, seed=1)
    val = synthetic_split(args.val_size, seed=2)
    root = tempfile.mkdtemp(prefix="nfnet-overhead-")
    try:
        with common.benchmark_run("overhead", args) as payload:
            common.log(args, f"building the trainer's and the bare model ({args.preset}) ...")
            trainer, bare = Trainer(config, train, val, root), Bare(config, train)
            common.log(args, f"{args.repeats} interleaved rounds of one {args.steps}-step epoch each ...")
            samples = common.interleave({"trainer": trainer.run, "bare": bare.run}, args.repeats)
            common.release(trainer.model, bare.model)
            common.log(args, "profiling the train step and the pipeline ...")
            steps_rows = step_profile(config, train, args)
            pipeline = pipeline_profile(config, train, val, min(args.steps - 1, 20) or 1)
            payload.update(command="python -m benchmarks.overhead " + " ".join(sys.argv[1:] if argv is None
                                                                                else argv),
                           preset=args.preset, precision=config.precision, target={"overhead": TARGET_OVERHEAD},
                           results=summarize_windows(args, trainer, bare, samples, pipeline, steps_rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_report(args, payload)
    return payload


if __name__ == "__main__":
    main()
