"""`nfnet-fit` runs of the speed recipe on the Keras JAX backend, from NumPy arrays: for machines without TensorFlow.

`nfnet-fit` feeds its model through a `tf.data` pipeline, so it needs TensorFlow even on the JAX
backend. A machine with a GPU and JAX but no TensorFlow (such as the lent H200, whose image has JAX
with CUDA and no TensorFlow; `benchmarks/gpu_check.sh jax`) can still train the same network with
the same optimizer, schedule, loss, EMA and validation split: this runner takes `nfnet-fit`'s flags
(`fit.parse_config`), builds and compiles the run's model as `nfnet-fit` does
(`network.build_for`, `network.compile_model`, `network.adapt_to`, `network.recipe_callbacks`),
and trains it with `model.fit` on a `keras.utils.PyDataset` that draws the recipe's augmentation in
NumPy. It then tests the model plain and with the flip, 6-view and weighted 6-view test-time
augmentation (`inference.with_tta`), as `nfnet-fit` and `nfnet-evaluate` do.

The augmentation follows `data.make_epoch_dataset` in distribution, not draw for draw: per epoch a
fresh order; every image moved by its own `(dy, dx)` in `-2..2` with reflected borders; then
`translate_altflip` mirrors a random half of the images on even epochs and the other half on odd
ones, `translate_flip` each image with probability 1/2. Other `--augment` policies are refused.
The runs are not resumable (each is minutes on a GPU).

Two steps, because the data travels to such a machine in pieces:

    # where the package's data loader runs: the run's splits as uint8 shards of at most --shard-mb
    python -m benchmarks.speed_jax prepare --out DIR [--shard-mb 60] [-- nfnet-fit flags]
    # on the JAX machine: DIR's shards (or several folders holding them), seeds in turn
    python -m benchmarks.speed_jax run --data DIR[,DIR...] --seeds 0,1,2 [--tag T] [--stop-at UNIX_TIME]
        [--compile-cache DIR] [--row NAME] [-- nfnet-fit flags]
    # one epoch on random images: the stack (Keras, JAX, the device) works
    python -m benchmarks.speed_jax smoke [-- nfnet-fit flags]

`run` writes `speed_jax_<tag>.json` (each seed's test accuracies, validation accuracy per epoch and
seconds per epoch, and their mean and standard deviation) after every seed, so a run stopped
early keeps the seeds it finished, and a rerun skips them; `--stop-at` starts no seed after that time.
"""

import argparse
import glob
import json
import math
import os
import platform
import statistics
import sys
import time

from benchmarks.speed_flags import AIRBENCH94_NET, BATCH256, BATCH512, LOOKAHEAD, WIDE, WIDER

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SPLITS = ("train", "val", "test")
# The augmentation policies drawn here (`data.make_epoch_dataset` has the rest).
POLICIES = ("translate_altflip", "translate_flip", "none")
TEST_POLICIES = ("none", "flip", "flip_translate", "flip_translate_weighted")


# The rows of `bash benchmarks/gpu_check.sh jax` (`JAX_ROWS`, `run --row`): each the flags added to `--recipe speed`.
ROWS = {
    # the recipe on airbench94's widths (cifar_speed), where its parts were measured
    "recipe": AIRBENCH94_NET,
    # the recipe at batch 512 (twice the lrs) on airbench95's widths (cifar_speed_wide), and variants of it
    "wide": [*WIDE, *BATCH512],
    "wide_lookahead": [*WIDE, *BATCH512, *LOOKAHEAD],
    "wide_kpeak0.5": [*WIDE, *BATCH512, "--kernel-peak-pct", "0.5"],
    # wider again (cifar_speed_wider, 8.3 M weights): cifar_speed_wide gained 0.9 points over cifar_speed under the
    # same recipe at batch 512
    "wider": [*WIDER, *BATCH512],
    "wide_kwd0": [*WIDE, *BATCH512, "--kernel-weight-decay", "0"],
    # at batch 256: on the CPU the NF recipe gained 1.3 points at 5 epochs, 0.1-0.2 at 10 (docs/training.md)
    "recipe_b256": [*AIRBENCH94_NET, *BATCH256],
    "wide_b256": [*WIDE, *BATCH256],
    "wider_b256": [*WIDER, *BATCH256],
    # the recipe (batch 128) on the wider networks: wider_b128 is `--recipe speed` itself
    "wide_b128": WIDE,
    "wider_b128": WIDER,
    # the twin recipe's steps: airbench94's BatchNorms and no EMA, then dirac init, then the biases at 64 times the lr
    "twin_airbn": ["--recipe", "speed_twin", "--conv-init", "he_normal", "--bias-lr-mult", "1"],
    "twin_airbn_lookahead": ["--recipe", "speed_twin", "--conv-init", "he_normal", "--bias-lr-mult", "1", *LOOKAHEAD],
    "twin_airbn_dirac": ["--recipe", "speed_twin", "--bias-lr-mult", "1"],
    "twin_airbn_dirac_lookahead": ["--recipe", "speed_twin", "--bias-lr-mult", "1", *LOOKAHEAD],
    "twin_recipe": ["--recipe", "speed_twin"],
}


