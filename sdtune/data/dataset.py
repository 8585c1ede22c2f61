"""Samples (decoded once, placed in a bucket), the training dataset, and the batch order."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import torch

from sdtune.conditioning import size_conditioning
from sdtune.data.captions import augment_caption
from sdtune.data.control_images import check_control_size, control_tensor
from sdtune.data.images import BadImage, Placement, choose_bucket, make_buckets, open_rgb, place, to_tensor
from sdtune.data.sources import ImageRecord
from sdtune.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """A usable training image: its content hash, where it is cropped, and its caption."""

    record: ImageRecord
    image_hash: str
    placement: Placement
    caption: str
    loss_weight: float
    control_hash: str = ""  # ControlNet: content hash of the control map ("" without one)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.placement.size


def prepare_samples(
    records: list[ImageRecord],
    *,
    resolution: int,
    instance_prompt: str | None = None,
    center_crop: bool = False,
    enable_bucket: bool = False,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
    bucket_no_upscale: bool = False,
    seed: int = 0,
    source: str = "the dataset",
) -> list[Sample]:
    """Decode each image once to check it and choose its size and crop; skip bad images with a warning.

    Raises:
        DataError: no usable image remains, or images lack captions and no --instance_prompt is given.
    """
    buckets = make_buckets(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps) if enable_bucket else None
    samples, uncaptioned = [], []
    for record in records:
        try:
            data = record.read_bytes()
            image = open_rgb(data, record.name)
            control_hash = ""
            if record.conditioning is not None:  # ControlNet: the image's control map
                control_data = record.conditioning.read_bytes()
                control = open_rgb(control_data, record.conditioning.name)
                check_control_size(image, control, record.name, record.conditioning.name)
                control_hash = hashlib.sha256(control_data).hexdigest()
        except (BadImage, OSError) as err:
            logger.warning("skipping %s: %s", record.name, err)
            continue
        if min(image.size) < resolution // 4:
            logger.warning("skipping %s: %dx%d is too small for --resolution %d", record.name, *image.size, resolution)
            continue
        caption = record.caption or instance_prompt
        if caption is None:
            uncaptioned.append(record.name)
            continue
        if buckets is not None:
            target = choose_bucket(image.size, buckets, no_upscale=bucket_no_upscale, step=bucket_reso_steps)
        else:
            target = (resolution, resolution)
        image_hash = hashlib.sha256(data).hexdigest()
        # A random crop is drawn once per image (from the seed and the image), so cached latents stay valid.
        placement = place(image.size, target, center_crop=center_crop, rng=random.Random(f"{seed}:{image_hash}"))
        samples.append(Sample(record, image_hash, placement, caption, record.loss_weight, control_hash))
    if uncaptioned:
        raise DataError(
            f"{len(uncaptioned)} image(s) have no caption (first: {uncaptioned[0]}); "
            "add a .txt caption beside each image, pass --instance_prompt, or caption them with --caption_missing"
        )
    if not samples:
        raise DataError(f"{source} has no usable image (looked for {', '.join(('.png', '.jpg', '.webp', '...'))})")
    return samples


class TrainDataset(torch.utils.data.Dataset):
    """Yields one training example per (sample index, epoch).

    Flip and caption augmentation are drawn from (seed, epoch, index), so a resumed run sees
    exactly what an uninterrupted one would. With a latent cache the image is never decoded.
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        latents=None,
        random_flip: bool = False,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_dropout_rate: float = 0.0,
        seed: int = 0,
        caption_transform=None,
    ):
        self.samples = samples
        self.caption_transform = caption_transform  # e.g. textual inversion's templates and multi-vector expansion
        self.latents = latents
        self.random_flip = random_flip
        self.caption_options = dict(shuffle=shuffle_caption, keep_tokens=keep_tokens, dropout_rate=caption_dropout_rate)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        flip = self.random_flip and rng.random() < 0.5
        caption = self.caption_transform(sample.caption, rng) if self.caption_transform else sample.caption
        example = {
            "caption": augment_caption(caption, rng, **self.caption_options),
            "loss_weight": torch.tensor(sample.loss_weight, dtype=torch.float32),
            # SDXL's add_time_ids: a function of the placement and flip, which also key the cached latents
            "time_ids": size_conditioning(sample.placement, flip),
        }
        if self.latents is not None:
            example["latent_mean"], example["latent_std"] = self.latents.get(sample, flip)
        else:
            image = open_rgb(sample.record.read_bytes(), sample.record.name)
            example["pixel_values"] = to_tensor(image, sample.placement, flip)
        control = sample.record.conditioning
        if control is not None:
            example["conditioning_pixel_values"] = control_tensor(open_rgb(control.read_bytes(), control.name), sample.placement, flip)
        return example


