"""Freed host memory is kept for reuse while training on the CPU, and handed back afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform

import pytest
import torch

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
