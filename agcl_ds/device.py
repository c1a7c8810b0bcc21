"""What the machine runs natively: the precision `training.precision: auto` resolves to.

bf16 only where the hardware computes it: a CUDA GPU with bf16 support, or a CPU with avx512_bf16 or
AMX. Elsewhere torch emulates bf16 on CPUs, which is slower than fp32, not faster: a SmolLM2-135M
forward of 8x128 tokens took 31.3 s in bf16 against 4.3 s in fp32 on a 2-core AVX2-only EPYC.
"""

from __future__ import annotations

import os

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_precision() -> tuple[str, str]:
    """(precision, why) for the accelerator DeepSpeed will use here (DS_ACCELERATOR=cpu means the CPU)."""
    import torch

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{name} computes bf16 natively"
        return "fp32", f"{name} has no native bf16"
    flags = cpu_flags()
    have = [f for f in CPU_BF16_FLAGS if f in flags]
    if have:
        return "bf16", f"the CPU has {'/'.join(have)}"
    return "fp32", "the CPU has neither avx512_bf16 nor AMX, so bf16 would be emulated (slower than fp32)"
