"""Load the pretrained pieces of a Stable Diffusion model: UNet, VAE, text encoder, tokenizer, scheduler."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL, DDPMScheduler, SchedulerMixin, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdtune.conditioning import SDConditioning, TextConditioning, conditioning_for

from sdtune.errors import ModelLoadError
from sdtune.preflight import hub_offline, looks_like_local_path

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


@dataclass
class Components:
    """The pieces a trainer works on. ``fingerprint`` identifies the weights for cache keys.

    ``conditioning`` holds what differs between model families (SD 1.x/2.x vs SDXL): how captions
    become the UNet's inputs. SDXL adds ``text_encoder_2`` and ``tokenizer_2``.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training: DDPM with the base model's schedule
    inference_scheduler: SchedulerMixin  # the base model's own sampler (PNDM for SD 1.5), kept for exports
    prediction_type: str
    fingerprint: str
    source_file: str | None = None  # the single-file checkpoint the model came from, if it did
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    conditioning: TextConditioning = field(default_factory=SDConditioning)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise_scheduler.alphas_cumprod

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, name) for name in self.conditioning.encoder_names]

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [getattr(self, name.replace("text_encoder", "tokenizer")) for name in self.conditioning.encoder_names]

    @property
    def is_sdxl(self) -> bool:
        return self.conditioning.family == "sdxl"

    def pipeline(self, scheduler: SchedulerMixin | None = None, controlnet=None):
        """A pipeline over these very modules (trained weights included), for sampling and export.

        With ``controlnet`` (one ControlNetModel or a list), the family's ControlNet pipeline.
        """
        common = dict(vae=self.vae, unet=self.unet, scheduler=scheduler or self.inference_scheduler)
        if controlnet is not None:
            common["controlnet"] = controlnet
        if self.is_sdxl:
            pipeline_class = StableDiffusionXLControlNetPipeline if controlnet is not None else StableDiffusionXLPipeline
            pipe = pipeline_class(text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                                  tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, **common)
        else:
            pipeline_class = StableDiffusionControlNetPipeline if controlnet is not None else StableDiffusionPipeline
            pipe = pipeline_class(text_encoder=self.text_encoder, tokenizer=self.tokenizer, safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False, **common)
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
    vae_name_or_path: str | None = None,
) -> Components:
    """Load every component from a Hub id, a local diffusers folder or a single checkpoint file.

    The family (SD 1.x/2.x or SDXL) is read from the UNet's config. All components come back
    frozen (``requires_grad=False``) in eval mode; the UNet and text encoders are cast to
    ``weight_dtype``, the VAE too unless that is fp16 (it stays fp32). Methods unfreeze or add
    what they train. ``vae_name_or_path`` replaces the model's VAE (e.g. SDXL's fp16-fixed one).

    Raises:
        ModelLoadError: the model cannot be found, or only pickle weights exist and ``allow_pickle`` is off.
    """
    source = str(pretrained_model_name_or_path)
    with one_line_load_errors("--pretrained_model_name_or_path", source,
                               "pass a diffusers folder, a Hub id or a .safetensors checkpoint"):
        if Path(source).is_file():
            parts = _load_single_file(source, single_file_config, allow_pickle)
        else:
            parts = _load_diffusers_layout(source, revision, variant, allow_pickle)
    if vae_name_or_path:
        with one_line_load_errors("--pretrained_vae_model_name_or_path", vae_name_or_path,
                                   "pass a diffusers VAE folder (with config.json), a Hub id or a .safetensors VAE file", "the VAE"):
            parts["vae"] = _load_vae(vae_name_or_path, revision, allow_pickle)
    if tokenizer_name:
        parts["tokenizer"] = _load_tokenizer(tokenizer_name, revision)

    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = parts.get(name)
        if tokenizer is not None and tokenizer.model_max_length > 1_000_000:  # saved without it: max-length padding breaks
            tokenizer.model_max_length = parts["text_encoder"].config.max_position_embeddings
    scheduler = parts.pop("scheduler")
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    # The VAE overflows in fp16 on SD 2.x/XL; it only runs for caching and validation, so keep it fp32.
    vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
    for name, module in parts.items():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
            dtype = vae_dtype if name == "vae" else weight_dtype
            if module.dtype != dtype:
                module.to(dtype=dtype)
    return Components(
        **parts, noise_scheduler=noise_scheduler, inference_scheduler=scheduler,
        prediction_type=noise_scheduler.config.prediction_type, fingerprint=_fingerprint(parts["vae"]),
        source_file=source if Path(source).is_file() else None, conditioning=conditioning_for(parts["unet"].config),
    )