def fit_config(flags):
    """The `TrainConfig` that `nfnet-fit --recipe speed --no-export <flags>` would train (flags after it win)."""
    from nfnet_keras import fit

    config, _ = fit.parse_config(["--recipe", "speed", "--no-export", *flags])
    return config


# === prepare ===


def prepare(out, flags, shard_mb):
    """Writes the splits of `nfnet-fit --recipe speed <flags>` (`training.load_data`) as shards under `out`."""
    from nfnet_keras import training

    data = training.load_data(fit_config(flags))
    count = write_shards(out, dict(zip(SPLITS, (data.train, data.val, data.test))), data.class_names, shard_mb)
    print(f"wrote {count} shards to {out}/part1..part{count}")


def write_shards(out, splits, class_names, shard_mb):
    """Writes `splits` (`{split: (uint8 images, labels)}`) as `out/part<i>/shard.npz` of at most `shard_mb` MB.

    The images of train, validation and test are concatenated in that order and cut into compressed
    shards; `part1/splits.json` holds each split's size, the labels and the class names. Returns the
    number of shards.
    """
    import numpy as np

    images = np.concatenate([splits[name][0] for name in SPLITS])
    per_image = int(np.prod(images.shape[1:]))
    per_shard = max(1, int(shard_mb * 1e6 / 0.95) // per_image)  # zlib keeps ~92% of CIFAR's bytes
    starts = range(0, len(images), per_shard)
    for i, start in enumerate(starts, 1):
        part = os.path.join(out, f"part{i}")
        os.makedirs(part, exist_ok=True)
        np.savez_compressed(os.path.join(part, "shard.npz"), start=start, images=images[start:start + per_shard])
    meta = dict(sizes={name: len(splits[name][0]) for name in SPLITS},
                labels={name: np.asarray(splits[name][1]).tolist() for name in SPLITS},
                class_names=list(class_names), image_shape=list(images.shape[1:]))
    with open(os.path.join(out, "part1", "splits.json"), "w") as f:
        json.dump(meta, f)
    return len(starts)


def load_prepared(folders):
    """`({split: (uint8 images, int64 labels)}, meta)` from the shards under `folders` (searched recursively)."""
    import numpy as np

    shards, meta = [], None
    for folder in folders:
        for path in glob.glob(os.path.join(folder, "**", "shard.npz"), recursive=True):
            with np.load(path) as z:
                if int(z["start"]) not in [start for start, _ in shards]:  # a shard copied to two folders
                    shards.append((int(z["start"]), z["images"]))
        for path in glob.glob(os.path.join(folder, "**", "splits.json"), recursive=True):
            with open(path) as f:
                meta = json.load(f)
    if meta is None or not shards:
        sys.exit(f"speed_jax: no shards (shard.npz and splits.json) under {', '.join(folders)}; "
                 "write them with `python -m benchmarks.speed_jax prepare --out DIR`.")
    shards.sort(key=lambda shard: shard[0])
    images = np.concatenate([s for _, s in shards])
    total = sum(meta["sizes"].values())
    if len(images) != total or [start for start, _ in shards] != [sum(len(s) for _, s in shards[:i])
                                                                     for i in range(len(shards))]:
        sys.exit(f"speed_jax: the shards hold {len(images)} images, splits.json {total}: a shard is missing; "
                 "copy every part<i> folder of `prepare`'s output.")
    splits, start = {}, 0
    for name in SPLITS:
        size = meta["sizes"][name]
        splits[name] = (images[start:start + size], np.asarray(meta["labels"][name], np.int64))
        start += size
    return splits, meta


# === run ===


def translate(images, shifts, pad):
    """Each image moved by its own `(dy, dx)`, `|dy|, |dx| <= pad`, the uncovered border filled by reflection.

    `out[i, r, c] = images[i, r - dy, c - dx]` inside the image (as `data.translate_batch`).
    """
    import numpy as np

    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(images)
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            index = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            out[index] = padded[index, pad - dy:pad - dy + height, pad - dx:pad - dx + width]
    return out


def epoch_batches_class():
    import keras
    import numpy as np

    from nfnet_keras.contract import normalize

    class EpochBatches(keras.utils.PyDataset):
        """One epoch of the recipe's augmented, shuffled batches (the last one smaller).

        Epoch 0 is drawn when made; `set_epoch(e)` draws epoch `e`, and the callback `feed` calls it
        at each epoch's start with fit's epoch number (a `PyDataset`'s own epoch hooks also run when
        Keras peeks at a batch or resets an iterator, so they do not count epochs).
        """

        def __init__(self, images, labels, batch_size, policy, seed, num_classes, one_hot):
            super().__init__()
            if policy not in POLICIES:
                raise ValueError(f"--augment {policy} is not drawn by speed_jax; use one of {', '.join(POLICIES)}.")
            self.images, self.batch_size, self.policy, self.seed = images, batch_size, policy, seed
            self.labels = np.eye(num_classes, dtype="float32")[labels] if one_hot else labels
            self.pad = 0 if policy == "none" else max(1, round(2 * min(images.shape[1:3]) / 32))
            self.first_mirrored = np.random.default_rng([seed, 1]).random(len(images)) < 0.5
            self.epoch = 0
            self._draw()
            batches = self

            class Feed(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    batches.set_epoch(epoch)

            self.feed = Feed()

        def __len__(self):
            return math.ceil(len(self.images) / self.batch_size)

        def __getitem__(self, index):
            batch = slice(index * self.batch_size, (index + 1) * self.batch_size)
            return normalize(self.x[batch]), self.y[batch]

        def set_epoch(self, epoch):
            if epoch != self.epoch:
                self.epoch = epoch
                self._draw()

        def _draw(self):
            count = len(self.images)
            rng = np.random.default_rng([self.seed, 2, self.epoch])
            order = rng.permutation(count)
            x = self.images
            if self.pad:
                x = translate(x, rng.integers(-self.pad, self.pad + 1, size=(count, 2)), self.pad)
            if self.policy == "translate_altflip":
                mirror = self.first_mirrored != (self.epoch % 2 == 1)
            elif self.policy == "translate_flip":
                mirror = rng.random(count) < 0.5
            else:
                mirror = np.zeros(count, bool)
            x = np.where(mirror[:, None, None, None], x[:, :, ::-1], x)
            self.x, self.y = x[order], self.labels[order]

    return EpochBatches


def train_and_test(config, splits, num_classes):
    """One run: `nfnet-fit`'s model, optimizer and recipe callbacks trained by `model.fit` on `EpochBatches`."""
    import keras
    import numpy as np

    from nfnet_keras import network
    from nfnet_keras.callbacks import DivergenceMonitor, EpochTimer
    from nfnet_keras.contract import normalize
    from nfnet_keras.inference import keras_predictor, with_tta

    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (splits[name] for name in SPLITS)
    one_hot = bool(config.label_smoothing)
    model = network.build_for(config, num_classes, tuple(train_x.shape[1:]))
    network.compile_model(model, config, math.ceil(len(train_x) / config.batch_size))
    network.adapt_to(model, train_x, config.data_init)
    batches = epoch_batches_class()(train_x, train_y, config.batch_size, config.augment, config.seed, num_classes,
                                    one_hot)
    val_labels = np.eye(num_classes, dtype="float32")[val_y] if one_hot else val_y
    monitor, timer = DivergenceMonitor(), EpochTimer(total_epochs=config.epochs)
    start = time.perf_counter()
    callbacks = [batches.feed, monitor, timer, *network.recipe_callbacks(model, config, train_x)]
    history = model.fit(batches, validation_data=(normalize(val_x), val_labels), epochs=config.epochs,
                        callbacks=callbacks, verbose=2)
    fit_seconds = time.perf_counter() - start
    predict = keras_predictor(model, batch_size=1000)
    tests = {policy: float((with_tta(predict, policy)(test_x).argmax(1) == test_y).mean()) for policy in TEST_POLICIES}
    return dict(
        seed=config.seed, test_accuracy=tests["none"], test_accuracy_flip_tta=tests["flip"],
        test_accuracy_6view_tta=tests["flip_translate"], test_accuracy_weighted_tta=tests["flip_translate_weighted"],
        val_accuracy=[round(float(v), 4) for v in history.history.get("val_accuracy", [])],
        diverged_at=monitor.diverged_at, seconds_per_epoch=[round(s, 2) for s in timer.seconds_per_epoch],
        fit_seconds=round(fit_seconds, 1),
        train_images_per_second_after_first_epoch=round(
            len(train_x) * (len(timer.seconds_per_epoch) - 1) / sum(timer.seconds_per_epoch[1:]), 1)
        if len(timer.seconds_per_epoch) > 1 else None,
    )


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=round(statistics.fmean(values), 5), sd=round(statistics.stdev(values), 5) if len(values) > 1
                else None, n=len(values))


def machine():
    import jax
    import keras

    return dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                keras=keras.__version__, keras_backend=keras.backend.backend(), jax=jax.__version__,
                devices=[f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in jax.devices()])


