"""Images from a (possibly half-trained) model: validation during training, and `generate`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from sdtune.models import Components


@torch.no_grad()
def sample_images(
    components: Components,
    prompt: str,
    *,
    num_images: int,
    seed: int,
    resolution: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    autocast=None,
) -> list[Image.Image]:
    """``num_images`` images of ``prompt``; image ``i`` uses seed ``seed + i``, so runs are comparable.

    Runs on the components' own modules (adapters included). On CPU it runs in fp32 (autocast to
    bf16 is an order of magnitude slower there); on GPU pass the accelerator's autocast.
    """
    pipe = components.pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    device = components.unet.device
    images = []
    with autocast() if autocast is not None and device.type != "cpu" else nullcontext():
        for i in range(num_images):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            images += pipe(
                prompt, negative_prompt=negative_prompt, height=resolution, width=resolution,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            ).images
    return images


def save_images(images: list[Image.Image], folder: Path, stem: str = "image") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths
