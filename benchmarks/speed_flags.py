"""The `nfnet-fit` flags of the speed recipe's parts, one list each, for the benchmarks that add them.

No imports: `benchmarks/speed_jax.py` reads it before it picks the Keras backend.
"""

# airbench94's widths (64/256/256): the network the parts were screened on (`--recipe speed` trains
# `cifar_speed_wider`)
AIRBENCH94_NET = ["--preset", "cifar_speed"]
WIDE = ["--preset", "cifar_speed_wide"]  # airbench95's widths, 128/384/384
WIDER = ["--preset", "cifar_speed_wider"]  # 192/512/512, 8.3 M weights: the recipe's network
ALTFLIP = ["--augment", "translate_altflip"]
DIRAC = ["--conv-init", "dirac"]
# airbench94's Lookahead in place of the EMA
LOOKAHEAD = ["--ema", "0", "--lookahead", "5", "--lookahead-schedule", "airbench"]
# Muon on the conv kernels at airbench94_muon's kernel lr and momentum, with alternating flips: `--recipe speed`'s parts
MUON = ALTFLIP + ["--optimizer", "muon", "--kernel-lr", "0.24", "--kernel-momentum", "0.6"]
# the batch and peak lrs the speed recipe's parts were screened at (airbench94_muon's kernel lr): the twin
# recipe's, and 4 times the NF recipe's batch at twice its lrs
BATCH512 = ["--batch-size", "512", "--lr", "0.4", "--kernel-lr", "0.24"]
# batch 256, twice BATCH512's steps per epoch, its SGD and Muon lrs scaled by 1/sqrt(2)
BATCH256 = ["--batch-size", "256", "--lr", "0.28", "--kernel-lr", "0.17"]
# batch 128, four times BATCH512's steps per epoch, its SGD and Muon lrs halved: `--recipe speed`'s
BATCH128 = ["--batch-size", "128", "--lr", "0.2", "--kernel-lr", "0.12"]
