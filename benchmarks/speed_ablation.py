"""The speed recipe with the airbench94 parts added one at a time, on real CIFAR-10.

Each row is `python -m nfnet_keras.fit --recipe speed --epochs E --seed S --no-export --optimizer sgd
--augment translate_flip --batch-size 512 --lr 0.4 --kernel-lr 0.24 <the row's flags>`
in its own run directory `<runs-dir>/ab_<row>` (rerunning resumes an interrupted run and skips a
finished one), then `python -m nfnet_keras.evaluate --tta flip_translate_weighted` of its model.
The summary, `benchmarks/results/speed_ablation_<E>ep[_<tag>].json`, holds each row's command,
test accuracy plain, with flip TTA, with the 6-view TTA and with the weighted 6-view TTA, and its
validation accuracy per epoch. `--norm batch` (after `--`) gives the BatchNorm twin's table.

Usage:
    python -m benchmarks.speed_ablation [--epochs 5] [--seed 0] [--rows a1_altflip,...] [--collect-only]
        [-- extra fit flags]
"""

import argparse
import json
import os
import subprocess
import sys

from benchmarks import common
from benchmarks.speed_flags import AIRBENCH94_NET, ALTFLIP, BATCH128, BATCH256, BATCH512, DIRAC, LOOKAHEAD, MUON

