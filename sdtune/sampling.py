"""Images from a (possibly half-trained) model: validation during training, and `generate`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from sdtune.models import Components


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    generators: list[torch.Generator],
    *,
    resolution: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    autocast=None,
) -> list[Image.Image]:
    """One image per (prompt, generator), in one pipeline call.

    On CPU this runs in fp32 (autocast to bf16 is an order of magnitude slower there); on GPU
    pass the accelerator's autocast, since trained fp32 adapters sit on fp16/bf16 weights.
    """
    device = pipe.unet.device
    with autocast() if autocast is not None and device.type != "cpu" else nullcontext():
        return pipe(
            prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            height=resolution, width=resolution, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generators,
        ).images


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
    """``num_images`` validation images of ``prompt`` from the model being trained (adapters included).

    Image ``i`` uses seed ``seed + i``, so images of different steps are comparable.
    """
    pipe = components.pipeline(scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config))
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    return generate(pipe, [prompt] * num_images, generators, resolution=resolution, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, negative_prompt=negative_prompt, autocast=autocast)


def save_images(images: list[Image.Image], folder: Path, stem: str = "image") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths
