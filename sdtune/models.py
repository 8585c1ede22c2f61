"""Load the pretrained pieces of a Stable Diffusion model: UNet, VAE, text encoder, tokenizer, scheduler."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.errors import ModelLoadError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


@dataclass
class Components:
    """The pieces a trainer works on. ``fingerprint`` identifies the weights for cache keys."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training: DDPM with the base model's schedule
    inference_scheduler: SchedulerMixin  # the base model's own sampler (PNDM for SD 1.5), kept for exports
    prediction_type: str
    fingerprint: str
    source_file: str | None = None  # the single-file checkpoint the model came from, if it did

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise_scheduler.alphas_cumprod

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A pipeline over these very modules (trained weights included), for sampling and export."""
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.inference_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_components(
    pretrained_model_name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    weight_dtype: torch.dtype = torch.float32,
    tokenizer_name: str | None = None,
) -> Components:
    """Load every component from a Hub id, a local diffusers folder or a single checkpoint file.

    All components come back frozen (``requires_grad=False``) in eval mode; the UNet, VAE and text
    encoder are cast to ``weight_dtype``. Methods unfreeze or add what they train.

    Raises:
        ModelLoadError: the model cannot be found, or only pickle weights exist and ``allow_pickle`` is off.
    """
    source = str(pretrained_model_name_or_path)
    if _looks_like_local_path(source) and not Path(source).exists():
        raise ModelLoadError(f"--pretrained_model_name_or_path {source}: no such file or folder")
    try:
        if Path(source).is_file():
            parts = _load_single_file(source, single_file_config, allow_pickle)
        else:
            parts = _load_diffusers_layout(source, revision, variant, allow_pickle)
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {source}: could not load the model ({first_line}); "
            "pass a diffusers folder, a Hub id or a .safetensors checkpoint"
        ) from None
    unet, vae, text_encoder, tokenizer, scheduler = parts
    if tokenizer_name:
        tokenizer = _load_tokenizer(tokenizer_name, revision)

    if tokenizer.model_max_length > 1_000_000:  # tokenizers saved without it break max-length padding
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    # The VAE overflows in fp16 on SD 2.x/XL; it only runs for caching and validation, so keep it fp32.
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
    for module, dtype in ((unet, weight_dtype), (vae, vae_dtype), (text_encoder, weight_dtype)):
        module.requires_grad_(False)
        module.eval()
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=noise_scheduler,
        inference_scheduler=scheduler, prediction_type=noise_scheduler.config.prediction_type, fingerprint=_fingerprint(vae),
        source_file=source if Path(source).is_file() else None,
    )


def _load_tokenizer(name: str, revision: str | None) -> CLIPTokenizer:
    """--tokenizer_name: a tokenizer folder (or one under ``tokenizer/`` of a model) or Hub id."""
    subfolder = "tokenizer" if (Path(name) / "tokenizer").is_dir() else ""
    try:
        return CLIPTokenizer.from_pretrained(name, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"--tokenizer_name {name}: could not load a CLIP tokenizer ({first_line})") from None


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a path on disk."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _load_diffusers_layout(source: str, revision, variant, allow_pickle: bool):
    common = dict(revision=revision, variant=variant)
    use_safetensors = None if allow_pickle else True
    if Path(source).is_dir():
        _require_safetensors_or_opt_in(Path(source), allow_pickle)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=use_safetensors, **common)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=use_safetensors, **common)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=use_safetensors, **common)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
    scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision)
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), DDPMScheduler)
    return unet, vae, text_encoder, tokenizer, scheduler_class.from_config(scheduler_config)


def _load_single_file(path: str, config: str | None, allow_pickle: bool):
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {path} is a pickle file, which can run code when loaded; "
            "convert it to .safetensors or pass --allow_pickle if you trust it"
        )
    if config:
        pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None, config=config)
    else:
        try:
            pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None)
        except (OSError, ValueError) as err:  # diffusers fetches the family's configs from the Hub
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            offline = "HF_HUB_OFFLINE is set, and " if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") else ""
            raise ModelLoadError(
                f"--pretrained_model_name_or_path {path}: diffusers reads a single file's configs from the Hub "
                f"({offline}that failed: {first_line[:150]}); pass --single_file_config with a diffusers folder of "
                "the same family (e.g. a local stable-diffusion-v1-5 or stable-diffusion-2-1)") from None
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler


def _require_safetensors_or_opt_in(folder: Path, allow_pickle: bool) -> None:
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    if weights and not allow_pickle and not any(p.suffix == ".safetensors" for p in weights):
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {folder} holds only pickle weights (.bin), which can run code when "
            "loaded; convert them to safetensors or pass --allow_pickle if you trust them"
        )


def _fingerprint(vae: AutoencoderKL) -> str:
    """Identify the VAE by its config and weights (about 0.3 s for SD's 84M parameters), wherever it was loaded from."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for p in vae.state_dict().values():
        digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for CLIP). [B, 77]"""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state SD conditions on. [B, 77, D]"""
    return text_encoder(input_ids)[0]