# The recipe the rows start from: `--recipe speed` as it was before its Muon, alternating flip, batch 128 and
# wider network (rows b5_muon, a1_altflip, b29_muon_batch128), so that every row measures what it did when it
# was chosen.
BASE = [*AIRBENCH94_NET, "--optimizer", "sgd", "--augment", "translate_flip", *BATCH512]
# The rows, each the base plus its flags: the airbench94 parts added one at a time in airbench's order,
# a part that lost (dirac) left out of the rows after it.
ROWS = {
    "a0_recipe": [],
    "a1_altflip": ALTFLIP,
    "a2_dirac": ALTFLIP + DIRAC,
    "a3_lookahead": ALTFLIP + DIRAC + LOOKAHEAD,
    "b3_lookahead": ALTFLIP + LOOKAHEAD,
    "b4_renorm": ALTFLIP + ["--optimizer", "renorm_sgd", "--kernel-lr", "0.03"],
    "b5_muon": MUON,
    # Muon at a third of airbench94_muon's kernel lr: the NF network's loss no longer stalls on the ramp
    "b6_muon_klr0.08": ALTFLIP + ["--optimizer", "muon", "--kernel-lr", "0.08", "--kernel-momentum", "0.6"],
    # Muon at airbench94_muon's kernel lr, reached at half the steps instead of 23%: low through the stall
    "b7_muon_kpeak0.5": MUON + ["--kernel-peak-pct", "0.5"],
    # dirac init and Lookahead on the Muon row: they lifted the BatchNorm twin at 10 epochs (docs/training.md)
    "b8_muon_dirac": MUON + DIRAC,
    "b9_muon_dirac_lookahead": MUON + DIRAC + LOOKAHEAD,
    # the biases' lr raised, as airbench94 trains its BatchNorm and whitening biases at 64 times the lr
    "b10_muon_bias8": MUON + ["--bias-lr-mult", "8"],
    "b11_muon_bias64": MUON + ["--bias-lr-mult", "64"],
    # airbench94's whitening bias: trained for the first 3 epochs, then frozen
    "b12_muon_wbias3": MUON + ["--whitening-bias-epochs", "3"],
    # Muon's kernels not decayed, as airbench94_muon's: their scale, hence Muon's relative step, left to the updates
    "b13_muon_kwd0": MUON + ["--kernel-weight-decay", "0"],
    # the WS gains frozen at 1, as the twin's BatchNorm scales (airbench94's): each conv's output scale fixed
    "b14_muon_gain0": MUON + ["--gain-lr-mult", "0"],
    # no EMA of the weights: dropping it lifted the twin by 0.6 points at 5 epochs
    "b15_muon_noema": MUON + ["--ema", "0"],
    # gains and biases set so that every activation's input starts at mean 0, variance 1 per channel on 2,048
    # training images (without it the groups' outputs start at squared channel means up to 1.4 and variances up
    # to 4.3: nk.signal_propagation, docs/training.md)
    "b16_muon_datainit": MUON + ["--data-init", "2048"],
    # the WS gains (and skip gains) at 4 times the lr: frozen (b14), they cost 3.5 points
    "b17_muon_gain4": MUON + ["--gain-lr-mult", "4"],
    # no adaptive gradient clipping: kept from the SGD recipe, under Muon it clips the SGD groups and the
    # kernels' per-filter gradients before their orthogonalization; airbench94_muon clips nothing
    "b18_muon_agc0": MUON + ["--agc", "0"],
    # filters scaled to unit norm without centring, as KellerJordan's airbench without BatchNorm keeps them; with
    # dirac init an identity filter then stays exactly the identity (a centred one does not)
    "b19_muon_uncentred": MUON + ["--override", "center_filters=False"],
    "b20_muon_uncentred_dirac": MUON + ["--override", "center_filters=False"] + DIRAC,
    # adaptive gradient clipping tighter and looser than the recipe's 0.04 (without any the network trails early)
    "b21_muon_agc0.02": MUON + ["--agc", "0.02"],
    "b22_muon_agc0.01": MUON + ["--agc", "0.01"],
    "b23_muon_agc0.08": MUON + ["--agc", "0.08"],
    # the classifier at half the lr: the NF network's last features start at an average channel variance of 4.3
    "b24_muon_head0.5": MUON + ["--head-lr-mult", "0.5"],
    # the NF network trails its twin on the training set (96.2-96.9% training accuracy in the last of 10 epochs,
    # against 98.9%): twice the steps at batch 256, the SGD and Muon lrs scaled by 1/sqrt(2)
    "b25_muon_batch256": MUON + BATCH256,
    # b25 again at batch 128 (4 times the steps, the lrs halved), and at batch 256 with the lrs unscaled
    "b29_muon_batch128": MUON + BATCH128,
    "b30_muon_batch256_lr": MUON + ["--batch-size", "256"],
    # Muon's kernels at a higher momentum (airbench94_muon's 0.6 was tuned with BatchNorm) and a higher lr
    "b26_muon_kmom0.85": MUON + ["--kernel-momentum", "0.85"],
    "b27_muon_klr0.4": MUON + ["--kernel-lr", "0.4"],
    # half of airbench's label smoothing
    "b28_muon_ls0.1": MUON + ["--label-smoothing", "0.1"],
    # b4 again with RenormSGD turning each filter by the lr per step, as batchnorm_begone's optimizer does (it
    # normalized each filter's gradient before the momentum, so a step could turn a filter by up to 10 x the lr)
    "b31_renorm": ALTFLIP + ["--optimizer", "renorm_sgd", "--kernel-lr", "0.03"],
    # closer to batchnorm_begone's network: unit-norm filters not centred, dirac init, no trained gains, no AGC,
    # no EMA (it keeps conv biases, the max-pool's shift and scale and the activation's gain)
    "b32_renorm_begone": ALTFLIP + ["--optimizer", "renorm_sgd", "--kernel-lr", "0.03", "--override",
                                    "center_filters=False", "--gain-lr-mult", "0", "--agc", "0", "--ema", "0"] + DIRAC,
    # Muon as airbench94_muon's: each kernel rescaled to norm sqrt(filters) before its step, so a step turns it by
    # about the lr all run long (unscaled, the kernels grow and the steps turn them less and less); at the lr and at
    # half of it (the recipe takes about 5 times airbench94_muon's steps)
    "b33_muon_normalize": MUON + ["--muon-normalize"],
    "b34_muon_normalize_klr0.12": MUON + ["--muon-normalize", "--kernel-lr", "0.12"],
}


def row_flags():
    """{row: its fit flags}."""
    return {name: list(flags) for name, flags in ROWS.items()}


