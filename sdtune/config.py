"""Training configs: frozen dataclasses, filled from a recipe YAML and command-line flags.

Field names are the diffusers example scripts' flag names wherever the concept is the same,
so a `train_dreambooth_lora.py` command line works after swapping the program name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sdtune.errors import ConfigError
from sdtune.options import check_type, option


@dataclass(frozen=True)
class TrainConfig:
    """Options every trainer shares: model, data, cache, optimisation, checkpoints, logging."""

    # --- model -------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = option(
        None, "Base model: a Hub id, a local diffusers folder, or a single .safetensors checkpoint."
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: str | None = option(None, "Weight variant of the base model files, e.g. fp16.")
    single_file_config: str | None = option(
        None, "For a single-file checkpoint: a diffusers folder or Hub id whose configs describe it (default: inferred)."
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = option(
        None, "Override the prediction type read from the scheduler config (SD 2.x 768 px models use v_prediction)."
    )
    allow_pickle: bool = option(False, "Allow loading pickle weights (.bin/.ckpt/.pt). Only for files you trust.")
    tokenizer_name: str | None = option(None, "A tokenizer (Hub id or folder) to use instead of the base model's.")
    pretrained_vae_model_name_or_path: str | None = option(
        None, "A VAE to use instead of the base model's (e.g. madebyollin/sdxl-vae-fp16-fix): Hub id, folder or .safetensors; "
              "'none' keeps the base model's own (e.g. to run an SDXL recipe offline).")

    # --- data ----------------------------------------------------------------------------
    instance_data_dir: str | None = option(
        None, "Image folder: captions as .txt beside each image (kohya), or a metadata.jsonl (HF imagefolder)."
    )
    train_data_dir: str | None = option(None, "Same as --instance_data_dir (the name diffusers' text-to-image and textual-inversion scripts use).")
    dataset_name: str | None = option(None, "A `datasets` dataset (Hub id or local path) instead of a folder.")
    dataset_config_name: str | None = option(None, "Config name of --dataset_name.")
    image_column: str = option("image", "Image column of --dataset_name.")
    caption_column: str = option("text", "Caption column of --dataset_name or metadata.jsonl.")
    caption_extension: str = option(".txt", "Extension of caption files beside images.")
    instance_prompt: str | None = option(None, "Caption for images that have none (e.g. 'a photo of sks dog').")
    caption_missing: bool = option(False, "Caption images that have no caption with --caption_model before training (written beside them).")
    caption_model: str = option("Salesforce/blip2-opt-2.7b", "BLIP-2 / BLIP / InstructBLIP model for --caption_missing.")
    resolution: int = option(512, "Training resolution (square side, or bucket area side with --enable_bucket).")
    center_crop: bool = option(False, "Crop the centre (default: a random crop, chosen once per image when latents are cached).")
    random_flip: bool = option(False, "Flip images horizontally at random (both flips are cached).")
    enable_bucket: bool = option(False, "Aspect-ratio bucketing: train each image at the bucket closest to its aspect.")
    min_bucket_reso: int = option(256, "Smallest bucket side.")
    max_bucket_reso: int = option(1024, "Largest bucket side.")
    bucket_reso_steps: int = option(64, "Bucket sides are multiples of this.")
    bucket_no_upscale: bool = option(False, "Never upscale: small images get a bucket no larger than themselves.")
    shuffle_caption: bool = option(False, "Shuffle comma-separated caption tags each time a caption is used.")
    keep_tokens: int = option(0, "With --shuffle_caption, keep this many leading tags in place (e.g. the trigger word).")
    caption_dropout_rate: float = option(0.0, "Probability of training a sample with an empty caption.")
    cache_dir: str | None = option(None, "Cache latents on disk here (default: in memory). Entries are keyed by content.")
    cache_latents: bool = option(True, "Encode each image with the VAE once and reuse the latents.")
    cache_text_embeddings: bool = option(True, "Encode each caption once when the text encoder is frozen.")
    vae_batch_size: int = option(4, "Images per VAE call while caching.")
    dataloader_num_workers: int = option(0, "Data loader worker processes.")
    max_train_samples: int | None = option(None, "Train on a seeded random subset of this many images (for quick runs).")
    repeats: int = option(1, "Passes over the images that make one epoch (for --num_train_epochs and --validation_epochs).")

    # --- new tokens (textual inversion, pivotal tuning) -------------------------------------
    placeholder_token: str | None = option(None, "New token to learn, e.g. '<cat-toy>'; put it in captions or --instance_prompt.")
    initializer_token: str | None = option(None, "A one-token word whose embedding starts the new token's (e.g. 'toy').")
    num_vectors: int = option(1, "Vectors per new token: <tok>, <tok>_1, ...; prompts with <tok> use them all.")

    # --- prior preservation (DreamBooth): class images are data with their own loss weight ----
    with_prior_preservation: bool = option(False, "Train on class images too, to keep the model's prior of the class.")
    class_data_dir: str | None = option(None, "Folder of class images; missing ones are generated with the base model.")
    class_prompt: str | None = option(None, "Prompt of the class images (e.g. 'a photo of dog').")
    num_class_images: int = option(100, "Class images wanted; generated if the folder holds fewer.")
    prior_loss_weight: float = option(1.0, "Weight of the class images' loss.")
    sample_batch_size: int = option(4, "Batch size when generating class images.")
    class_generation_steps: int = option(25, "Denoising steps per generated class image.")

    # --- optimisation ----------------------------------------------------------------------
    output_dir: str = option("sdtune-output", "Where checkpoints, exports, logs and the resolved config go.")
    seed: int = option(0, "Seed for model init, data order, noise and timesteps.")
    train_batch_size: int = option(1, "Batch size per device.")
    gradient_accumulation_steps: int = option(1, "Batches accumulated per optimizer step.")
    max_train_steps: int = option(1000, "Optimizer steps to train for.")
    num_train_epochs: int | None = option(
        None, "Train this many epochs instead of --max_train_steps (steps computed from the dataset size; "
              "both on the command line: --max_train_steps wins, as in diffusers).")
    learning_rate: float = option(1e-4, "Learning rate.")
    scale_lr: bool = option(False, "Multiply the learning rate by accumulation steps x batch size x processes.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("constant", "Learning-rate schedule.")
    lr_warmup_steps: int = option(0, "Warmup steps of the schedule.")
    lr_num_cycles: int = option(1, "Hard restarts of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = option(
        "adamw", "adamw (torch), adamw8bit (bitsandbytes, CUDA only) or prodigy (needs prodigyopt; use --learning_rate 1.0)."
    )
    adam_beta1: float = option(0.9, "Adam beta1.")
    adam_beta2: float = option(0.999, "Adam beta2.")
    adam_weight_decay: float = option(1e-2, "Weight decay.")
    adam_epsilon: float = option(1e-8, "Adam epsilon.")
    fused_optimizer: bool | None = option(
        None, "AdamW's fused kernel: one kernel updates every parameter (torch 2.4+ on the CPU). Default: on when "
        "training on the CPU with torch 2.4+ (SD 1.5's UNet updated in 0.5 s instead of 1.7-3.2 s), torch's choice on GPUs.",
        default_text="auto")
    max_grad_norm: float = option(1.0, "Clip gradients to this norm (0 turns clipping off).")
    set_grads_to_none: bool = option(True, "Free gradients after each step instead of zeroing them (saves memory).")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = option(
        None, "no / fp16 / bf16 / auto (bf16 or fp16 on GPUs, bf16 on CPUs with AMX, else no; default: what `accelerate config` set). Trained weights stay fp32."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    allow_tf32: bool = option(False, "Allow TF32 matmuls on Ampere and newer GPUs (faster, slightly less precise).")
    compile: bool = option(False, "torch.compile the UNet's repeated blocks (each block type compiles once; cached across runs).")
    channels_last: bool = option(False, "Keep the UNet's weights and activations channels-last (faster convolutions on many devices).")
    num_threads: int | None = option(
        None, "CPU threads of torch in each process (default: OMP_NUM_THREADS if set, else the cores this process may "
              "use, by affinity and cgroup quota, divided by the processes on this machine).")
    reuse_host_memory: bool = option(True, "Training on the CPU (Linux): keep freed activation memory for the next step instead of returning it to the OS (~15% faster steps, same peak memory).")
    snr_gamma: float | None = option(None, "Min-SNR weighting gamma (5.0 is the paper's value). Off by default.")
    noise_offset: float = option(0.0, "Noise offset strength (e.g. 0.05); 0 turns it off.")

    # --- checkpoints, validation, logging -----------------------------------------------------
    checkpointing_steps: int = option(500, "Save a resumable checkpoint every N steps (0: never).")
    checkpoints_total_limit: int | None = option(None, "Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from.")
    overwrite_output_dir: bool = option(
        False, "Start anew in an --output_dir that holds an earlier run's checkpoints, deleting them (without it, such a folder is refused).")
    validation_prompt: str | None = option(None, "Prompt for validation images (none: no validation).")
    num_validation_images: int = option(4, "Validation images per prompt (0: no validation).")
    validation_steps: int = option(100, "Make validation images every N steps (and at the end).")
    validation_epochs: int | None = option(None, "Make validation images every N epochs instead of --validation_steps.")
    validation_inference_steps: int = option(25, "Denoising steps of validation images.")
    eval_steps: int = option(0, "Measure the model every N steps (and at the end) as `sdtune eval` does, logging the "
                                "figures to the tracker and OUTPUT_DIR/eval/history.jsonl (0: never).")
    eval_metrics: str = option("auto", "--eval_steps: the metrics (as `sdtune eval --metrics`; auto: those whose inputs "
                                       "the run has: the validation prompt, the instance images, the class prompt).")
    eval_config: str | None = option(None, "--eval_steps: a YAML file of further `sdtune eval` options (prompts, "
                                           "clip_model, toy_concept, num_images, ...).")
    report_to: Literal["tensorboard", "wandb", "none"] = option("tensorboard", "Tracker for losses and images.")
    logging_dir: str = option("logs", "Tracker folder, relative to --output_dir.")
    tracker_project_name: str = option("sdtune", "Project name in the tracker.")
    push_to_hub: bool = option(False, "Upload the output folder to the Hub after export (token: HF_TOKEN or `hf auth login`).")
    hub_model_id: str | None = option(None, "Hub repository for --push_to_hub, e.g. me/sks-dog (default: the output folder's name).")
    hub_private: bool = option(False, "Create the Hub repository private.")

    method: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:  # diffusers names the repository after the output folder
            object.__setattr__(self, "hub_model_id", Path(self.output_dir).resolve().name)
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))
        _check_range(self)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class LoRAConfig(TrainConfig):
    """LoRA on the UNet (and optionally the text encoder) through peft."""

    rank: int = option(4, "LoRA rank.")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, i.e. scale 1). Saved with the weights.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    lora_targets: Literal["attn", "attn_ff", "all"] = option(
        "attn", "UNet layers to adapt: attention projections, + feed-forward, or all linear and conv layers."
    )
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA).")
    train_text_encoder: bool = option(False, "Also train a LoRA on the text encoder (disables text-embedding caching).")
    text_encoder_lr: float | None = option(None, "Learning rate of the text-encoder LoRA (default: --learning_rate).")
    text_encoder_2_lr: float | None = option(None, "SDXL: learning rate of the second text encoder (default: --text_encoder_lr).")
    train_text_embeddings: bool = option(False, "Pivotal tuning: learn --placeholder_token's embedding together with the LoRA.")
    text_embeddings_lr: float = option(5e-4, "Learning rate of the new token embeddings (pivotal tuning).")
    train_text_embeddings_frac: float = option(1.0, "Stop learning the embeddings after this fraction of the steps (pivotal tuning).")

    method: typing.ClassVar[str] = "lora"


@dataclass(frozen=True)
class TextualInversionConfig(TrainConfig):
    """Textual inversion: only the new token's embedding vectors are learned."""

    learning_rate: float = option(5e-4, "Learning rate of the embedding vectors.")
    repeats: int = option(100, "Passes over the images that make one epoch (for --num_train_epochs; diffusers' default).")
    save_as_full_pipeline: bool = option(False, "Also save a pipeline folder whose tokenizer and text encoder hold the new token.")
    learnable_property: Literal["object", "style"] = option(
        "object", "Caption template set for images without a caption: 'a photo of a <tok>' or 'a painting in the style of <tok>'.")

    method: typing.ClassVar[str] = "textual_inversion"


