"""The `nfnet-fit` flags of the speed recipe's parts, one list each, for the benchmarks that add them.

No imports: `benchmarks/speed_jax.py` reads it before it picks the Keras backend.
"""

ALTFLIP = ["--augment", "translate_altflip"]
DIRAC = ["--conv-init", "dirac"]
# airbench94's Lookahead in place of the EMA
LOOKAHEAD = ["--ema", "0", "--lookahead", "5", "--lookahead-schedule", "airbench"]
# Muon on the conv kernels at airbench94_muon's kernel lr and momentum, with alternating flips: `--recipe speed`'s parts
MUON = ALTFLIP + ["--optimizer", "muon", "--kernel-lr", "0.24", "--kernel-momentum", "0.6"]
