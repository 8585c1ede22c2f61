"""Freed host memory is kept for reuse while training on the CPU, and handed back afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform

import pytest
import torch

import sdtune
import sdtune.loop
from sdtune import train_lora
from sdtune.host_memory import reuse_freed_host_memory

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)
BLOCK_MIB = 64


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_returned_by_freeing_a_block() -> float:
    block = torch.ones(BLOCK_MIB * 2**20 // 4)  # written, so every page is resident
    before = _rss_mib()
    del block
    return before - _rss_mib()


@glibc_only
def test_a_freed_block_stays_in_the_process_inside_and_goes_back_after():
    # (Outside, whether a freed block leaves at once depends on what the heap already holds, so only
    # the two deterministic halves are asserted.)
    with reuse_freed_host_memory() as applied:
        assert applied
        kept = [_rss_returned_by_freeing_a_block() for _ in range(3)]
        held = _rss_mib()
    assert max(kept) < BLOCK_MIB * 0.1  # kept for the next step, which reuses it
    assert held - _rss_mib() > BLOCK_MIB * 0.9  # trimmed on exit


def test_disabled_or_without_glibc_it_changes_nothing(monkeypatch):
    with reuse_freed_host_memory(enabled=False) as applied:
        assert not applied
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    with reuse_freed_host_memory() as applied:
        assert not applied


def test_training_on_the_cpu_runs_inside_it_unless_turned_off(lora_config, tmp_path, monkeypatch):
    requested = []

    @contextlib.contextmanager
    def recording(enabled=True):
        requested.append(enabled)
        yield enabled

    monkeypatch.setattr(sdtune.loop, "reuse_freed_host_memory", recording)
    train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "on"), max_train_steps=1))
    train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "off"), max_train_steps=1, reuse_host_memory=False))
    assert requested == [True, False]


def _mapped_ranges(path_suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files whose path ends with ``path_suffix``."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[-1].endswith(path_suffix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _in_mapped_file(tensor: torch.Tensor, ranges) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_trained_weights_leave_the_model_files_mapping_and_frozen_weights_stay(tiny_model, shapes_dir, tmp_path):
    # The first optimizer step would otherwise copy each trained weight page by page on write faults.
    config = sdtune.DreamBoothConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), instance_prompt="a sks shape",
        output_dir=str(tmp_path / "out"), resolution=64, max_train_steps=1, checkpointing_steps=0, report_to="none")
    trainer = sdtune.loop.Trainer(config, sdtune.DreamBoothMethod(config))
    trainer.setup()
    try:
        unet_file = _mapped_ranges("unet/diffusion_pytorch_model.safetensors")
        vae_file = _mapped_ranges("vae/diffusion_pytorch_model.safetensors")
        frozen = list(trainer.components.vae.parameters())
        assert vae_file and all(_in_mapped_file(p, vae_file) for p in frozen)  # the control: loading maps the file
        trained = list(trainer.components.unet.parameters())
        assert trained and all(p.requires_grad for p in trained)
        assert not any(_in_mapped_file(p, unet_file) for p in trained)
    finally:
        trainer.cleanup()
