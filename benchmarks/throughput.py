"""Training throughput: the NF model against its BatchNorm twin, with and without XLA.

For each XLA setting, builds `build_model(preset)` (NF) and
`build_bn_model(preset)` (BN, see `benchmarks/bn_baseline.py`), compiles both
with the same optimizer (SGD, momentum 0.9) and loss, and feeds both the same
in-memory batch (one pre-materialised batch repeated, so no input pipeline is
measured), one compiled model per variant for every batch size. After the
first step (tracing, graph optimisation, XLA compile: reported as
`first_step_s`; XLA compiles again for each batch size) and `--warmup` steps,
windows of `--steps` train steps are timed, every (variant, batch size)
interleaved (NF@64, BN@64, NF@256, BN@256, then in reverse, ...), `--repeats`
windows each, after an untimed round of one step each (a model run right
after others were built runs slowly for a few steps).

Reported: images/s min / median / max of each, and the NF/BN ratio (median,
min and max of the per-round ratios). Target: NF >= 1.5x BN. Also
per CPU-second of this process (images / CPU time of all its threads) and the
cores each used: on a shared machine that ratio is the one other processes do
not move.

Usage:
    python -m benchmarks.throughput [--preset report_resnet] [--batch-sizes 64,256]
        [--xla off,on] [--variants nf,bn[,nf_no_bias,nf_plain_conv]] [--precision float32]
        [--repeats 3] [--steps 3] [--smoke]

The CIFAR speed network against its twin, as trained by `--recipe speed`:
    python -m benchmarks.throughput --preset cifar_speed --batch-sizes 512 --xla off \
        --precision mixed_bfloat16 --tag cifar_speed_bf16
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402

import keras  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bn_baseline import VARIANTS, build_variant  # noqa: E402

TARGET_RATIO = 1.5
DEFAULTS = dict(preset="report_resnet", batch_sizes=[64, 256], repeats=3, steps=3, warmup=0, xla=["off", "on"],
                variants=["nf", "bn"])
SMOKE = dict(preset="tiny", batch_sizes=[8], repeats=2, steps=2, warmup=0, xla=["off"], variants=["nf", "bn"])


def _xla_list(text):
    values = common.str_list(text)
    bad = [v for v in values if v not in ("off", "on")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--xla takes off and/or on, got {text!r}.")
    return values


def measure_variants(preset, batch_sizes, jit, repeats, steps, warmup, variants=("nf", "bn")):
    """Interleaved images/s of `variants` at every batch size, for one XLA setting.

    One compiled model per variant serves every batch size: the synthetic
    batches leave the batch dimension unknown, so the train function is traced
    once (XLA still compiles once per batch size).
    """
    models = {}
    for variant in variants:
        keras.utils.set_random_seed(0)
        models[variant] = common.compile_for_benchmark(build_variant(variant, preset), jit)
    steppers = {}  # in measuring order: NF@64, BN@64, NF@256, BN@256
    for batch_size in batch_sizes:
        x, y = common.synthetic_batch(batch_size)
        for variant in variants:
            iterator = iter(common.repeated_batch_dataset(x, y))
            stepper = common.TrainStepper(models[variant], iterator, batch_size)
            steppers[variant, batch_size] = stepper.warm_up(warmup)
    samples = common.interleave({k: (lambda s=s: s.measure(steps)) for k, s in steppers.items()}, repeats,
                                warmups={k: (lambda s=s: s.run(1)) for k, s in steppers.items()})
    results = []
    for batch_size in batch_sizes:
        per = {v: samples[v, batch_size] for v in variants}
        result = {
            "batch_size": batch_size,
            "xla": bool(jit),
            "first_step_s": {v: round(steppers[v, batch_size].first_step_seconds, 2) for v in variants},
            "images_per_s": {v: common.summarize(common.rates(per[v]), 2) for v in variants},
            "images_per_cpu_s": {v: common.summarize(common.rates(per[v], "cpu_rate"), 2) for v in variants},
            "cores_used": {v: common.summarize(common.rates(per[v], "cores"), 2) for v in variants},
        }
        if "bn" in variants:  # every other variant against the BN twin, per round
            bn = per["bn"]
            result["ratios_vs_bn"] = {
                v: {"per_wall_s": common.paired_ratios(common.rates(per[v]), common.rates(bn)),
                    "per_cpu_s": common.paired_ratios(common.rates(per[v], "cpu_rate"), common.rates(bn, "cpu_rate"))}
                for v in variants if v != "bn"}
            if "nf" in variants:
                result["ratio"] = result["ratios_vs_bn"]["nf"]["per_wall_s"]
                result["ratio_per_cpu_s"] = result["ratios_vs_bn"]["nf"]["per_cpu_s"]
        results.append(result)
    common.release(*models.values())
    return results


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--xla", type=_xla_list, help="off, on, or off,on (default)")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"),
                        help="Keras dtype policy of both models (default float32)")
    parser.add_argument("--variants", type=common.str_list,
                        help=f"models, from {', '.join(VARIANTS)} (default nf,bn; must include nf and bn)")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    if not {"nf", "bn"} <= set(args.variants) or set(args.variants) - set(VARIANTS):
        raise SystemExit(f"--variants must include nf and bn, from {', '.join(VARIANTS)}; got {args.variants}.")
    keras.mixed_precision.set_global_policy(args.precision)
    results = []
    with common.benchmark_run("throughput", args) as payload:
        for xla in args.xla:
            common.log(args, f"xla={xla}: building, compiling, measuring batch sizes {args.batch_sizes} ...")
            for r in measure_variants(args.preset, args.batch_sizes, xla == "on", args.repeats, args.steps,
                                      args.warmup, args.variants):
                r["target_met"] = r["ratio"]["median"] >= TARGET_RATIO
                results.append(r)
                common.log(args, f"  batch {r['batch_size']}: NF {r['images_per_s']['nf']['median']:.1f} img/s, "
                                 f"BN {r['images_per_s']['bn']['median']:.1f} img/s, "
                                 f"ratio {r['ratio']['median']:.3f}")
        payload.update(preset=args.preset, target={"nf_over_bn": TARGET_RATIO}, results=results,
                       target_met_everywhere=all(r["target_met"] for r in results))
    rows = [dict(
        xla="on" if r["xla"] else "off",
        batch=r["batch_size"],
        nf_min=r["images_per_s"]["nf"]["min"], nf_med=r["images_per_s"]["nf"]["median"],
        bn_min=r["images_per_s"]["bn"]["min"], bn_med=r["images_per_s"]["bn"]["median"],
        ratio=r["ratio"]["median"], ratio_min=r["ratio"]["min"], ratio_max=r["ratio"]["max"],
        ratio_cpu=r["ratio_per_cpu_s"]["median"],
        cores=f"{r['cores_used']['nf']['median']:.1f} / {r['cores_used']['bn']['median']:.1f}",
        first=f"{r['first_step_s']['nf']:.0f} / {r['first_step_s']['bn']:.0f}",
        met=r["target_met"],
    ) for r in results]
    print(f"Training throughput, preset {args.preset!r} ({args.precision}), images/s over {args.repeats} "
          f"interleaved windows of {args.steps} steps (synthetic in-memory batch, SGD momentum 0.9):")
    print(common.format_table(rows, [
        ("xla", "XLA"), ("batch", "batch"), ("nf_min", "NF min"), ("nf_med", "NF median"),
        ("bn_min", "BN min"), ("bn_med", "BN median"), ("ratio", "NF/BN median"),
        ("ratio_min", "NF/BN min"), ("ratio_max", "NF/BN max"), ("ratio_cpu", "NF/BN per CPU-s"),
        ("cores", "cores used NF / BN"), ("first", "1st step s NF / BN"),
        ("met", f">= {TARGET_RATIO}x")]))
    extra = [v for v in args.variants if v not in ("nf", "bn")]
    if extra:
        print("\nOther variants against BN (same rounds):")
        print(common.format_table([dict(
            variant=v, xla="on" if r["xla"] else "off", batch=r["batch_size"],
            med=r["images_per_s"][v]["median"], bn=r["images_per_s"]["bn"]["median"],
            ratio=r["ratios_vs_bn"][v]["per_wall_s"]["median"], ratio_min=r["ratios_vs_bn"][v]["per_wall_s"]["min"],
            ratio_cpu=r["ratios_vs_bn"][v]["per_cpu_s"]["median"])
            for v in extra for r in results], [
            ("variant", "variant"), ("xla", "XLA"), ("batch", "batch"), ("med", "img/s median"),
            ("bn", "BN median"), ("ratio", "/BN median"), ("ratio_min", "/BN min"), ("ratio_cpu", "/BN per CPU-s")]))
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
