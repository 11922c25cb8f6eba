"""A short probe of the speed network's variants: 2 epochs on 10,000 real images, batch 512.

Each variant is `cifar_speed` trained by the speed recipe's ingredients (Nesterov SGD,
triangle schedule, weight decay 5e-4, label smoothing 0.2, `translate_flip`,
`mixed_bfloat16`, no EMA) for 2 epochs of the first 10,000 training images, validated on
2,000 held-out images:

    nf       the Normalizer-Free network
    nf_agc   the same with AGC (clipping 0.04)
    bn       the BatchNorm twin (`--norm batch`)

Forty steps say which way an ingredient pushes the start of training, not where ten
epochs end. Writes `benchmarks/results/speed_probe[_<tag>].json`.

Usage:
    NFNET_DATA_DIR=... python -m benchmarks.speed_probe --variants nf,nf_agc,bn --lr 0.2 [--tag NAME]
"""

import argparse
import math
import os
import sys
import time

from benchmarks import common

VARIANTS = ("nf", "nf_agc", "bn")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=common.str_list, default=list(VARIANTS), help=", ".join(VARIANTS))
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--tag", help="suffix of the JSON name")
    p.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants takes {', '.join(VARIANTS)}; got {', '.join(sorted(unknown))}.")

    from nfnet_keras import training
    from nfnet_keras.config import TrainConfig

    base = dict(preset="cifar_speed", epochs=args.epochs, batch_size=512, lr=args.lr, momentum=0.9, nesterov=True,
                schedule="triangle", weight_decay=5e-4, label_smoothing=0.2, augment="translate_flip",
                precision="mixed_bfloat16", train_limit=args.train_limit, val_size=2000,
                data_dir=os.environ.get("NFNET_DATA_DIR"))
    train, val, _ = training.load_splits(TrainConfig(**base).validate())
    rows = []
    for variant in args.variants:
        config = TrainConfig(**base, norm="batch" if variant == "bn" else "none",
                             agc=0.04 if variant == "nf_agc" else 0.0).validate()
        training.setup_runtime(config)
        model = training.build_for(config)
        training.compile_model(model, config, steps_per_epoch=math.ceil(len(train[0]) / config.batch_size))
        training.adapt_to(model, train[0])
        train_ds, val_ds = training.make_datasets(config, train, val)
        start = time.time()
        result = training.fit_model(model, config, train_ds, val_ds, verbose=0)
        row = dict(variant=variant, lr=args.lr, diverged=result.diverged,
                   accuracy=[round(a, 4) for a in result.history.get("accuracy", [])],
                   val_accuracy=[round(a, 4) for a in result.history.get("val_accuracy", [])],
                   seconds=round(time.time() - start, 1))
        rows.append(row)
        print(row, flush=True)
    name = "speed_probe" + (f"_{args.tag}" if args.tag else "")
    path = common.write_json(name, dict(benchmark="speed_probe", command="python -m benchmarks.speed_probe "
                                        + " ".join(sys.argv[1:]), machine=common.machine_info(), runs=rows),
                             args.out_dir)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
