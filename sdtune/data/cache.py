"""Caches of what the frozen encoders compute: VAE latents (per image, crop and flip) and caption embeddings.

Latent entries are keyed by a content hash of everything that changes them (image bytes,
crop, bucket size, flip, VAE weights, dtype, resolution), so editing any of those rebuilds
exactly the affected entries and a stale entry can never be paired with the wrong image.
Building is sharded across processes; every process ends up with every entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdtune.data.dataset import Sample
from sdtune.data.images import open_rgb, to_tensor
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"


class LatentCache:
    """The VAE posterior (mean, std) of every (sample, flip), in memory and optionally on disk."""

    def __init__(self, *, fingerprint: str, dtype: torch.dtype, resolution: int, cache_dir: str | Path | None = None):
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.resolution = resolution
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def key(self, sample: Sample, flip: bool) -> str:
        parts = [CACHE_FORMAT_VERSION, sample.image_hash, sample.placement.resized, sample.placement.crop, flip,
                 self.fingerprint, str(self.dtype), self.resolution]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def get(self, sample: Sample, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.entries[self.key(sample, flip)]

    def build(self, samples: list[Sample], flips: tuple[bool, ...], vae, accelerator, batch_size: int) -> None:
        """Encode every (sample, flip) that is not cached yet; this process encodes its 1/N share."""
        jobs = {self.key(s, f): (s, f) for s in samples for f in flips}
        # Shard the full job list, then skip what exists: deciding from what is on disk first would
        # race with other processes already writing, and leave entries that nobody encodes.
        share = list(jobs)[accelerator.process_index :: accelerator.num_processes]
        mine = [k for k in share if k not in self.entries and not self._on_disk(k)]
        encoded = self._encode(mine, jobs, vae, batch_size, show_progress=accelerator.is_local_main_process)
        if self.cache_dir is not None:
            accelerator.wait_for_everyone()
            for key in jobs:
                if key not in self.entries:
                    tensors = load_file(self._path(key))
                    self.entries[key] = (tensors["mean"], tensors["std"])
        else:
            if accelerator.num_processes > 1:
                from accelerate.utils import gather_object

                encoded = dict(pair for part in gather_object([encoded]) for pair in part.items())
            self.entries.update(encoded)
        logger.info("latent cache: %d entries, %d encoded by this process", len(jobs), len(mine))

    @torch.no_grad()
    def _encode(self, keys: list[str], jobs: dict, vae, batch_size: int, show_progress: bool) -> dict:
        by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key in keys:
            by_size[jobs[key][0].placement.size].append(key)
        encoded = {}
        progress = tqdm(total=len(keys), desc="Caching latents", disable=not show_progress or not keys)
        for group in by_size.values():
            for begin in range(0, len(group), batch_size):
                chunk = group[begin : begin + batch_size]
                pixels = torch.stack([_pixels(*jobs[k]) for k in chunk]).to(vae.device, vae.dtype)
                try:
                    posterior = vae.encode(pixels).latent_dist
                except torch.OutOfMemoryError:
                    raise SdtuneError(
                        f"the VAE ran out of memory caching {len(chunk)} images at once; pass a smaller --vae_batch_size"
                    ) from None
                for i, key in enumerate(chunk):
                    entry = (posterior.mean[i].to("cpu", self.dtype).clone(), posterior.std[i].to("cpu", self.dtype).clone())
                    encoded[key] = entry
                    if self.cache_dir is not None:
                        self._write(key, entry)
                progress.update(len(chunk))
        progress.close()
        return encoded

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def _on_disk(self, key: str) -> bool:
        return self.cache_dir is not None and self._path(key).is_file()

    def _write(self, key: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(key).with_suffix(f".tmp{os.getpid()}")
        save_file({"mean": entry[0].contiguous(), "std": entry[1].contiguous()}, str(tmp))
        os.replace(tmp, self._path(key))  # atomic: a killed run never leaves a half-written entry


def _pixels(sample: Sample, flip: bool) -> torch.Tensor:
    return to_tensor(open_rgb(sample.record.read_bytes(), sample.record.name), sample.placement, flip)


class TextEmbeddingCache:
    """Caption → text-encoder outputs (a dict of tensors, e.g. SDXL's hidden states and pooled embedding), for frozen encoders.

    Captions seen at start are encoded once up front; new strings (shuffled tags) are encoded
    on first use and kept, up to ``max_entries``.
    """

    def __init__(self, encode_fn, max_entries: int = 4096):
        self.encode_fn = encode_fn  # list of captions -> {name: [B, ...]}
        self.max_entries = max_entries
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def _encode_rows(self, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        encoded = self.encode_fn(captions)
        return {caption: {name: tensor[i] for name, tensor in encoded.items()} for i, caption in enumerate(captions)}

    def prefill(self, captions: list[str], batch_size: int = 32) -> None:
        todo = sorted(set(captions) - self.entries.keys())
        for begin in range(0, len(todo), batch_size):
            self.entries.update(self._encode_rows(todo[begin : begin + batch_size]))

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.entries]
        fresh = self._encode_rows(missing) if missing else {}
        for caption, rows in fresh.items():
            if len(self.entries) < self.max_entries:
                self.entries[caption] = rows
        rows = [self.entries[c] if c in self.entries else fresh[c] for c in captions]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
