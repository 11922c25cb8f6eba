"""Fraction of the machine's peak: the model's nominal training FLOP/s against a big matmul.

The nominal training FLOPs of one image are `training_flops_per_image(model)`
(6 x the multiply-adds of the convolutions and dense layers). A train step's
achieved FLOP/s is `images/s x FLOPs/image`; the machine's peak is the float32
FLOP/s of a 2048 x 2048 `tf.matmul` (2 n^3 FLOPs), measured in the same process,
interleaved with the model's windows (matmul, model, model, matmul, ...), so the
per-round fraction compares the two under the same load.

The same fraction is also given per CPU-second (FLOPs per CPU-second of the
process, model over matmul): on a shared machine the wall-clock fraction moves
with the share of the cores each window gets; the per-CPU-second one does not
(but counts threads that spin while waiting as busy).

Each *action* runs in a fresh subprocess (thread pools, `TF_ENABLE_ONEDNN_OPTS`
and the mixed-precision policy are fixed at TensorFlow's start-up):

- `baseline`: float32, default threads, no XLA. Measures the NF model at the
  first batch size (the reference row), the same net with plain `Conv2D` in
  place of `WSConv2D` (the cost of weight standardization), the same net with
  bias-free `WSConv2D`s (the cost of the conv biases), the BatchNorm twin
  (`benchmarks/bn_baseline.py`, same nominal FLOPs), the NF model at the other
  batch sizes and with XLA; then profiles a few steps of NF and BN with the TF
  profiler and reports the op types (and the parts of the NF model) the time
  goes to.
- `inter1` / `intra1`: `tf.config.threading` inter-op threads 1 (intra default)
  / intra-op threads 1 (inter default).
- `onednn_off`: `TF_ENABLE_ONEDNN_OPTS=0`.
- `bf16`: `keras.mixed_precision` policy `mixed_bfloat16` (also reports the
  bfloat16 matmul's FLOP/s, for reference; the fraction is against float32).
- `fpmath_bf16`: float32 model, `TF_SET_ONEDNN_FPMATH_MODE=BF16` (lets oneDNN
  compute float32 ops in bfloat16 where the CPU supports it).

Target: fraction >= 0.7 (prototypes: 0.4-0.5); checked on the
per-CPU-second fraction, which a shared machine does not bias.

Usage:
    python -m benchmarks.peak [--preset report_resnet] [--batch-sizes 64,256]
        [--actions baseline,inter1,intra1,onednn_off,bf16,fpmath_bf16] [--repeats 3] [--steps 3] [--smoke]
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # noqa: E402

TARGET_FRACTION = 0.7
ACTIONS = {
    "baseline": dict(env={}, threads={}, precision="float32"),
    "inter1": dict(env={}, threads={"inter": 1}, precision="float32"),
    "intra1": dict(env={}, threads={"intra": 1}, precision="float32"),
    "onednn_off": dict(env={"TF_ENABLE_ONEDNN_OPTS": "0"}, threads={}, precision="float32"),
    "bf16": dict(env={}, threads={}, precision="mixed_bfloat16"),
    "fpmath_bf16": dict(env={"TF_SET_ONEDNN_FPMATH_MODE": "BF16"}, threads={}, precision="float32"),
}
DEFAULTS = dict(preset="report_resnet", batch_sizes=[64, 256], repeats=3, steps=3, warmup=0,
                actions=list(ACTIONS), matmul_size=2048, matmul_iters=8, profile_steps=3, xla_row="on")
SMOKE = dict(preset="tiny", batch_sizes=[8], repeats=2, steps=2, warmup=0,
             actions=["baseline"], matmul_size=256, matmul_iters=2, profile_steps=1, xla_row="off")


# === In the worker process ===


def _setup_worker(spec):
    """Thread pools and precision: before TensorFlow runs anything."""
    import keras
    import tensorflow as tf

    threads = spec.get("threads", {})
    if "inter" in threads:
        tf.config.threading.set_inter_op_parallelism_threads(threads["inter"])
    if "intra" in threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads["intra"])
    keras.mixed_precision.set_global_policy(spec.get("precision", "float32"))


def _matmul_measure(size, iters, dtype):
    import tensorflow as tf

    a = tf.cast(tf.random.normal((size, size), dtype=tf.float32), dtype)
    matmul = tf.function(lambda m: tf.matmul(m, m))
    matmul(a).numpy()
    flops = 2 * size**3 * iters

    def measure():
        with common.Stopwatch() as sw:
            for _ in range(iters):
                out = matmul(a)
            out[0, 0].numpy()
        return sw.sample(flops)

    return measure


def _worker(spec):
    _setup_worker(spec)
    import keras

    from benchmarks.bn_baseline import build_variant
    from nfnet_keras.models.flops import training_flops_per_image

    steppers, flops_per_image, models = {}, {}, {}
    for row in spec["rows"]:
        key = row["variant"], row["xla"]  # one model serves every batch size (unknown batch dim)
        if key not in models:
            keras.utils.set_random_seed(0)
            models[key] = common.compile_for_benchmark(build_variant(row["variant"], spec["preset"]), row["xla"])
        model = models[key]
        flops_per_image[row["name"]] = training_flops_per_image(model)
        x, y = common.synthetic_batch(row["batch_size"])
        iterator = iter(common.repeated_batch_dataset(x, y))
        steppers[row["name"]] = common.TrainStepper(model, iterator, row["batch_size"]).warm_up(spec["warmup"])

    measures = {"matmul_float32": _matmul_measure(spec["matmul_size"], spec["matmul_iters"], "float32")}
    if spec["precision"] == "mixed_bfloat16":
        measures["matmul_bfloat16"] = _matmul_measure(spec["matmul_size"], spec["matmul_iters"], "bfloat16")
    warmups = dict(measures)
    for name, stepper in steppers.items():
        measures[name] = lambda s=stepper: s.measure(spec["steps"])
        warmups[name] = lambda s=stepper: s.run(1)
    samples = common.interleave(measures, spec["repeats"], warmups=warmups)

    peak = samples["matmul_float32"]
    result = {
        "action": spec["action"],
        "precision": spec["precision"],
        "threads": spec.get("threads", {}),
        "env": spec.get("env", {}),
        "machine": common.machine_info(),
        "matmul_gflops": {k[len("matmul_"):]: common.summarize(common.rates(samples[k], scale=1e-9), 1)
                          for k in samples if k.startswith("matmul_")},
        "matmul_gflops_per_cpu_s": {k[len("matmul_"):]: common.summarize(common.rates(samples[k], "cpu_rate", 1e-9), 1)
                                    for k in samples if k.startswith("matmul_")},
        "matmul_cores_used": common.summarize(common.rates(peak, "cores"), 2),
        "rows": [],
    }
    for row in spec["rows"]:
        name, flops = row["name"], flops_per_image[row["name"]]
        result["rows"].append(dict(
            row,
            training_flops_per_image=flops,
            first_step_s=round(steppers[name].first_step_seconds, 2),
            images_per_s=common.summarize(common.rates(samples[name]), 2),
            achieved_gflops=common.summarize(common.rates(samples[name], scale=flops * 1e-9), 1),
            cores_used=common.summarize(common.rates(samples[name], "cores"), 2),
            fraction_of_peak=common.paired_ratios(common.rates(samples[name], scale=flops), common.rates(peak)),
            fraction_of_peak_per_cpu_s=common.paired_ratios(common.rates(samples[name], "cpu_rate", flops),
                                                            common.rates(peak, "cpu_rate")),
        ))
    if spec.get("profile_steps"):
        result["profiles"] = []
        for name in spec["profile_rows"]:
            profile = profile_steps(steppers[name], spec["profile_steps"])
            result["profiles"].append(dict(row=name, **profile))
    common.report_worker_result(result)


# === Profiler ===


def profile_steps(stepper, steps):
    """Profiles `steps` train steps with the TF profiler; returns where the op time went."""
    import tensorflow as tf

    logdir = tempfile.mkdtemp(prefix="nfnet_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        seconds = stepper.run(steps)
        tf.profiler.experimental.stop()
        paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
        if not paths:
            return {"error": f"the profiler wrote no .xplane.pb under {logdir}"}
        breakdown = op_time_breakdown(paths[-1], steps, model_scopes(stepper.model))
        breakdown["wall_ms_per_step"] = round(1e3 * seconds / steps, 2)
        return breakdown
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


_VARIABLE_OPS = {"ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
                 "VarHandleOp", "ResourceApplyKerasMomentum", "ResourceApplyMomentum"}
_XLA_RUN = "CpuExecutable::ExecuteAsyncOnStream"  # the profiler's event for running an XLA:CPU executable
_UNIQUIFIED = re.compile(r"_\d+$")  # TF appends _1, _2, ... to a repeated scope name


def model_scopes(model):
    """The op scopes of a model's parts: part -> names of its layers (`stage1_block2/conv1b/...`).

    Read from the model itself: its convolutions (`nfnet_keras.models.model_convs`,
    which asks each NFBlock for its `conv_sublayers()`), its normalization
    layers, its activation layers and its blocks.
    """
    import keras

    from nfnet_keras.layers import NormActivation
    from nfnet_keras.layers.activations import ScaledActivation
    from nfnet_keras.models import model_convs, signal_blocks

    layers = list(model._flatten_layers(include_self=False))
    return {
        "conv": {conv.name for conv in model_convs(model)},
        "norm": {layer.name for layer in layers if isinstance(layer, keras.layers.BatchNormalization)},
        "act": {layer.name for layer in layers if isinstance(layer, (ScaledActivation, NormActivation))},
        "block": {block.name for block in signal_blocks(model)},
    }


def _in_scope(scopes, names):
    return any(s in names or _UNIQUIFIED.sub("", s) in names for s in scopes)


def _part(name, op_type, parts):
    """Which part of the model an op (`scope/.../name:Type`) belongs to; `parts` from `model_scopes`."""
    if op_type == "XLA-compiled function":
        return "XLA-compiled functions (the fused GELU)"
    scopes = name.split("/")
    if "Conv2D" in op_type or op_type in ("BiasAdd", "BiasAddGrad", "_MklNativeFusedMatMul", "_MklMatMul"):
        return "conv / dense kernels (fwd + bwd)"
    if "BatchNorm" in op_type or _in_scope(scopes, parts["norm"]):
        return "batch norm (fwd + bwd)"
    if op_type in _VARIABLE_OPS or any(s.startswith("SGD") for s in scopes):
        return "optimizer + variable reads/updates"
    if _in_scope(scopes, parts["conv"]):
        return "weight standardization (fwd + bwd)"
    if _in_scope(scopes, parts["act"]):
        return "activations, NF: x gamma (fwd + bwd)"
    if _in_scope(scopes, parts["block"]):
        return "block glue (1/beta, skip gain, residual add, pooling)"
    return "other (loss, head, control)"


def op_time_breakdown(xplane_path, steps, scopes, top=12):
    """Sums the durations of the TF ops in a profile, by op type and by model part.

    `scopes` is `model_scopes(model)` of the profiled model.

    Reads the host plane of a `tf.profiler` XSpace: an op event on a
    `tf_Compute` (inter-op) thread is named `scope/name:OpType` and lasts from
    the op's start to its end (its intra-op work on other threads included).
    Ops on different inter-op threads overlap, so shares are of the summed op
    time, not of the wall time.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    by_type = collections.defaultdict(lambda: [0, 0])
    by_part = collections.defaultdict(float)
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name == _XLA_RUN:  # an XLA-compiled function (e.g. the fused GELU) run inside the graph
                    op_name, op_type = "", "XLA-compiled function"
                elif ":" not in name or "::" in name:
                    continue
                else:
                    op_name, op_type = name.rsplit(":", 1)
                by_type[op_type][0] += event.duration_ps
                by_type[op_type][1] += 1
                by_part[_part(op_name, op_type, scopes)] += event.duration_ps
    total = sum(ps for ps, _ in by_type.values())
    if not total:
        return {"error": "no op events in the profile"}
    ranked = sorted(by_type.items(), key=lambda kv: -kv[1][0])
    return {
        "steps": steps,
        "op_ms_per_step": round(total / 1e9 / steps, 2),
        "ops_per_step": round(sum(n for _, n in by_type.values()) / steps),
        "top_op_types": [
            {"op_type": op, "ms_per_step": round(ps / 1e9 / steps, 2), "share": round(ps / total, 4),
             "calls_per_step": round(n / steps, 1)}
            for op, (ps, n) in ranked[:top]
        ],
        "by_part": [{"part": part, "ms_per_step": round(ps / 1e9 / steps, 2), "share": round(ps / total, 4)}
                    for part, ps in sorted(by_part.items(), key=lambda kv: -kv[1])],
    }