@dataclass(frozen=True)
class DreamBoothConfig(LoRAConfig):
    """DreamBooth: a full fine-tune of the UNet (and optionally the text encoder), or with --use_lora
    the LoRA method's adapters. The LoRA options apply only with --use_lora."""

    learning_rate: float | None = option(
        None, "Learning rate (default: 5e-6 for a full fine-tune, 5e-4 with --use_lora, as the diffusers scripts).",
        default_text="5e-6, or 5e-4 with --use_lora")
    use_lora: bool = option(False, "Train LoRA adapters instead of all UNet weights (DreamBooth-LoRA).")
    stop_text_encoder_training: int | None = option(
        None, "With --train_text_encoder, freeze the text encoder after this many steps.")
    use_ema: bool = option(False, "Keep an exponential moving average of the UNet; it is what gets exported.")
    ema_decay: float = option(0.9999, "EMA decay.")
    save_single_file: bool = option(False, "Also export one .safetensors checkpoint in the original SD layout (A1111/ComfyUI).")
    save_precision: Literal["fp32", "fp16", "bf16"] = option("fp16", "Precision of the --save_single_file checkpoint (the pipeline folder is fp32).")

    method: typing.ClassVar[str] = "dreambooth"

    def __post_init__(self) -> None:
        if self.learning_rate is None:  # train_dreambooth.py's and train_dreambooth_lora.py's defaults
            object.__setattr__(self, "learning_rate", 5e-4 if self.use_lora else 5e-6)
        super().__post_init__()


