"""cifar_speed through Keras against airbench94's network in PyTorch eager, interleaved in one process.

The PyTorch side is airbench94's network and train step, written here from
its description (KellerJordan/airbench, `airbench94.py`):

- a 2x2 conv stem with 24 channels and a bias (its weight frozen: the
  whitening filters), GELU;
- three groups `conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU`
  of widths 64/256/256, the convs without bias; each BatchNorm keeps its
  running statistics with airbench's momentum 0.6 (PyTorch's `momentum` =
  1 - 0.6 = 0.4), eps 1e-12, its scale frozen at 1 and its bias trained;
- a 3x3 max-pool, a linear head without bias, logits times 1/9;
- cross-entropy with label smoothing 0.2, summed over the batch; one SGD step
  (Nesterov, momentum 0.85, weight decay; the BN biases at 64x the lr);
- channels-last tensors and bfloat16 autocast on the CPU (airbench runs in
  float16 on a GPU), the BatchNorms in float32 as airbench keeps them.

The Keras side is the package's `cifar_speed` in `mixed_bfloat16`, compiled
as the speed recipe's step without its AGC and EMA (Nesterov SGD, momentum
0.85, weight decay, label smoothing 0.2 on one-hot labels), trained through
`model.fit` on a batch repeated from memory; PyTorch gets the same batch as a
tensor. Both use batch 512 and the same random images. Windows of `--steps`
steps alternate (Keras, PyTorch, PyTorch, Keras, ...) `--repeats` times after an
untimed round. Reported: images/s of each (per wall second and per CPU-second
of the process), and Keras / PyTorch (target: >= 1.2). `--ablate` adds the
Keras network traced without each of the package's CPU fast paths
(`FAST_PATHS`) to the interleaved windows, to say what each one buys;
`--profile-steps N` then profiles N steps of each network (the TF profiler's
op time by op type, `torch.profiler`'s CPU time by op).

Usage:
    python -m benchmarks.airbench_torch [--steps 10] [--repeats 5] [--batch-size 512] [--ablate]
        [--profile-steps 5] [--quick]
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

TARGET_RATIO = 1.2
DEFAULTS = dict(preset="cifar_speed", widths=[64, 256, 256], batch_size=512, steps=10, repeats=5)
SMOKE = dict(preset="tiny_speed", widths=[8, 16, 16], batch_size=16, steps=2, repeats=2)
# airbench94's hyperparameters (per 1024 images; the step's cost does not depend on their values).
MOMENTUM, LR, WEIGHT_DECAY, BIAS_SCALER, LABEL_SMOOTHING = 0.85, 11.5, 0.0153, 64.0, 0.2
BN_MOMENTUM, BN_EPS, LOGIT_SCALE, WHITEN_WIDTH = 0.6, 1e-12, 1 / 9, 24


# === PyTorch ===


def airbench94_net(widths=(64, 256, 256)):
    """airbench94's network (PyTorch eager, channels-last), its stem's weight frozen."""
    import torch
    from torch import nn

    class BatchNorm(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels, eps=BN_EPS, momentum=1 - BN_MOMENTUM)
            self.weight.requires_grad = False

    def conv(c_in, c_out):
        layer = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        nn.init.dirac_(layer.weight.data[:c_in])
        return layer

    class ConvGroup(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1, self.pool, self.norm1 = conv(c_in, c_out), nn.MaxPool2d(2), BatchNorm(c_out)
            self.conv2, self.norm2, self.activ = conv(c_out, c_out), BatchNorm(c_out), nn.GELU()

        def forward(self, x):
            x = self.activ(self.norm1(self.pool(self.conv1(x))))
            return self.activ(self.norm2(self.conv2(x)))

    class Mul(nn.Module):
        def forward(self, x):
            return x * LOGIT_SCALE

    stem = nn.Conv2d(3, WHITEN_WIDTH, 2, padding=0, bias=True)
    stem.weight.requires_grad = False
    net = nn.Sequential(stem, nn.GELU(), ConvGroup(WHITEN_WIDTH, widths[0]), ConvGroup(widths[0], widths[1]),
                        ConvGroup(widths[1], widths[2]), nn.MaxPool2d(3), nn.Flatten(),
                        nn.Linear(widths[2], 10, bias=False), Mul())
    return net.to(memory_format=torch.channels_last).train()


def airbench94_optimizer(net, batch_size):
    """airbench94's SGD: Nesterov, lr and decay per 1024 images, the BN biases at `BIAS_SCALER` x the lr."""
    import torch

    kilostep_scale = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr = LR / kilostep_scale
    wd = WEIGHT_DECAY * batch_size / kilostep_scale
    norm_biases = [p for name, p in net.named_parameters() if "norm" in name and p.requires_grad]
    others = [p for name, p in net.named_parameters() if "norm" not in name and p.requires_grad]
    return torch.optim.SGD([dict(params=norm_biases, lr=lr * BIAS_SCALER, weight_decay=wd / (lr * BIAS_SCALER)),
                            dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=MOMENTUM, nesterov=True)


class TorchStepper:
    """airbench94's train step on one batch, repeated: bfloat16 autocast, summed smoothed cross-entropy, SGD."""

    def __init__(self, x, y, widths):
        import torch

        self.torch = torch
        self.net = airbench94_net(widths)
        self.optimizer = airbench94_optimizer(self.net, len(x))
        self.inputs = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(
            memory_format=torch.channels_last)
        self.labels = torch.from_numpy(y)
        self.batch_size = len(x)

    def step(self):
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = self.net(self.inputs)
        loss = torch.nn.functional.cross_entropy(outputs.float(), self.labels, label_smoothing=LABEL_SMOOTHING,
                                                 reduction="none").sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def measure(self, steps):
        with common.Stopwatch() as sw:
            for _ in range(steps):
                loss = self.step()
            self.last_loss = float(loss.detach())
        return sw.sample(steps * self.batch_size)

    def profile(self, steps, top=10):
        """`steps` steps under `torch.profiler`: the ops that took the most CPU time of their own."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, common.Stopwatch() as sw:
            for _ in range(steps):
                self.step()
        ranked = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ranked)
        return dict(steps=steps, wall_ms_per_step=round(1e3 * sw.seconds / steps, 2),
                    cpu_ms_per_step=round(total / 1e3 / steps, 2),
                    top_ops=[dict(op=e.key, ms_per_step=round(e.self_cpu_time_total / 1e3 / steps, 2),
                                  share=round(e.self_cpu_time_total / total, 4), calls_per_step=e.count / steps)
                             for e in ranked[:top]])


# === Keras ===


# The package's two CPU fast paths of the step, and how to build a model without each, for `--ablate`
# (both are chosen when the train step is traced, which `KerasFit` does at once).
FAST_PATHS = {
    "fused_gelu": "the tanh GELU and its gradient as two XLA-compiled loops (layers.activations.fused_gelu)",
    "tap_matmul": "small-map conv filter gradients as tap matmuls (layers.wsconv.conv2d)",
}


@contextlib.contextmanager
def without(fast_path):
    """Inside: models traced without `fast_path` (a key of `FAST_PATHS`; None: with both)."""
    from nfnet_keras.layers import activations, wsconv

    saved = activations.fused_gelu, wsconv.TAP_MATMUL_MAX_POSITIONS
    if fast_path == "fused_gelu":  # the plain ops, as in inference
        activations.fused_gelu = lambda x, scale=1.0: activations.activate("gelu", x, scale)
    elif fast_path == "tap_matmul":
        wsconv.TAP_MATMUL_MAX_POSITIONS = 0
    try:
        yield
    finally:
        activations.fused_gelu, wsconv.TAP_MATMUL_MAX_POSITIONS = saved


class KerasFit:
    """The package's network trained by `model.fit` on one batch repeated from memory (one fit call a window).

    The step is traced when the side is made (`without` applies then).
    """

    def __init__(self, preset, x, y):
        from nfnet_keras import training

        self.model = training.build_for(training.TrainConfig(preset=preset))
        training.adapt_to(self.model, (np.clip(x * 64 + 128, 0, 255)).astype(np.uint8))
        self.model.compile(
            optimizer=keras.optimizers.SGD(LR / (1024 * (1 + 1 / (1 - MOMENTUM))), momentum=MOMENTUM, nesterov=True,
                                           weight_decay=WEIGHT_DECAY),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=LABEL_SMOOTHING),
            jit_compile=False,  # what fit chooses on a CPU
        )
        self.dataset = common.repeated_batch_dataset(x, keras.utils.to_categorical(y, 10))
        self.batch_size = len(x)
        self.measure(1)

    def measure(self, steps):
        with common.Stopwatch() as sw:
            history = self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        self.last_loss = history.history["loss"][-1]
        return sw.sample(steps * self.batch_size)

    def run(self, steps):
        """`steps` steps; their wall seconds (what `benchmarks.peak.profile_steps` times)."""
        return steps * self.batch_size / self.measure(steps)["rate"]


# === Report ===


def main(argv=None):
    parser = common.base_parser(__doc__)
    parser.add_argument("--quick", dest="smoke", action="store_true", help="the same as --smoke")
    parser.add_argument("--batch-size", type=int, help="images per step (default 512)")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the Keras network without each of its CPU fast paths (FAST_PATHS)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="then profile this many steps of each network (TF profiler, torch.profiler; 0: none)")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch intra-op threads (default 0: PyTorch's own choice, one per core)")
    args = common.resolve_args(parser.parse_args(argv), DEFAULTS, SMOKE)
    if args.batch_size < 1 or args.threads < 0:
        raise SystemExit(f"--batch-size must be >= 1 and --threads >= 0, got {args.batch_size} and {args.threads}.")
    try:
        import torch
    except ImportError:
        raise SystemExit("this benchmark needs PyTorch: pip install -e '.[torch]'.") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    x, y = common.synthetic_batch(args.batch_size)
    with common.benchmark_run("airbench_torch", args) as payload:
        common.log(args, f"building {args.preset} (Keras) and airbench94's network (PyTorch {torch.__version__}) ...")
        sides = {"keras": KerasFit(args.preset, x, y)}
        for fast_path in FAST_PATHS if args.ablate else ():
            with without(fast_path):
                sides[f"keras_without_{fast_path}"] = KerasFit(args.preset, x, y)
        sides["torch"] = TorchStepper(x, y, args.widths)
        common.log(args, f"{args.repeats} interleaved rounds of {args.steps} steps, batch {args.batch_size} ...")
        samples = common.interleave({k: (lambda s=s: s.measure(args.steps)) for k, s in sides.items()}, args.repeats)
        results = {side: dict(images_per_s=common.summarize(common.rates(samples[side])),
                              images_per_cpu_s=common.summarize(common.rates(samples[side], "cpu_rate")),
                              cores_used=common.summarize(common.rates(samples[side], "cores"), 2),
                              last_loss=float(sides[side].last_loss)) for side in sides}
        ratio = common.paired_ratios(common.rates(samples["keras"]), common.rates(samples["torch"]))
        ablation = {side: dict(
            over_torch=common.paired_ratios(common.rates(samples[side]), common.rates(samples["torch"])),
            keras_over_this=common.paired_ratios(common.rates(samples["keras"]), common.rates(samples[side])))
            for side in sides if side.startswith("keras_without_")}
        payload.update(
            command="python -m benchmarks.airbench_torch " + " ".join(sys.argv[1:] if argv is None else argv),
            preset=args.preset, torch=torch.__version__, torch_threads=torch.get_num_threads(),
            precision={"keras": "mixed_bfloat16", "torch": "bfloat16 autocast, channels_last"},
            fast_paths=FAST_PATHS, results=results, ratio=ratio, ablation=ablation,
            ratio_per_cpu_s=common.paired_ratios(common.rates(samples["keras"], "cpu_rate"),
                                                 common.rates(samples["torch"], "cpu_rate")),
            target={"keras_over_torch": TARGET_RATIO}, target_met=ratio["median"] >= TARGET_RATIO)
        if args.profile_steps:
            from benchmarks import peak

            common.log(args, f"profiling {args.profile_steps} steps of each ...")
            payload["profile"] = {"keras": peak.profile_steps(sides["keras"], args.profile_steps),
                                  "torch": sides["torch"].profile(args.profile_steps)}
    print(f"Training images/s, batch {args.batch_size}, {args.repeats} interleaved windows of {args.steps} steps, "
          f"one process:")
    print(common.format_table([dict(
        side=_side_label(side, args.preset),
        min=r["images_per_s"]["min"], med=r["images_per_s"]["median"], max=r["images_per_s"]["max"],
        cpu=r["images_per_cpu_s"]["median"], cores=r["cores_used"]["median"]) for side, r in results.items()],
        [("side", "network"), ("min", "img/s min"), ("med", "img/s median"), ("max", "img/s max"),
         ("cpu", "img per CPU-s"), ("cores", "cores used")]))
    print(f"Keras / PyTorch: median {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f}), per "
          f"CPU-second {payload['ratio_per_cpu_s']['median']:.3f}; target >= {TARGET_RATIO}: "
          f"{'met' if payload['target_met'] else 'not met'}")
    for side, prof in payload.get("profile", {}).items():
        ops = prof["top_op_types"] if side == "keras" else prof["top_ops"]
        print(f"Profile, {_side_label(side, args.preset)}: " + ", ".join(
            f"{op.get('op_type', op.get('op'))} {100 * op['share']:.0f}%" for op in ops[:6]))
    for side, r in ablation.items():
        print(f"{_side_label(side, args.preset)} / PyTorch: {r['over_torch']['median']:.3f}; the full Keras step is "
              f"{r['keras_over_this']['median']:.3f}x as fast")
    print("Machine: " + common.describe_machine(payload["machine"]))
    print(f"JSON: {payload['json_path']}")
    return payload


def _side_label(side, preset):
    if side == "torch":
        return "airbench94 (PyTorch eager, bf16)"
    label = f"{preset} (Keras fit, mixed_bfloat16)"
    return label if side == "keras" else f"{label} without {side.removeprefix('keras_without_')}"


if __name__ == "__main__":
    main()