# === The orchestrating process ===


def _rows_for(action, args):
    first = args.batch_sizes[0]
    rows = [dict(name=f"nf@{first}", variant="nf", batch_size=first, xla=False)]
    if action == "baseline":
        rows.append(dict(name=f"nf_plain_conv@{first}", variant="nf_plain_conv", batch_size=first, xla=False))
        rows.append(dict(name=f"nf_no_bias@{first}", variant="nf_no_bias", batch_size=first, xla=False))
        rows.append(dict(name=f"bn@{first}", variant="bn", batch_size=first, xla=False))
        rows += [dict(name=f"nf@{b}", variant="nf", batch_size=b, xla=False) for b in args.batch_sizes[1:]]
        if args.xla_row == "on":
            rows.append(dict(name=f"nf_xla@{first}", variant="nf", batch_size=first, xla=True))
    return rows


def _spec(action, args):
    settings = ACTIONS[action]
    return dict(action=action, preset=args.preset, rows=_rows_for(action, args), repeats=args.repeats,
                steps=args.steps, warmup=args.warmup, matmul_size=args.matmul_size,
                matmul_iters=args.matmul_iters, precision=settings["precision"],
                threads=settings["threads"], env=settings["env"],
                profile_steps=args.profile_steps if action == "baseline" else 0,
                profile_rows=[f"nf@{args.batch_sizes[0]}", f"bn@{args.batch_sizes[0]}"])