def use_jax(cache_dir=None):
    """Selects the JAX backend (before Keras is imported) and, with `cache_dir`, JAX's persistent compilation
    cache: the runs after the first reuse its compiled steps."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        sys.exit("speed_jax: trains on the JAX backend; unset KERAS_BACKEND or set it to jax.")
    os.environ["KERAS_BACKEND"] = "jax"
    if cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(args, flags):
    use_jax(args.compile_cache)
    from benchmarks.common import write_json

    splits, meta = load_prepared(args.data)
    num_classes = len(meta["class_names"])
    name = "speed_jax" + (f"_{args.tag}" if args.tag else "")
    command = " ".join(["python -m nfnet_keras.fit --recipe speed --no-export", *flags, "--seed S"])
    payload = dict(benchmark="speed_jax", command=command, flags=flags, machine=machine(), runs=[])
    path = os.path.join(args.out_dir, f"{name}.json")
    if os.path.isfile(path):  # rerun: the seeds it holds are done
        with open(path) as f:
            previous = json.load(f)
        if previous.get("flags") != flags:
            sys.exit(f"speed_jax: {path} holds runs of other flags ({' '.join(previous.get('flags', []))}); "
                     "give another --tag or --out-dir.")
        payload["runs"] = previous["runs"]
    for seed in args.seeds:
        if seed in [r["seed"] for r in payload["runs"]]:
            continue
        if args.stop_at and time.time() > args.stop_at:
            print(f"speed_jax: --stop-at passed; seed {seed} not started.", flush=True)
            continue
        config = fit_config([*flags, "--seed", str(seed)])
        payload["precision"], payload["epochs"] = config.precision, config.epochs
        result = train_and_test(config, splits, num_classes)
        payload["runs"].append(result)
        for key in ("test_accuracy", "test_accuracy_flip_tta", "test_accuracy_6view_tta", "test_accuracy_weighted_tta"):
            payload[key] = mean_sd([r[key] for r in payload["runs"]])
        write_json(name, payload, args.out_dir)
        print(f"seed {seed}: test {result['test_accuracy']:.4f}, flip {result['test_accuracy_flip_tta']:.4f}, "
              f"6-view {result['test_accuracy_6view_tta']:.4f}, weighted {result['test_accuracy_weighted_tta']:.4f}; "
              f"{result['fit_seconds']} s ({path})", flush=True)


def smoke(args, flags):
    """One epoch of the run's network on 600 random images: the stack works on this machine."""
    use_jax(args.compile_cache)
    import numpy as np

    rng = np.random.default_rng(0)
    splits = {name: (rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size))
              for name, size in zip(SPLITS, (512, 44, 44))}
    start = time.perf_counter()
    result = train_and_test(fit_config([*flags, "--epochs", "1"]), splits, 10)
    print(f"speed_jax smoke: {json.dumps(machine())}; one epoch and the test in {time.perf_counter() - start:.1f} s; "
          f"test accuracy {result['test_accuracy']:.3f} on random labels")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="write the run's splits as shards (needs the package's data loader)")
    p.add_argument("--out", required=True, help="the folder of the shards (part1, part2, ...)")
    p.add_argument("--shard-mb", type=float, default=60.0, help="largest shard, in MB (default: 60)")
    r = sub.add_parser("run", help="train and test on the JAX backend from the shards")
    r.add_argument("--data", required=True, type=lambda text: [t for t in text.split(",") if t],
                   help="comma-separated folders holding the shards")
    r.add_argument("--seeds", default=[0], type=lambda text: [int(t) for t in text.split(",") if t],
                   help="comma-separated seeds (default: 0)")
    r.add_argument("--tag", help="suffix of the summary's name")
    r.add_argument("--stop-at", type=float, help="unix time after which no further seed starts")
    r.add_argument("--row", choices=list(ROWS), help="train a row of ROWS: its flags come before those after --")
    r.add_argument("--out-dir", default=RESULTS_DIR, help="where speed_jax_<tag>.json goes")
    s = sub.add_parser("smoke", help="one epoch on random images: the stack works here")
    for p in (r, s):
        p.add_argument("--compile-cache", help="a folder for JAX's persistent compilation cache")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out, flags, args.shard_mb)
    elif args.step == "smoke":
        smoke(args, flags)
    else:
        run(args, [*(ROWS[args.row] if args.row else []), *flags])


if __name__ == "__main__":
    main()