@contextmanager
def one_line_load_errors(option: str, source: str, advice: str, what: str = "the model"):
    """A missing or unreadable model as one line naming the option, not a loader traceback."""
    if looks_like_local_path(source) and not Path(source).exists():
        raise ModelLoadError(f"{option} {source}: no such file or folder")
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = ("HF_HUB_OFFLINE is set (offline), so a Hub id loads only from the local cache: "
                   if hub_offline() and not looks_like_local_path(source) else "")
        raise ModelLoadError(f"{option} {source}: could not load {what} ({offline}{first_line}); {advice}") from None


def _load_vae(source: str, revision: str | None, allow_pickle: bool) -> AutoencoderKL:
    """A VAE from a folder/Hub id (its own or a model's ``vae/``) or a single file."""
    if Path(source).is_file():
        _refuse_pickle(source, allow_pickle, "--pretrained_vae_model_name_or_path")
        return AutoencoderKL.from_single_file(source)
    subfolder = "vae" if (Path(source) / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=revision,
                                         use_safetensors=None if allow_pickle else True)


def _load_tokenizer(name: str, revision: str | None) -> CLIPTokenizer:
    """--tokenizer_name: a tokenizer folder (or one under ``tokenizer/`` of a model) or Hub id."""
    subfolder = "tokenizer" if (Path(name) / "tokenizer").is_dir() else ""
    try:
        return CLIPTokenizer.from_pretrained(name, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"--tokenizer_name {name}: could not load a CLIP tokenizer ({first_line})") from None


def _load_diffusers_layout(source: str, revision, variant, allow_pickle: bool) -> dict:
    common = dict(revision=revision, variant=variant, use_safetensors=None if allow_pickle else True)
    if Path(source).is_dir():
        _require_safetensors_or_opt_in(Path(source), allow_pickle)
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
    }
    if conditioning_for(parts["unet"].config).family == "sdxl":  # OpenCLIP bigG, whose projection gives the pooled embedding
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **common)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision)
    scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision)
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), DDPMScheduler)
    parts["scheduler"] = scheduler_class.from_config(scheduler_config)
    return parts


def _refuse_pickle(path: str, allow_pickle: bool, option: str) -> None:
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ModelLoadError(f"{option} {path} is a pickle file, which can run code when loaded; "
                             "convert it to .safetensors or pass --allow_pickle if you trust it")


def single_file_family(path: str) -> str:
    """"sdxl", "sdxl_refiner" or "sd", from the keys of an original-layout checkpoint (without loading it)."""
    if not path.endswith(".safetensors"):
        return "sd"  # pickle checkpoints are not opened before the user allows it; diffusers detects them
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl_refiner"  # only OpenCLIP bigG
    return "sd"


def _load_single_file(path: str, config: str | None, allow_pickle: bool) -> dict:
    _refuse_pickle(path, allow_pickle, "--pretrained_model_name_or_path")
    family = single_file_family(path)
    if family == "sdxl_refiner":
        raise ModelLoadError(f"--pretrained_model_name_or_path {path} is an SDXL refiner, which sdtune does not train; "
                             "train the SDXL base and pass the refiner to `sdtune generate --refiner`")
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None}
    try:
        pipe = pipeline_class.from_single_file(path, config=config, **extra) if config else \
            pipeline_class.from_single_file(path, **extra)
    except (OSError, ValueError) as err:  # diffusers fetches the family's configs from the Hub
        if config:
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = "HF_HUB_OFFLINE is set (offline), and " if hub_offline() else ""
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {path}: diffusers reads a single file's configs from the Hub "
            f"({offline}that failed: {first_line[:150]}); pass --single_file_config with a diffusers folder of "
            "the same family (e.g. a local stable-diffusion-v1-5, stable-diffusion-2-1 or stable-diffusion-xl-base-1.0)") from None
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + ["text_encoder_2", "tokenizer_2"] * (family == "sdxl")
    return {name: getattr(pipe, name) for name in names}


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