@dataclass(frozen=True)
class ControlNetConfig(TrainConfig):
    """ControlNet: a trainable copy of the UNet's encoder, steered by a control map per image; the UNet stays frozen."""

    controlnet_model_name_or_path: str | None = option(
        None, "Continue training this ControlNet (Hub id, diffusers folder or .safetensors file) instead of a new one "
              "copied from the UNet.")
    conditioning_data_dir: str | None = option(
        None, "Folder of control maps, one per training image, with the same relative path and file stem (any image extension).")
    conditioning_image_column: str = option("conditioning_image", "Control-map column of --dataset_name or metadata.jsonl.")
    validation_image: str | None = option(
        None, "Control map(s) of the validation images, comma-separated (or space-separated, as diffusers' flag).", nargs="+")
    learning_rate: float = option(5e-6, "Learning rate (diffusers' train_controlnet.py default).")
    save_single_file: bool = option(True, "Also export one .safetensors file in the original ControlNet layout (ComfyUI, A1111's sd-webui-controlnet).")
    save_precision: Literal["fp32", "fp16", "bf16"] = option("fp16", "Precision of the single file (the diffusers folder is fp32).")

    method: typing.ClassVar[str] = "controlnet"


def check_ready_to_train(config: TrainConfig) -> None:
    """What a run needs beyond valid values: options that go together, packages that must be installed.

    Raises:
        ConfigError: one line naming the missing option or package.
    """
    if not config.pretrained_model_name_or_path:
        raise ConfigError("--pretrained_model_name_or_path is required (a Hub id, a diffusers folder or a .safetensors file)")
    needs_token = config.method == "textual_inversion" or getattr(config, "train_text_embeddings", False)
    if needs_token and not config.placeholder_token:
        raise ConfigError("--placeholder_token is required to learn a new token (e.g. --placeholder_token '<cat-toy>')")
    if config.with_prior_preservation and not (config.class_data_dir and config.class_prompt):
        raise ConfigError("--with_prior_preservation needs --class_data_dir FOLDER and --class_prompt 'a photo of dog'")
    if config.push_to_hub and not config.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id me/sks-dog")
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report_to wandb needs wandb: pip install 'sdtune[wandb]' (or use --report_to tensorboard)")


