"""Which mixed precision a run uses: ``--mixed_precision auto`` resolved for the machine it runs on.

Resolved before the Accelerator is made, without creating any accelerate state: a
``PartialState`` made first changed what two CPU processes computed (design note 19).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env


def launch_device() -> torch.device:
    """The device accelerate will pick: CUDA when there is one, unless launched with --cpu."""
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")  # set by `accelerate launch --cpu`
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def resolve_mixed_precision(requested: str | None, device: torch.device) -> str | None:
    """``auto`` → what this machine runs fast and safely; any other value is kept (None: accelerate's config).

    CUDA: bf16 where supported, else fp16. CPU: bf16 only with AMX (bf16 without it is ~13x
    slower than fp32), else no. Anything else (MPS, XPU, ...): no.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_amx_bf16() else "no"
    return "no"


def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AMX bf16 tiles (Linux flags; torch's get_cpu_capability() reports AVX levels only)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False  # not Linux: no way to tell, so not assumed
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())
