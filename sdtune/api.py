"""The Python API: one function per trainer, the same code path as the CLI."""

from __future__ import annotations

from sdtune.command_configs import EvalConfig
from sdtune.config import ControlNetConfig, DreamBoothConfig, LoRAConfig, TextualInversionConfig
from sdtune.loop import TrainResult, train
from sdtune.methods.controlnet import ControlNetMethod
from sdtune.methods.dreambooth import DreamBoothMethod
from sdtune.methods.lora import LoRAMethod
from sdtune.methods.textual_inversion import TextualInversionMethod


def train_lora(config: LoRAConfig) -> TrainResult:
    """Train a LoRA as configured; works in a notebook (one process) and under ``accelerate launch``.

    Returns:
        TrainResult with the exported files (``diffusers``: pytorch_lora_weights.safetensors,
        ``kohya``: kohya_lora.safetensors), the step count and the per-step loss history.
    """
    return train(config, LoRAMethod(config))


def train_dreambooth(config: DreamBoothConfig) -> TrainResult:
    """DreamBooth: a full fine-tune (exported as a pipeline folder), or with ``use_lora`` DreamBooth-LoRA
    (exported like ``train_lora``). Prior preservation comes from ``with_prior_preservation``."""
    method = LoRAMethod(config) if config.use_lora else DreamBoothMethod(config)
    return train(config, method)


def train_textual_inversion(config: TextualInversionConfig) -> TrainResult:
    """Learn ``config.placeholder_token``'s embedding; exports learned_embeds.safetensors and an A1111 embedding."""
    return train(config, TextualInversionMethod(config))


def train_controlnet(config: ControlNetConfig) -> TrainResult:
    """Train a ControlNet on (image, control map, caption) triples; the base model stays frozen.

    Returns:
        TrainResult with ``controlnet`` (a ``ControlNetModel.from_pretrained`` folder: the output folder)
        and ``single_file`` (controlnet.safetensors, the original layout ComfyUI and A1111 read).
    """
    return train(config, ControlNetMethod(config))


def evaluate(config: EvalConfig) -> dict:
    """Measure a fine-tune (or every checkpoint of ``config.checkpoints``) as `sdtune eval` does.

    Returns:
        The figures (``{"clip_t": ..., "prior_drift": ...}``), or ``{"steps": [{"step": N, ...}, ...]}`` with
        ``checkpoints``. metrics.json, the samples and grid.png are written to ``config.output_dir``.
    """
    from sdtune.evaluate import run_eval

    return run_eval(config)