def fit_command(args, flags):
    return [sys.executable, "-m", "nfnet_keras.fit", "--recipe", "speed", "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--no-export", *BASE, *flags, *args.extra]


def run_row(args, name, flags):
    run_dir = os.path.join(args.runs_dir, f"ab_{name}")
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        with open(f"{run_dir}.log", "a") as log:
            subprocess.run(fit_command(args, flags) + ["--run-dir", run_dir], stdout=log, stderr=log, check=False)
    model, weighted = os.path.join(run_dir, "model.keras"), os.path.join(run_dir, "eval_weighted.json")
    if os.path.isfile(model) and not os.path.isfile(weighted):
        subprocess.run([sys.executable, "-m", "nfnet_keras.evaluate", "--model", model, "--tta",
                        "flip_translate_weighted", "--json", weighted], capture_output=True, check=False)


def _weighted_accuracy(run_dir):
    """The weighted-TTA accuracy of a run: its `eval_weighted.json`, or the printout `<run_dir>.eval_weighted.txt`
    of `nfnet-evaluate --tta flip_translate_weighted` run by hand; None if neither is there."""
    try:
        with open(os.path.join(run_dir, "eval_weighted.json")) as f:
            return json.load(f)["test_accuracy"]
    except OSError:
        pass
    try:
        with open(f"{run_dir}.eval_weighted.txt") as f:
            lines = [line for line in f if line.startswith("test accuracy: ")]
    except OSError:
        return None
    return float(lines[0].split()[2]) if lines else None


def summarize(args, flags):
    rows = []
    for name, row in flags.items():
        run_dir = os.path.join(args.runs_dir, f"ab_{name}")
        try:
            with open(os.path.join(run_dir, "metrics.json")) as f:
                metrics = json.load(f)
        except OSError:
            continue
        weighted = _weighted_accuracy(run_dir)
        rows.append(dict(
            row=name, command=" ".join(["python"] + fit_command(args, row)[1:]), flags=row,
            test_accuracy=metrics.get("test_accuracy"), test_accuracy_flip_tta=metrics.get("test_accuracy_flip_tta"),
            test_accuracy_6view_tta=metrics.get("test_accuracy_tta"), test_accuracy_weighted_tta=weighted,
            val_accuracy=metrics.get("history", {}).get("val_accuracy"),
            seconds=round(sum(metrics.get("seconds_per_epoch", [])), 1),
        ))
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (default: 0)")
    parser.add_argument("--rows", help="comma-separated rows to run (default: all)")
    parser.add_argument("--runs-dir", default="runs/speed_ablation", help="where the runs go")
    parser.add_argument("--collect-only", action="store_true", help="summarise the finished runs, run nothing")
    parser.add_argument("--tag", help="suffix of the summary's name")
    parser.add_argument("--out-dir", default=common.RESULTS_DIR, help="where the summary goes")
    args = parser.parse_args(argv)
    args.extra = extra
    flags = row_flags()
    chosen = args.rows.split(",") if args.rows else list(flags)
    unknown = sorted(set(chosen) - set(flags))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(flags)}")
    os.makedirs(args.runs_dir, exist_ok=True)
    if not args.collect_only:
        for name in chosen:
            run_row(args, name, flags[name])
    rows = summarize(args, {name: flags[name] for name in chosen})
    name = f"speed_ablation_{args.epochs}ep" + (f"_{args.tag}" if args.tag else "")
    print(common.format_table(rows, [("row", "row"), ("test_accuracy", "test"), ("test_accuracy_flip_tta", "flip TTA"),
                                     ("test_accuracy_6view_tta", "6-view TTA"),
                                     ("test_accuracy_weighted_tta", "weighted TTA"), ("seconds", "seconds")]))
    print("wrote", common.write_json(name, dict(benchmark="speed_ablation", epochs=args.epochs, seed=args.seed,
                                                extra_flags=extra, runs=rows), out_dir=args.out_dir))


if __name__ == "__main__":
    main()