def _shares_differ(res, row, tolerance=0.2):
    """Whether the model's windows and the matmul's got different shares of the cores."""
    return abs(row["cores_used"]["median"] - res["matmul_cores_used"]["median"]) > tolerance


def _table_rows(results):
    rows = []
    for res in results:
        for row in res["rows"]:
            rows.append(dict(
                action=res["action"],
                row=row["name"],
                ips=row["images_per_s"]["median"],
                gflops=row["achieved_gflops"]["median"],
                peak=res["matmul_gflops"]["float32"]["median"],
                frac_med=row["fraction_of_peak"]["median"],
                frac_min=row["fraction_of_peak"]["min"],
                frac_max=row["fraction_of_peak"]["max"],
                frac_cpu=row["fraction_of_peak_per_cpu_s"]["median"],
                cores=f"{row['cores_used']['median']:.1f} / {res['matmul_cores_used']['median']:.1f}"
                      + (" *" if _shares_differ(res, row) else ""),
                first=row["first_step_s"],
                met=row["fraction_of_peak_per_cpu_s"]["median"] >= TARGET_FRACTION,
            ))
    return rows


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--actions", type=common.str_list, help=f"any of {', '.join(ACTIONS)}")
    parser.add_argument("--matmul-size", type=int, help="n of the n x n float32 matmul (default 2048)")
    parser.add_argument("--matmul-iters", type=int, help="matmuls per timed window")
    parser.add_argument("--xla-row", choices=("on", "off"), help="measure the XLA row in baseline (default on)")
    parser.add_argument("--profile-steps", type=int, help="train steps under the TF profiler (0: none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    args = common.resolve_args(args, DEFAULTS, SMOKE)
    unknown = [a for a in args.actions if a not in ACTIONS]
    if unknown:
        raise SystemExit(f"Unknown action(s) {', '.join(unknown)}; use any of {', '.join(ACTIONS)}.")

    with common.benchmark_run("peak", args) as payload:
        results = []
        for action in args.actions:
            common.log(args, f"action {action}: running in a fresh process ...")
            res = common.run_worker("benchmarks.peak", _spec(action, args), env=ACTIONS[action]["env"])
            res.pop("machine", None)
            results.append(res)
            for row in res["rows"]:
                common.log(args, f"  {row['name']}: {row['images_per_s']['median']:.1f} img/s, "
                                 f"fraction {row['fraction_of_peak']['median']:.3f} of "
                                 f"{res['matmul_gflops']['float32']['median']:.0f} GFLOP/s")
        reference = results[0]["rows"][0] if results and results[0]["action"] == "baseline" else None
        payload.update(
            preset=args.preset,
            target={"fraction_of_peak": TARGET_FRACTION},
            machine_peak_gflops_float32=max(r["matmul_gflops"]["float32"]["max"] for r in results),
            matmul_gflops_per_cpu_s_float32=max(r["matmul_gflops_per_cpu_s"]["float32"]["max"] for r in results),
            results=results,
            reference=None if reference is None else {
                "row": reference["name"], "fraction_of_peak": reference["fraction_of_peak"],
                "fraction_of_peak_per_cpu_s": reference["fraction_of_peak_per_cpu_s"],
                "target_met": reference["fraction_of_peak_per_cpu_s"]["median"] >= TARGET_FRACTION},
            best=max(({"action": r["action"], "row": row["name"],
                       "fraction_per_cpu_s_median": row["fraction_of_peak_per_cpu_s"]["median"],
                       "fraction_median": row["fraction_of_peak"]["median"]}
                      for r in results for row in r["rows"]), key=lambda d: d["fraction_per_cpu_s_median"]),
        )
    print(f"Fraction of peak, preset {args.preset!r}: nominal training FLOP/s "
          f"(6 x MACs x images/s) / float32 {args.matmul_size}^2 matmul FLOP/s, same process, interleaved "
          f"({args.repeats} rounds, {args.steps} steps per window):")
    print(common.format_table(_table_rows(results), [
        ("action", "action"), ("row", "model@batch"), ("ips", "img/s median"), ("gflops", "GFLOP/s median"),
        ("peak", "matmul GFLOP/s"), ("frac_med", "fraction median"), ("frac_min", "min"), ("frac_max", "max"),
        ("frac_cpu", "fraction per CPU-s"), ("cores", "cores model / matmul"), ("first", "1st step s"),
        ("met", f">= {TARGET_FRACTION} (per CPU-s)")]))
    if any(_shares_differ(res, row) for res in results for row in res["rows"]):
        print("* the model's and the matmul's windows got different shares of the cores (other load): "
              "read the per-CPU-s fraction there.")
    for res in results:
        if "bfloat16" in res["matmul_gflops"]:
            print(f"bfloat16 matmul ({res['action']}): {res['matmul_gflops']['bfloat16']['median']:.0f} GFLOP/s "
                  f"median (float32 {res['matmul_gflops']['float32']['median']:.0f})")
        for prof in res.get("profiles", []):
            if "top_op_types" not in prof:
                print(f"\nProfile of {prof['row']}: {prof.get('error')}")
                continue
            print(f"\nProfile of {prof['row']} ({res['action']}): {prof['ops_per_step']} ops/step, "
                  f"{prof['op_ms_per_step']} ms op time/step, {prof['wall_ms_per_step']} ms wall/step")
            print(common.format_table(prof["top_op_types"], [
                ("op_type", "op type"), ("ms_per_step", "ms/step"), ("share", "share"),
                ("calls_per_step", "calls/step")]))
            print(common.format_table(prof["by_part"], [
                ("part", "part of the model"), ("ms_per_step", "ms/step"), ("share", "share")]))
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


if __name__ == "__main__":
    main()
