"""The gamma table of the scaled activations, and the one check of an activation's name. Imports no Keras.

For an activation `g` and `z ~ N(0, 1)`, `gamma = 1 / sqrt(Var(g(z)))`, so that
`g(z) * gamma` has unit variance (Brock et al. 2021, arXiv 2101.08692, Section 4
and Appendix D). `nfnet_keras.layers.activations` applies them.
"""

# Published constants (DeepMind's NFNet code). `tests/test_activations.py`
# recomputes each one by numerical integration and checks it to 1e-3 relative.
GAMMAS = {
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    # The exact (erf) GELU, as PyTorch's and timm's NFNets run it; timm scales it
    # by the tanh GELU's published constant, kept here so that its ports match.
    "gelu_exact": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "selu": 1.0008515119552612,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "softplus": 1.9203323125839233,
    "leaky_relu": 1.70590341091156,
    "relu6": 1.7131484746932983,
    "celu": 1.270926833152771,
    # The published 1.8484294414520264 is 1.2e-3 too high (sampled, like the
    # others); this is 1 / sqrt(E[sigmoid(b)^2]), b ~ N(0, 1), by quadrature.
    "glu": 1.8462285453386054,
    "log_sigmoid": 1.9193484783172607,
    "soft_sign": 2.338853120803833,
    "log_softmax": 1.0002083778381348,
    "identity": 1.0,
}
GAMMAS["swish"] = GAMMAS["silu"]
GAMMAS["linear"] = GAMMAS["identity"]


def check_activation(name):
    """Returns `name` if it is a known activation, else raises a ValueError."""
    if not isinstance(name, str) or name not in GAMMAS:
        raise ValueError(
            f"Unknown activation {name!r}. Use one of: {', '.join(sorted(GAMMAS))}."
        )
    return name