def collate(examples: list[dict]) -> dict:
    batch = {"caption": [e["caption"] for e in examples]}
    for key in examples[0]:
        if key != "caption":
            batch[key] = torch.stack([e[key] for e in examples])
    return batch


class BucketBatchSampler:
    """An endless, deterministic order of batches that never mixes bucket sizes.

    Each epoch shuffles every bucket with (seed, epoch), cuts it into *global* batches of
    ``batch_size * num_processes`` (a short last batch is filled from the bucket's start), and
    shuffles the batch order. Process ``p`` takes slice ``p`` of every global batch. So N
    processes with batch size B see the same global batches as one process with N*B, and a
    resumed run restarts at the exact next batch (``start``), not at the epoch boundary.

    ``companions`` (class images for prior preservation) ride along: each batch of B primary
    samples gets B companions too, taken in order from a shuffled cycle of the companion pool.
    Epochs count primary samples only, as in the diffusers DreamBooth scripts.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, *, num_processes: int = 1,
                 process_index: int = 0, seed: int = 0, companions: list[int] | None = None):
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.companions = companions or []
        self._companion_orders: dict[int, list[int]] = {}
        primary = set(range(len(buckets))) - set(self.companions)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in sorted(primary):
            groups[buckets[index]].append(index)
        self.groups = [groups[b] for b in sorted(groups)]
        global_batch = batch_size * num_processes
        self.batches_per_epoch = sum(-(-len(g) // global_batch) for g in self.groups)
        self.start = 0

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:order:{epoch}")
        size = self.batch_size * self.num_processes
        batches = []
        for group in self.groups:
            order = group[:]
            rng.shuffle(order)
            for begin in range(0, len(order), size):
                batch = order[begin : begin + size]
                while len(batch) < size:  # fill from the start so every process gets a full batch
                    batch += order[: size - len(batch)]
                batches.append(batch)
        rng.shuffle(batches)
        return batches

    def companion_batch(self, number: int) -> list[int]:
        """Companions of global batch ``number`` (counted from the start of training)."""
        size = self.batch_size * self.num_processes
        picked = []
        for position in range(number * size, (number + 1) * size):
            cycle, offset = divmod(position, len(self.companions))
            picked.append(self._companion_order(cycle)[offset])
        return picked

    def _companion_order(self, cycle: int) -> list[int]:
        """The shuffled companion pool of ``cycle``, shuffled once rather than once per pick."""
        if cycle not in self._companion_orders:
            order = self.companions[:]
            random.Random(f"{self.seed}:companions:{cycle}").shuffle(order)
            self._companion_orders = {cycle: order}  # batches move forward: only the current cycle is reused
        return self._companion_orders[cycle]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        number = self.start
        lo, hi = self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size
        while True:
            for batch in self.global_batches(epoch)[offset:]:
                local = batch[lo:hi] + (self.companion_batch(number)[lo:hi] if self.companions else [])
                yield [(index, epoch) for index in local]
                number += 1
            epoch, offset = epoch + 1, 0
