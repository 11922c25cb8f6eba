"""What the machine offers, read without loading a framework: the CPU's features and whether a GPU is attached.

`mixed_bfloat16` is fast only where the hardware computes in bfloat16: a recent GPU, or a CPU whose
oneDNN kernels take bfloat16 (x86 with AVX-512, AVX-NE-CONVERT or AMX; Arm with its BF16 extension).
Elsewhere, e.g. an x86 CPU with AVX2 only, TensorFlow falls back to reference kernels that are many
times slower than float32 (docs/training.md#devices). `precision_for_machine` says what to do about it
before anything is built.
"""

import glob
import os

# x86 `/proc/cpuinfo` flags under which TensorFlow's oneDNN runs bfloat16 convolutions and matmuls in
# its own kernels (AVX-512 emulates bfloat16 in float32 registers; the others compute it natively).
X86_BFLOAT16_FLAGS = ("avx512f", "avx_ne_convert", "amx_bf16")
# The Arm feature (the `Features` line) of the BF16 extension.
ARM_BFLOAT16_FLAG = "bf16"


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (x86 `flags`, Arm `Features`) as a frozenset; None where they cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def cpu_has_fast_bfloat16(flags=None):
    """True if the CPU has kernels for bfloat16, False if it has none, None if its flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return any(flag in flags for flag in (*X86_BFLOAT16_FLAGS, ARM_BFLOAT16_FLAG))


def gpu_attached():
    """Whether a GPU device node is there (NVIDIA or ROCm) and `CUDA_VISIBLE_DEVICES` does not hide it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def precision_for_machine(precision, explicit, fast_bfloat16=None, gpu=None):
    """The precision to train in on this machine, and a one-line message to print (or None).

    `mixed_bfloat16` on a machine without a GPU whose CPU has no bfloat16 kernels becomes `float32`
    when it came from a recipe (`explicit` False), with a note; asked for explicitly, it stays, with a
    warning. Any other precision, or a machine that is not known to be slow, is left as it is.

    Args:
        precision: str. The configured precision.
        explicit: bool. Whether the user chose it (a flag or an --hparams key) rather than a recipe.
        fast_bfloat16, gpu: the machine's answers (default: `cpu_has_fast_bfloat16()`, `gpu_attached()`).
    """
    if precision != "mixed_bfloat16":
        return precision, None
    gpu = gpu_attached() if gpu is None else gpu
    fast_bfloat16 = cpu_has_fast_bfloat16() if fast_bfloat16 is None else fast_bfloat16
    if gpu or fast_bfloat16 is not False:
        return precision, None
    why = "this CPU has no bfloat16 kernels (no AVX-512, AVX-NE-CONVERT, AMX or Arm BF16) and no GPU is attached"
    if explicit:
        return precision, (f"warning: {why}: mixed_bfloat16 runs many times slower here than float32; "
                           "--precision float32 trains faster.")
    return "float32", (f"note: {why}, where mixed_bfloat16 runs many times slower than float32: training in "
                       "float32 (--precision mixed_bfloat16 insists).")