def _check_range(config: TrainConfig) -> None:
    positive = ["resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "vae_batch_size",
                "num_class_images", "sample_batch_size", "class_generation_steps",
                "validation_steps", "repeats", "bucket_reso_steps", "validation_inference_steps"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ("num_train_epochs", "validation_epochs", "max_train_samples", "num_threads"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ("learning_rate", "checkpointing_steps", "num_validation_images", "eval_steps", "lr_warmup_steps", "max_grad_norm", "noise_offset", "keep_tokens",
                 "dataloader_num_workers"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative, got {getattr(config, name)}")
    if not 0.0 <= config.caption_dropout_rate <= 1.0:
        raise ValueError(f"caption_dropout_rate must be between 0 and 1, got {config.caption_dropout_rate}")
    if config.snr_gamma is not None and config.snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {config.snr_gamma}")
    # The VAE halves the size three times: a size that is not a multiple of 8 loses pixels at every level,
    # and generation (diffusers' pipelines) refuses it.
    if config.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {config.resolution} (try {config.resolution // 8 * 8 or 8})")
    if config.enable_bucket and config.min_bucket_reso > config.resolution:
        raise ValueError(f"min_bucket_reso ({config.min_bucket_reso}) is larger than resolution ({config.resolution}): "
                         f"every bucket would be larger than the training size; pass --min_bucket_reso {config.resolution} or less")
    if config.min_bucket_reso > config.max_bucket_reso:
        raise ValueError(f"min_bucket_reso ({config.min_bucket_reso}) is larger than max_bucket_reso ({config.max_bucket_reso})")
    if config.with_prior_preservation and config.enable_bucket:
        raise ValueError("with_prior_preservation and enable_bucket cannot be combined yet; train at one --resolution")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise ValueError("checkpoints_total_limit must be at least 1")
    if config.num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {config.num_vectors}")
    if isinstance(config, LoRAConfig) and not 0.0 < config.train_text_embeddings_frac <= 1.0:
        raise ValueError(f"train_text_embeddings_frac must be in (0, 1], got {config.train_text_embeddings_frac}")
    if isinstance(config, DreamBoothConfig):
        if not 0.0 < config.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1, got {config.ema_decay}")
        if config.use_ema and config.use_lora:
            raise ValueError("use_ema applies to full fine-tunes; drop it with use_lora")
    if isinstance(config, ControlNetConfig) and config.with_prior_preservation:
        raise ValueError("with_prior_preservation is for DreamBooth; a ControlNet keeps the base's prior by leaving the UNet frozen")
    if isinstance(config, LoRAConfig):
        if config.rank <= 0:
            raise ValueError(f"rank must be positive, got {config.rank}")
        if not 0.0 <= config.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")


def resolve_epochs(config: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """``config`` with --num_train_epochs and --validation_epochs turned into steps.

    Args:
        config: The run's config.
        batches_per_epoch: Global batches in one pass over the images (the sampler's count).
    """
    steps_per_epoch = math.ceil(batches_per_epoch * config.repeats / config.gradient_accumulation_steps)
    changes = {}
    if config.num_train_epochs is not None:
        changes["max_train_steps"] = config.num_train_epochs * steps_per_epoch
    if config.validation_epochs is not None:
        changes["validation_steps"] = config.validation_epochs * steps_per_epoch
    return dataclasses.replace(config, **changes) if changes else config
