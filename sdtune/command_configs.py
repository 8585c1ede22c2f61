"""Configs of the commands that do not train: generate, push, caption (no torch import, so --help stays fast)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from sdtune.options import check_type, option
from sdtune.errors import ConfigError

DEFAULT_CAPTION_MODEL = "Salesforce/blip2-opt-2.7b"

SCHEDULERS = ("ddim", "pndm", "euler", "euler-a", "heun", "lms", "lms-karras", "dpm++2m", "dpm++2m-karras",
              "dpm++2m-sde", "dpm++2m-sde-karras", "unipc")


@dataclass(frozen=True)
class PipelineOptions:
    """What to sample from: a base model plus a trained LoRA or embeddings, and the sampler (generate and eval)."""

    pretrained_model_name_or_path: str | None = option(
        None, "Base model: a Hub id, a diffusers folder (a DreamBooth output too) or a single .safetensors file.")
    single_file_config: str | None = option(None, "For a single-file checkpoint: a diffusers folder or Hub id describing it.")
    revision: str | None = option(None, "Hub revision of the base model.")
    variant: str | None = option(None, "Weight variant of the base model files, e.g. fp16.")
    allow_pickle: bool = option(False, "Allow loading pickle weights (.bin/.ckpt). Only for files you trust.")
    pretrained_vae_model_name_or_path: str | None = option(None, "A VAE to use instead of the model's (Hub id, folder or .safetensors).")
    lora: str | None = option(None, "A LoRA: an sdtune output folder, or a diffusers or kohya .safetensors file.")
    lora_scale: float = option(1.0, "Strength of the LoRA.")
    embedding: str | None = option(None, "Textual-inversion embedding file(s) or folder(s), comma-separated.")
    negative_prompt: str | None = option(None, "What the images should not show.")
    scheduler: str = option("dpm++2m-karras", "Sampler: " + ", ".join(SCHEDULERS) + ".", choices=SCHEDULERS)
    num_inference_steps: int = option(25, "Denoising steps.")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.")
    seed: int = option(0, "Seed of the first image; image i uses seed + i.")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "Precision on GPU (CPU always runs fp32).")


@dataclass(frozen=True)
class GenerateConfig(PipelineOptions):
    """`sdtune generate`: images from a base model plus any trained LoRA, embeddings or DreamBooth folder."""

    prompt: str | None = option(None, "The prompt.")
    prompts_file: str | None = option(None, "A text file with one prompt per line (instead of --prompt).")
    num_images: int = option(1, "Images per prompt.")
    height: int | None = option(None, "Image height (default: the model's native size).")
    width: int | None = option(None, "Image width (default: the model's native size).")
    init_image: str | None = option(None, "img2img: start from this image.")
    strength: float = option(0.6, "img2img: how much of the init image is replaced (0 keeps it, 1 ignores it).")
    output_dir: str = option("samples", "Where the PNGs (with their settings in the metadata) and the grid go.")
    grid: bool = option(True, "Also write a contact sheet grid.png.")
    controlnet: str | None = option(None, "ControlNet(s): folder, Hub id or .safetensors file; comma-separated for several.")
    control_image: str | None = option(None, "The image each --controlnet follows (comma-separated, one per ControlNet).")
    control_type: str = option("none", "How --control_image becomes a control map: canny (edges, needs sdtune[controlnet]) "
                                       "or none (it is one already); comma-separated to give each ControlNet its own.")
    controlnet_conditioning_scale: str = option("1.0", "Strength of each ControlNet (comma-separated, one per ControlNet).")
    canny_low_threshold: int = option(100, "--control_type canny: edges weaker than this are dropped.")
    canny_high_threshold: int = option(200, "--control_type canny: edges stronger than this are kept.")
    refiner: str | None = option(None, "SDXL: a refiner (Hub id, folder or .safetensors) that finishes the last denoising steps.")
    refiner_start: float = option(0.8, "SDXL with --refiner: the fraction of denoising the base does before the refiner takes over.")

    method: typing.ClassVar[str] = "generate"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))
        for name in ("num_images", "num_inference_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")
        if not 0.0 < self.refiner_start < 1.0:
            raise ValueError(f"refiner_start must be between 0 and 1, got {self.refiner_start}")
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


@dataclass(frozen=True)
class CaptionConfig:
    """Options of `sdtune caption` (and of captioning missing captions before training)."""

    data_dir: str | None = option(None, "Image folder to caption (searched recursively).")
    model: str = option(DEFAULT_CAPTION_MODEL, "Captioning model: a Hub id or a local folder (BLIP-2, BLIP or InstructBLIP).")
    prompt: str | None = option(
        None, "Conditioning prompt, e.g. 'a photo of' (InstructBLIP: the instruction; default: a captioning instruction)."
    )
    prefix: str = option("", "Text put before every caption, e.g. 'photo of sks dog,' (a space is added).")
    suffix: str = option("", "Text put after every caption, e.g. ', high quality'.")
    batch_size: int = option(8, "Images per generate call.")
    max_new_tokens: int = option(40, "Longest caption, in tokens.")
    num_beams: int = option(1, "Beam-search width (1: greedy).")
    min_length: int = option(0, "Shortest caption, in generated tokens.")
    output_format: Literal["txt", "jsonl"] = option(
        "txt", "txt: a caption file beside each image (kohya); jsonl: metadata.jsonl (HF imagefolder)."
    )
    caption_extension: str = option(".txt", "Extension of caption files beside images.")
    overwrite: bool = option(False, "Also recaption images that have a caption (default: skip them, which resumes a killed run).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "Model dtype on a GPU (default: accelerate's setting, else fp16). A CPU always runs fp32."
    )
    load_in_8bit: bool = option(False, "Load the model in 8 bits (bitsandbytes, CUDA only).")
    load_in_4bit: bool = option(False, "Load the model in 4 bits (bitsandbytes, CUDA only).")
    allow_pickle: bool = option(False, "Allow loading pickle weights (.bin). Only for files you trust.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.min_length < 0 or self.min_length > self.max_new_tokens:
            raise ConfigError(f"--min_length must be between 0 and --max_new_tokens ({self.max_new_tokens}), "
                              f"got {self.min_length}")
        for name, choices in (("output_format", ("txt", "jsonl")), ("mixed_precision", ("no", "fp16", "bf16", None))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{name} must be one of {', '.join(map(str, choices))}, got {getattr(self, name)!r}")
        if not self.data_dir or not self.model:
            raise ConfigError("--data_dir and --model must not be empty")
        if not self.caption_extension.startswith("."):
            raise ConfigError(f"--caption_extension must start with a dot, e.g. .txt, got {self.caption_extension!r}")
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("--load_in_8bit and --load_in_4bit exclude each other; pick one")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DemoConfig:
    """`sdtune demo`: the offline toy world, taught with four methods, measured by a judge."""

    output_dir: str = option("sdtune-demo", "Where the data, trained outputs, grids and metrics.json go.")
    quick: bool = option(False, "Judge fewer samples: the same training in about half the time, with noisier figures.")
    seed: int = option(0, "Seed of the data, the training runs and the evaluation samples.")
    base_model: str | None = option(None, "Toy base model folder (default: the one shipped with sdtune).")
    controlnet: bool = option(False, "Instead: train a ControlNet on masks of the toy world and measure how well the base "
                                     "then puts shapes where a mask says (controlnet.png, metrics.json).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EVAL_METRICS = ("clip_t", "clip_i", "dino", "fid", "kid", "prior_drift", "toy")
FEATURE_KINDS = ("inception", "clip", "dino", "judge")


@dataclass(frozen=True)
class EvalConfig(PipelineOptions):
    """`sdtune eval`: measure a fine-tune (LoRA, embeddings, DreamBooth folder or every checkpoint of a run)."""

    checkpoints: str | None = option(
        None, "A training run's output folder: evaluate every checkpoint-N in it (and the final output) and write the "
              "metrics against the step (metrics_by_step.csv and .png), to see which step to keep.")
    reference_model: str | None = option(
        None, "The model before fine-tuning, for prior_drift and the toy prior_preservation, when "
              "--pretrained_model_name_or_path is itself a fine-tune (default: the base without --lora/--embedding).")
    prompts: str | None = option(None, "The prompts to sample: a text file with one prompt per line.")
    prompt: str | None = option(None, "One prompt to sample (instead of --prompts).")
    num_images: int = option(8, "Images per prompt (and of --class_prompt), seeds seed..seed+N-1 for every model.")
    instance_data_dir: str | None = option(None, "The training images: clip_i and dino compare the samples with them.")
    reference_dir: str | None = option(None, "Images fid and kid compare the samples with (default: --instance_data_dir).")
    class_prompt: str | None = option(None, "prior_drift: the class prompt, sampled from the fine-tune and the reference model.")
    metrics: str = option(
        "auto", "Comma-separated: " + ", ".join(EVAL_METRICS) + ". toy: the toy world's judge figures (subject, context, "
                "prior preservation, drift; needs --toy_concept). auto: every metric whose inputs are given (not fid/kid).")
    clip_model: str = option("openai/clip-vit-large-patch14", "CLIP for clip_t and clip_i (Hub id or folder).")
    dino_model: str = option("facebook/dino-vits16", "DINO ViT for dino and prior_drift (Hub id or folder).")
    fid_features: str = option(
        "inception", "Features of fid and kid: inception (the standard; needs sdtune[fid]), clip, dino, or judge (the toy "
                     "world's judge: offline, but not comparable with published FIDs).", choices=FEATURE_KINDS)
    drift_features: str = option("dino", "Features prior_drift compares the class images with: dino, clip or judge.",
                                 choices=("dino", "clip", "judge"))
    toy_concept: str | None = option(None, "toy metric: which concept of `sdtune demo` the model learned, a (the star as "
                                           "'xon triangle') or b (the green square as '<gsq>').", choices=("a", "b", None))
    toy_samples: int = option(96, "toy metric: images per figure (subject, context, prior).")
    batch_size: int = option(8, "Images per pipeline call.")
    output_dir: str = option("eval", "Where metrics.json, the images, the grid (and the step table and plot) go.")
    cache_dir: str | None = option(None, "Where the reference model's samples and figures are kept between runs "
                                         "(default: OUTPUT_DIR/reference-cache).")

    method: typing.ClassVar[str] = "eval"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))
        for name in ("num_images", "num_inference_steps", "toy_samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        unknown = [m for m in self.metric_names() if m not in EVAL_METRICS]
        if unknown and self.metrics != "auto":
            raise ConfigError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(EVAL_METRICS)} or auto")

    def metric_names(self) -> list[str]:
        """The metrics asked for; ``auto``: those whose inputs are given (fid/kid need --reference_dir)."""
        if self.metrics != "auto":
            return [m.strip() for m in self.metrics.split(",") if m.strip()]
        prompts = bool(self.prompts or self.prompt)
        chosen = ["clip_t"] if prompts else []
        chosen += ["clip_i", "dino"] if prompts and self.instance_data_dir else []
        chosen += ["fid", "kid"] if prompts and self.reference_dir else []
        chosen += ["prior_drift"] if self.class_prompt else []
        chosen += ["toy"] if self.toy_concept else []
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}
