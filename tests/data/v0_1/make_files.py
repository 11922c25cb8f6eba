"""Writes the .keras files of this folder with nfnet-keras 0.1.0 (commit 2e17227), the layout before the
network families had their own folders: `python tests/data/v0_1/make_files.py` in a checkout of that commit.

Each file is a model with random weights (skip gains at 0.5, so every residual branch counts) and the
logits it gives on a fixed input, which `tests/test_model.py` compares after loading it with this version.
"""

import os

import keras
import numpy as np

import nfnet_keras as nk
from nfnet_keras.model import BATCHNORM_TWIN

HERE = os.path.dirname(os.path.abspath(__file__))
x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype("float32")
for preset, twin in (("tiny_grouped", "nf"), ("tiny_speed", "nf"), ("tiny_speed", "bn")):
    extra = {} if preset == "tiny_speed" else {"skip_gain_init": 0.5}
    model = nk.build_model(preset, **(BATCHNORM_TWIN if twin == "bn" else {}), **extra)
    if preset == "tiny_speed":
        nk.adapt_model(model, x)
    model.save(os.path.join(HERE, f"{preset}_{twin}.keras"))
    np.save(os.path.join(HERE, f"{preset}_{twin}.npy"), keras.ops.convert_to_numpy(model(x, training=False)))
