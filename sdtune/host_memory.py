"""Keep freed host memory for reuse while training on the CPU.

A CPU training step allocates and frees the same large activation buffers every step. glibc's
malloc serves large blocks with a fresh ``mmap`` and hands them back with ``munmap`` when freed,
so every step page-faults its activations in again and the kernel zeroes each page first. Raising
the mmap threshold (blocks come from the heap) and the trim threshold (the heap's free top is kept)
lets the next step reuse the same memory: the SD 1.5 LoRA step at 256 px ran 2.6 s instead of
3.1 s with the same peak RSS (benchmarks/README.md). jemalloc or tcmalloc, which PyTorch's CPU
tuning guide suggests for the same reason, would need ``LD_PRELOAD`` before Python starts;
``mallopt`` can be set from inside the process.

Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing. On a GPU the activations
live in CUDA memory, which PyTorch's caching allocator already reuses, so the loop turns this on
only when it trains on the CPU.

``copy_out_of_mapped_files`` is the other side of the same cost: trained weights that still sit in
the model file's memory mapping are copied out before the first step writes them.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds start here (the mmap one then adapts)

# Blocks below 1 GiB come from the heap: every activation of SD 1.5 or SDXL at batch 1-4 fits.
# Larger ones are still mapped and unmapped, so one huge buffer never stays resident for good.
REUSE_MMAP_THRESHOLD = 1 << 30
# Up to 2 GiB of free memory at the heap's top stays mapped between steps (mallopt takes an int).
REUSE_TRIM_THRESHOLD = (1 << 31) - 1


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own libc, already loaded
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_host_memory() -> None:
    """Hand the heap's free pages back to the OS (e.g. the VAE's activations once latents are cached)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def reuse_freed_host_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, keep freed memory in the process for reuse; yield whether that took effect.

    On exit the thresholds go back to glibc's defaults and the heap is trimmed, so a notebook that
    trains and then does other work gets its memory back.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    applied = libc.mallopt(M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD) == 1 and applied
    if not applied:
        logger.debug("mallopt refused the thresholds; malloc's defaults stay")
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def copy_out_of_mapped_files(params: Iterable[torch.Tensor]) -> None:
    """Give each CPU parameter memory of its own, in place of its view of the model file.

    ``from_pretrained`` leaves CPU weights as views of the memory-mapped safetensors file, mapped
    copy-on-write. Frozen weights are only read, which is what the mapping is good at; a trained
    weight is written by the first optimizer step, and the kernel then copies it one 4 KiB page
    per fault: SD 1.5's UNet took 15-20 s longer in its first full fine-tuning step on a 2-core
    VM, where copying it up front takes 0.9 s. Parameters on a GPU were copied there already.
    """
    with torch.no_grad():
        for param in params:
            if param.device.type == "cpu":
                param.data = param.data.clone()
