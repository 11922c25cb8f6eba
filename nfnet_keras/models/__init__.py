"""The networks: one folder per family, a registry from preset names to builders, and the
tools that read a model block by block (signal propagation, multiply-add counts), BatchNorm
statistics recomputed for other weights, and the
transfer-learning ones (backbones, feature maps, new heads, frozen stages).
Each name imports its module on first use."""

from nfnet_keras import lazy

__getattr__, __dir__, __all__ = lazy.attach(
    __name__,
    {
        ".batchnorm_stats": ["batchnorm_statistics", "recompute_batchnorm_statistics", "set_batchnorm_statistics"],
        ".conv_groups.conv_group": ["ConvGroup", "NormConvGroup"],
        ".conv_groups.presets": ["ConvGroupsConfig"],
        ".flops": ["count_macs"],
        ".initialization": ["data_initialize", "dirac_initialize"],
        ".nf_resnet.blocks": ["NFBlock", "PreActBottleneck"],
        ".nf_resnet.presets": ["NFResNetConfig"],
        ".presets": ["PRESETS", "check_preset", "resolve_config"],
        ".registry": ["BATCHNORM_TWIN", "build_model"],
        ".signal": ["signal_propagation"],
        ".signal_block": ["SignalBlock", "adapt_model", "model_convs", "signal_blocks"],
        ".transfer": ["backbone", "copy_weights", "feature_extractor", "freeze", "with_new_head"],
    },
    submodules=("conv_groups", "nf_resnet", "transfer"),
)
