"""Optimizers and optimizer wrappers of the speed runs.

Parameter groups with their own lr and decay mode (`GroupSGD`), `Lookahead`,
filter renormalization (`RenormSGD`), Muon for conv kernels (`ConvMuon`), and
`split_kernels` to give the conv kernels their own optimizer. Adaptive
gradient clipping is `nfnet_keras.agc`.
"""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(__name__, {
    ".conv_muon": ["ConvMuon"],
    ".groups": ["GROUPS", "GroupSGD", "param_group"],
    ".lookahead": ["Lookahead"],
    ".renorm": ["RenormSGD"],
    ".split": ["CONV_KERNELS", "SplitOptimizer", "split_kernels"],
})
