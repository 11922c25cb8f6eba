"""The NFNet-F presets against timm's dm_nfnet_f0 ... f6: max |logit difference| and conversion time.

For each variant: timm's model with random weights, every gain, skip gain, bias
and Squeeze-Excite weight drawn away from its initial value; its state dict is
saved (`torch.save`), converted by `nfnet_keras.models.nf_resnet.convert` to a
`.keras` file (timed), loaded with `build_model(variant, weights=...)`, and both
networks' float32 logits are compared on the same random images at the
variant's train and test resolutions (Brock et al. 2021, 2102.06171, Table 3).
For scale, each row also gives how far timm's own float32 logits are from the
same timm model run in float64: the float32 rounding both sides carry.

    PYTHONPATH=$PWD python -m benchmarks.timm_parity --variants nfnet_f0,nfnet_f1

Needs timm (in the test extra; see docs/model.md). Writes `benchmarks/results/timm_parity.json`,
keeping the entries of variants not measured in this run (the big ones are run
one at a time).
"""

import argparse
import copy
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

# (train, test) resolution of each variant (2102.06171, Table 3).
RESOLUTIONS = {
    "nfnet_f0": (192, 256), "nfnet_f1": (224, 320), "nfnet_f2": (256, 352), "nfnet_f3": (320, 416),
    "nfnet_f4": (384, 512), "nfnet_f5": (416, 544), "nfnet_f6": (448, 576),
}
NAME = "timm_parity"
# torch.library definitions live as long as their Library object.
_TORCHVISION_SCHEMAS = []


def import_timm():
    """timm, importable beside the CPU build of torch that the test extra pins.

    timm imports torchvision. PyPI's x86_64 torchvision is a CUDA build: its `_C`
    ops library does not load beside a CPU torch, and `import torchvision` then
    fails registering a fake kernel for the undefined `torchvision::nms`
    (pytorch/pytorch#122494). timm's NFNets use none of torchvision's ops, so on
    that error the two schemas it registers against are declared, without a
    kernel, and the import is retried. With a matching torch and torchvision the
    first import succeeds and nothing is declared.
    """
    try:
        import timm
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        import torch

        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(library)
        import timm
    return timm


def perturbed_timm_model(variant, seed=0, num_classes=1000):
    """timm's `dm_<variant>` in eval mode, random, with every parameter moved off its initial value.

    Conv gains are drawn from U(0.8, 1.2) and skip gains from U(0.2, 0.6) (timm
    starts them at 1 and 0: with zero skip gains every block would be the
    identity on its shortcut); biases and the Squeeze-Excite weights get
    N(0, 0.2^2) added; kernels keep timm's random initialisation. Gains near
    those of a trained network keep the logits of order 1 at every depth; gains
    up to 1.5 on every conv and skip would grow the activations block after
    block, and float32 rounding with them (F4: timm's own float32 logits 1e-2
    from its float64 ones, against 4e-7 here).
    """
    import torch

    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(f"dm_{variant}", num_classes=num_classes).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.copy_(0.2 + 0.4 * torch.rand(p.shape, generator=generator))
            elif name.endswith("gain"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=generator))
            elif name.endswith("bias") or ".attn_last." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def timm_logits(model, images):
    """timm's logits for NHWC float32 `images` (timm takes NCHW), in the model's dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype)).numpy()


def keras_logits(model, images):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(model(images, training=False)))


def random_images(size, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype("float32")


def measure(variant, batch, log):
    """One variant: conversion seconds and the max |logit difference| at its train and test resolutions."""
    import torch

    from nfnet_keras.models.nf_resnet.convert import convert_timm_state_dict
    from nfnet_keras.models.registry import build_model

    log(f"{variant}: timm model ...")
    reference = perturbed_timm_model(variant)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, out = os.path.join(tmp, f"dm_{variant}.pth"), os.path.join(tmp, f"{variant}.keras")
        torch.save(reference.state_dict(), checkpoint)
        log(f"{variant}: converting ...")
        start = time.perf_counter()
        converted = convert_timm_state_dict(checkpoint, variant, out)
        seconds = time.perf_counter() - start
        params = converted.count_params()
        del converted
        gc.collect()
        model = build_model(variant, num_classes=1000, input_shape=(None, None, 3), weights=out)
    row = dict(variant=variant, parameters=params, convert_seconds=round(seconds, 1), batch=batch)
    reference64 = copy.deepcopy(reference).double()
    for label, size in zip(("train", "test"), RESOLUTIONS[variant]):
        log(f"{variant}: logits at {size}x{size} ...")
        images = random_images(size, batch)
        ref, ref64, ours = timm_logits(reference, images), timm_logits(reference64, images), keras_logits(model, images)
        row[f"{label}_resolution"] = size
        row[f"{label}_max_abs_diff"] = float(np.abs(ours - ref).max())
        row[f"{label}_keras_vs_timm_float64"] = float(np.abs(ours - ref64).max())
        row[f"{label}_timm_float32_vs_float64"] = float(np.abs(ref - ref64).max())
        row[f"{label}_max_abs_logit"] = float(np.abs(ref).max())
    del model, reference, reference64
    gc.collect()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", type=common.str_list, default=["nfnet_f0", "nfnet_f1"],
                        help="comma-separated, from nfnet_f0 ... nfnet_f6 (default: nfnet_f0,nfnet_f1)")
    parser.add_argument("--batch", type=int, default=2, help="images per comparison (default 2)")
    parser.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in RESOLUTIONS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; use nfnet_f0 ... nfnet_f6.")
    try:
        import torch

        timm = import_timm()
    except ImportError as e:
        parser.error(f"needs timm and torch ({e}); see docs/model.md, 'NFNet-F parity with DeepMind's models'.")
    log = lambda text: print(text, file=sys.stderr, flush=True)
    path = os.path.join(args.out_dir, f"{NAME}.json")
    from nfnet_keras.fileio import read_json

    previous = read_json(path, default={}) or {}
    rows = {r["variant"]: r for r in previous.get("results", [])}
    for variant in args.variants:
        row = measure(variant, args.batch, log)
        row.update(timm=timm.__version__, torch=torch.__version__, measured=time.strftime("%Y-%m-%d"))
        rows[variant] = row
        payload = dict(benchmark=NAME, command="python -m benchmarks.timm_parity " + " ".join(argv or sys.argv[1:]),
                       machine=common.machine_info(), results=[rows[v] for v in RESOLUTIONS if v in rows],
                       not_measured=[v for v in RESOLUTIONS if v not in rows])
        common.write_json(NAME, payload, args.out_dir)  # after each variant: a long run keeps what it measured
    columns = [("variant", "variant"), ("train_resolution", "train res"),
               ("train_max_abs_diff", "keras vs timm"), ("train_timm_float32_vs_float64", "timm fp32 vs fp64"),
               ("test_resolution", "test res"), ("test_max_abs_diff", "keras vs timm"),
               ("test_timm_float32_vs_float64", "timm fp32 vs fp64"), ("convert_seconds", "convert (s)")]
    print(common.format_table(payload["results"], columns))
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
