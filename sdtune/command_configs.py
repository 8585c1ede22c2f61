"""Configs of the commands that do not train: generate and push (no torch import, so --help stays fast)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from sdtune.config import check_type, option

SCHEDULERS = ("ddim", "pndm", "euler", "euler-a", "heun", "lms", "lms-karras", "dpm++2m", "dpm++2m-karras",
              "dpm++2m-sde", "dpm++2m-sde-karras", "unipc")


@dataclass(frozen=True)
class GenerateConfig:
    """`sdtune generate`: images from a base model plus any trained LoRA, embeddings or DreamBooth folder."""

    pretrained_model_name_or_path: str | None = option(
        None, "Base model: a Hub id, a diffusers folder (a DreamBooth output too) or a single .safetensors file.")
    single_file_config: str | None = option(None, "For a single-file checkpoint: a diffusers folder or Hub id describing it.")
    revision: str | None = option(None, "Hub revision of the base model.")
    variant: str | None = option(None, "Weight variant of the base model files, e.g. fp16.")
    allow_pickle: bool = option(False, "Allow loading pickle weights (.bin/.ckpt). Only for files you trust.")
    lora: str | None = option(None, "A LoRA: an sdtune output folder, or a diffusers or kohya .safetensors file.")
    lora_scale: float = option(1.0, "Strength of the LoRA.")
    embedding: str | None = option(None, "Textual-inversion embedding file(s) or folder(s), comma-separated.")
    prompt: str | None = option(None, "The prompt.")
    prompts_file: str | None = option(None, "A text file with one prompt per line (instead of --prompt).")
    negative_prompt: str | None = option(None, "What the images should not show.")
    num_images: int = option(1, "Images per prompt.")
    scheduler: str = option("dpm++2m-karras", "Sampler: " + ", ".join(SCHEDULERS) + ".", choices=SCHEDULERS)
    num_inference_steps: int = option(25, "Denoising steps.")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.")
    seed: int = option(0, "Seed of the first image; image i uses seed + i.")
    height: int | None = option(None, "Image height (default: the model's native size).")
    width: int | None = option(None, "Image width (default: the model's native size).")
    init_image: str | None = option(None, "img2img: start from this image.")
    strength: float = option(0.6, "img2img: how much of the init image is replaced (0 keeps it, 1 ignores it).")
    output_dir: str = option("samples", "Where the PNGs (with their settings in the metadata) and the grid go.")
    grid: bool = option(True, "Also write a contact sheet grid.png.")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "Precision on GPU (CPU always runs fp32).")

    method: typing.ClassVar[str] = "generate"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))
        for name in ("num_images", "num_inference_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class PushConfig:
    """`sdtune push DIR`: upload a finished output folder to the Hugging Face Hub."""

    folder: str | None = option(None, "The output folder to upload.")
    repo_id: str | None = option(None, "Model repository, e.g. me/sks-dog-lora (created if missing).")
    private: bool = option(False, "Create the repository private.")
    revision: str | None = option(None, "Branch to upload to (created if missing; default: main).")
    commit_message: str = option("Upload with sdtune", "Commit message.")

    method: typing.ClassVar[str] = "push"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
