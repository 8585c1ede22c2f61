"""From a config and a folder to the training batches: samples (instance + class), latent cache, order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.config import TrainConfig
from sdtune.data.cache import LatentCache
from sdtune.data.class_images import class_records
from sdtune.data.dataset import BucketBatchSampler, Sample, TrainDataset, collate, prepare_samples
from sdtune.data.sources import ImageRecord
from sdtune.models import Components


@dataclass
class TrainingData:
    samples: list[Sample]  # instance samples first, then class samples
    num_instance: int
    sampler: BucketBatchSampler
    dataloader: torch.utils.data.DataLoader


def build_training_data(
    config: TrainConfig, records: list[ImageRecord], components: Components, accelerator, *,
    default_caption: str | None = None, caption_transform=None,
) -> TrainingData:
    """Decode and place every image, cache its latents (sharded across processes), and order the batches."""
    placement = dict(
        resolution=config.resolution, center_crop=config.center_crop, enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso, max_bucket_reso=config.max_bucket_reso,
        bucket_reso_steps=config.bucket_reso_steps, bucket_no_upscale=config.bucket_no_upscale, seed=config.seed,
    )
    samples = prepare_samples(records, instance_prompt=config.instance_prompt or default_caption,
                              source=config.instance_data_dir or config.train_data_dir or config.dataset_name, **placement)
    num_instance = len(samples)
    if config.with_prior_preservation:  # class images: data with their own loss weight
        samples += prepare_samples(
            class_records(config.class_data_dir, config.class_prompt, config.num_class_images, config.prior_loss_weight),
            source=config.class_data_dir, **placement)
    latents = None
    if config.cache_latents:
        latents = LatentCache(fingerprint=components.fingerprint, dtype=components.vae.dtype,
                              resolution=config.resolution, cache_dir=config.cache_dir)
        flips = (False, True) if config.random_flip else (False,)
        latents.build(samples, flips, components.vae, accelerator, config.vae_batch_size)
    dataset = TrainDataset(
        samples, latents=latents, random_flip=config.random_flip, shuffle_caption=config.shuffle_caption,
        keep_tokens=config.keep_tokens, caption_dropout_rate=config.caption_dropout_rate, seed=config.seed,
        caption_transform=caption_transform,
    )
    sampler = BucketBatchSampler(
        [s.bucket for s in samples], config.train_batch_size, num_processes=accelerator.num_processes,
        process_index=accelerator.process_index, seed=config.seed, companions=list(range(num_instance, len(samples))),
    )
    # Not passed to accelerator.prepare: the sampler already gives each process its slice of
    # every global batch, which makes N processes equal one and resume exact.
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    return TrainingData(samples, num_instance, sampler, dataloader)
