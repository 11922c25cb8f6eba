"""The networks: one folder per family, a registry from preset names to builders, and the
tools that read a model block by block (signal propagation, multiply-add counts)."""

from nfnet_keras.models.conv_groups import ConvGroup, ConvGroupsConfig, NormConvGroup
from nfnet_keras.models.flops import count_macs
from nfnet_keras.models.initialization import dirac_initialize
from nfnet_keras.models.nf_resnet import NFBlock, NFResNetConfig, PreActBottleneck
from nfnet_keras.models.registry import BATCHNORM_TWIN, PRESETS, build_model, check_preset, resolve_config
from nfnet_keras.models.signal import signal_propagation
from nfnet_keras.models.signal_block import SignalBlock, adapt_model, model_convs, signal_blocks

__all__ = [
    "BATCHNORM_TWIN",
    "ConvGroup",
    "ConvGroupsConfig",
    "NFBlock",
    "NFResNetConfig",
    "NormConvGroup",
    "PRESETS",
    "PreActBottleneck",
    "SignalBlock",
    "adapt_model",
    "build_model",
    "check_preset",
    "count_macs",
    "dirac_initialize",
    "model_convs",
    "resolve_config",
    "signal_blocks",
    "signal_propagation",
]
