"""`nfnet-convert`: a timm NFNet-F state dict (DeepMind's weights) -> a `.keras` file.

    nfnet-convert dm_nfnet_f0.pth -o nfnet_f0.keras
    nfnet-convert model.safetensors --variant nfnet_f1 -o nfnet_f1.keras

The variant defaults to the one whose stage depths the checkpoint has. On a
bad checkpoint the command prints one line and exits 2, writing nothing. See
docs/model.md, "NFNet-F parity with DeepMind's models".
"""

import argparse
import sys

from nfnet_keras import exits
from nfnet_keras.models.nf_resnet.convert import VARIANTS, convert_timm_state_dict

PROG = "nfnet-convert"


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a timm dm_nfnet_f0 ... dm_nfnet_f6 state dict (.pth or .safetensors) to a .keras "
                    "file of the package's nfnet_f0 ... nfnet_f6 preset.",
    )
    parser.add_argument("checkpoint", help="the timm state dict: a torch.save'd .pth or a .safetensors file")
    parser.add_argument("-o", "--output", required=True, help="the .keras file to write (written atomically)")
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="the preset; default: the one whose stage depths the checkpoint has")
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the converter; returns 0, or 2 after a one-line error on stderr."""
    args = _parse_args(argv)
    from nfnet_keras import load_framework  # the flags are parsed: now load the framework, quietly

    load_framework()
    try:
        model = convert_timm_state_dict(args.checkpoint, args.variant, args.output)
    except (ValueError, OSError) as e:  # fileio's WriteError is an OSError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    print(f"Wrote {args.output} ({model.name}, {model.output_shape[-1]} classes, "
          f"{model.count_params():,} parameters)")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
