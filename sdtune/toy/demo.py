"""`sdtune demo`: the offline quickstart. Builds a tiny model and a toy dataset, trains a LoRA,
loads the result back in diffusers and writes a before/after image grid."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from sdtune.config import LoRAConfig
from sdtune.sampling import make_grid
from sdtune.toy.shapes import render_shape_dataset
from sdtune.toy.tiny_model import build_tiny_model

logger = logging.getLogger(__name__)

PROMPT = "a sks shape"


def run_demo(output_dir: str | Path = "sdtune-demo", *, max_train_steps: int = 200, seed: int = 0):
    from sdtune.api import train_lora

    output_dir = Path(output_dir)
    base = output_dir / "base-model"
    if not (base / "model_index.json").is_file():
        build_tiny_model(base, seed=seed)
    data = render_shape_dataset(output_dir / "data", num_images=16, caption=PROMPT, seed=seed)
    config = LoRAConfig(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(data), output_dir=str(output_dir / "lora"),
        resolution=64, rank=8, learning_rate=1e-3, max_train_steps=max_train_steps, train_batch_size=4,
        random_flip=True, checkpointing_steps=max(1, max_train_steps // 2), seed=seed, report_to="tensorboard",
    )
    result = train_lora(config)
    grid = output_dir / "before_after.png"
    _before_after_grid(base, result.output_dir, grid, seed=seed)
    first, last = result.loss_history[:10], result.loss_history[-10:]
    print(f"demo: trained {result.global_step} steps; mean loss first 10 steps {sum(first) / len(first):.4f}, "
          f"last 10 steps {sum(last) / len(last):.4f}")
    print(f"demo: LoRA (diffusers) {result.outputs['diffusers']}\ndemo: LoRA (kohya/A1111) {result.outputs['kohya']}")
    print(f"demo: before/after grid {grid}")
    return result


def _before_after_grid(base: Path, lora_dir: Path, path: Path, seed: int, n: int = 4) -> None:
    """Top row: the base model; bottom row: with the LoRA loaded through diffusers' own loader."""
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for with_lora in (False, True):
        if with_lora:
            pipe.load_lora_weights(lora_dir)
        generator = torch.Generator().manual_seed(seed)
        rows.append(pipe([PROMPT] * n, num_inference_steps=20, height=64, width=64, generator=generator).images)
    make_grid(rows[0] + rows[1], columns=n).save(path)
