"""Input pipeline: the augmentation pipelines alone, and training fed by them vs from memory.

1. *Pipeline alone*: images/s of `nfnet_keras.data.make_dataset(x, y, batch,
   training=True, augment=A, repeat=True)` for each `--augments` policy (the
   report's `noise_rotate_flip` policy and the `standard` crop + flip), pulled as fast as
   possible, policies interleaved. Each window first pulls `--lead-in` untimed
   batches (they drain what the prefetch buffer stored while another policy was
   measured), then times `--pipeline-batches` batches.
2. *Training fed by the real pipeline vs from memory*: one compiled NF model
   (no XLA, as `fit` on CPU), its train function fed either by the real
   pipeline (`--train-augment`, default `noise_rotate_flip`) or by one pre-materialised
   batch of that pipeline repeated from memory, windows interleaved (real,
   memory, memory, real, ...), each after `--lead-in` untimed steps.

Reported: images/s min / median of each, the real/memory ratio (median and min
of the per-round ratios; target >= 0.95), and how many cores the
pipeline needs to keep up with training (training img/s x the pipeline's
CPU-seconds per image). Every rate is also given per CPU-second of this
process (robust to other load on a shared machine).

CIFAR-10 comes from `--data-dir` / `$NFNET_DATA_DIR` (the 45,000-image
training split); `--synthetic N` uses N random uint8 images instead.

Usage:
    python -m benchmarks.pipeline [--preset report_resnet] [--batch-sizes 64] [--repeats 3]
        [--steps 10] [--pipeline-batches 40] [--augments noise_rotate_flip,standard] [--smoke]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bn_baseline import build_variant  # noqa: E402
from nfnet_keras import data as data_lib  # noqa: E402
from nfnet_keras.contract import IMAGE_SHAPE  # noqa: E402

TARGET_RATIO = 0.95
DEFAULTS = dict(preset="report_resnet", batch_sizes=[64], repeats=3, steps=10, warmup=1, pipeline_batches=40,
                lead_in=4, augments=["noise_rotate_flip", "standard"], train_augment="noise_rotate_flip", synthetic=0)
SMOKE = dict(preset="tiny", batch_sizes=[16], repeats=2, steps=2, warmup=0, pipeline_batches=3,
             lead_in=1, augments=["noise_rotate_flip", "standard"], train_augment="noise_rotate_flip", synthetic=256)


def load_images(args):
    """The training split (uint8 NHWC, int64 labels) and a description of its source."""
    if args.synthetic:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.synthetic,) + IMAGE_SHAPE, dtype=np.uint8)
        return (x, rng.integers(0, 10, args.synthetic).astype(np.int64)), f"{args.synthetic} random uint8 images"
    (x, y), _ = data_lib.load_cifar10(args.data_dir)
    train, _ = data_lib.split(x, y)
    return train, f"CIFAR-10 training split ({len(train[0])} images)"


def _pipeline(train, batch_size, augment, seed=0):
    return data_lib.make_dataset(*train, batch_size, training=True, augment=augment, seed=seed, repeat=True)


def pipeline_alone(train, batch_size, augments, repeats, batches, lead_in):
    """Interleaved images/s of each augmentation pipeline, pulled as fast as possible."""
    iterators, first_batch_s = {}, {}
    for augment in augments:
        with common.Stopwatch() as sw:
            iterator = iter(_pipeline(train, batch_size, augment))
            next(iterator)  # fills the shuffle buffer, builds the graph
        iterators[augment], first_batch_s[augment] = iterator, round(sw.seconds, 2)

    def measure(iterator):
        for _ in range(lead_in):
            next(iterator)
        with common.Stopwatch() as sw:
            for _ in range(batches):
                next(iterator)
        return sw.sample(batches * batch_size)

    samples = common.interleave({a: (lambda it=it: measure(it)) for a, it in iterators.items()}, repeats)
    return {a: dict(images_per_s=common.summarize(common.rates(samples[a]), 1),
                    images_per_cpu_s=common.summarize(common.rates(samples[a], "cpu_rate"), 1),
                    cores_used=common.summarize(common.rates(samples[a], "cores"), 2),
                    first_batch_s=first_batch_s[a]) for a in augments}


def training_fed(train, preset, batch_size, augment, repeats, steps, warmup, lead_in):
    """Interleaved training images/s: fed by the real pipeline vs one batch repeated from memory."""
    real = iter(_pipeline(train, batch_size, augment))
    x, y = next(iter(_pipeline(train, batch_size, augment, seed=1)))
    memory = iter(common.repeated_batch_dataset(x.numpy(), y.numpy()))
    keras.utils.set_random_seed(0)
    model = common.compile_for_benchmark(build_variant("nf", preset), jit_compile=False)
    steppers = {"pipeline": common.TrainStepper(model, real, batch_size),
                "memory": common.TrainStepper(model, memory, batch_size)}
    steppers["pipeline"].warm_up(warmup)  # traces the (shared) train function
    steppers["memory"].warm_up(warmup)

    def measure(stepper):
        if lead_in:
            stepper.run(lead_in)
        return stepper.measure(steps)

    samples = common.interleave({k: (lambda s=s: measure(s)) for k, s in steppers.items()}, repeats)
    real, mem = samples["pipeline"], samples["memory"]
    result = {
        "batch_size": batch_size,
        "augment": augment,
        "first_step_s": round(steppers["pipeline"].first_step_seconds, 2),
        "images_per_s": {k: common.summarize(common.rates(v), 2) for k, v in samples.items()},
        "images_per_cpu_s": {k: common.summarize(common.rates(v, "cpu_rate"), 2) for k, v in samples.items()},
        "cores_used": {k: common.summarize(common.rates(v, "cores"), 2) for k, v in samples.items()},
        "ratio": common.paired_ratios(common.rates(real), common.rates(mem)),
        "ratio_per_cpu_s": common.paired_ratios(common.rates(real, "cpu_rate"), common.rates(mem, "cpu_rate")),
    }
    common.release(model)
    return result


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--augments", type=common.str_list, help="policies measured alone (default seed,standard)")
    parser.add_argument("--train-augment", help="policy of the pipeline that feeds training (default seed)")
    parser.add_argument("--pipeline-batches", type=int, help="batches per timed pipeline-alone window")
    parser.add_argument("--lead-in", type=int, help="untimed batches/steps at the start of every window")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default $NFNET_DATA_DIR)")
    parser.add_argument("--synthetic", type=int, help="use N random images instead of CIFAR-10")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    for augment in args.augments + [args.train_augment]:
        if augment not in data_lib.AUGMENTATIONS:
            raise SystemExit(f"Unknown augmentation {augment!r}; use any of {', '.join(data_lib.AUGMENTATIONS)}.")

    with common.benchmark_run("pipeline", args) as payload:
        train, source = load_images(args)
        alone, fed = [], []
        for batch_size in args.batch_sizes:
            common.log(args, f"batch {batch_size}: pipelines alone ({', '.join(args.augments)}) ...")
            res = pipeline_alone(train, batch_size, args.augments, args.repeats, args.pipeline_batches, args.lead_in)
            alone.append(dict(batch_size=batch_size, pipelines=res))
            common.log(args, f"batch {batch_size}: training fed by the {args.train_augment} pipeline vs memory ...")
            r = training_fed(train, args.preset, batch_size, args.train_augment, args.repeats, args.steps,
                             args.warmup, args.lead_in)
            if args.train_augment in res:  # CPU-seconds per image of the pipeline x training images/s
                r["pipeline_cores_needed"] = round(
                    r["images_per_s"]["memory"]["median"] / res[args.train_augment]["images_per_cpu_s"]["median"], 4)
            r["target_met"] = r["ratio"]["median"] >= TARGET_RATIO
            fed.append(r)
        payload.update(preset=args.preset, data=source, target={"pipeline_over_memory": TARGET_RATIO},
                       pipeline_alone=alone, training=fed, target_met=all(r["target_met"] for r in fed))

    print(f"Input pipeline alone ({source}), images/s over {args.repeats} interleaved windows of "
          f"{args.pipeline_batches} batches:")
    print(common.format_table([
        dict(batch=a["batch_size"], augment=aug, ips_min=p["images_per_s"]["min"], ips_med=p["images_per_s"]["median"],
             cpu=p["images_per_cpu_s"]["median"], cores=p["cores_used"]["median"], first=p["first_batch_s"])
        for a in alone for aug, p in a["pipelines"].items()
    ], [("batch", "batch"), ("augment", "augment"), ("ips_min", "img/s min"), ("ips_med", "img/s median"),
        ("cpu", "img per CPU-s median"), ("cores", "cores used"), ("first", "1st batch s (shuffle fill)")]))
    print(f"\nTraining throughput of {args.preset!r} (no XLA), real pipeline vs one batch repeated from memory, "
          f"{args.repeats} interleaved windows of {args.steps} steps:")
    print(common.format_table([
        dict(batch=r["batch_size"], augment=r["augment"],
             real_min=r["images_per_s"]["pipeline"]["min"], real_med=r["images_per_s"]["pipeline"]["median"],
             mem_min=r["images_per_s"]["memory"]["min"], mem_med=r["images_per_s"]["memory"]["median"],
             ratio=r["ratio"]["median"], ratio_min=r["ratio"]["min"], ratio_cpu=r["ratio_per_cpu_s"]["median"],
             share=r.get("pipeline_cores_needed"),
             met=r["target_met"])
        for r in fed
    ], [("batch", "batch"), ("augment", "pipeline"), ("real_min", "real min"), ("real_med", "real median"),
        ("mem_min", "memory min"), ("mem_med", "memory median"), ("ratio", "real/memory median"),
        ("ratio_min", "min"), ("ratio_cpu", "real/memory per CPU-s"),
        ("share", "cores the pipeline needs at this rate"), ("met", f">= {TARGET_RATIO}")]))
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
