"""Optimizers and optimizer wrappers of the speed runs.

Parameter groups with their own lr and decay mode (`GroupSGD`), `Lookahead`,
filter renormalization (`RenormSGD`), Muon for conv kernels (`ConvMuon`), and
`split_kernels` to give the conv kernels their own optimizer. Adaptive
gradient clipping is `nfnet_keras.agc`.
"""

from nfnet_keras.optimizers.conv_muon import ConvMuon
from nfnet_keras.optimizers.groups import GROUPS, GroupSGD, param_group
from nfnet_keras.optimizers.lookahead import Lookahead
from nfnet_keras.optimizers.renorm import RenormSGD
from nfnet_keras.optimizers.split import CONV_KERNELS, split_kernels

__all__ = ["CONV_KERNELS", "GROUPS", "ConvMuon", "GroupSGD", "Lookahead", "RenormSGD", "param_group", "split_kernels"]
