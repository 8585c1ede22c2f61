"""Training methods. Each is a small object the one loop (sdtune.loop) drives; see Method."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

import torch

from sdtune.models import Components


class Method(Protocol):
    """What the loop needs from a method; it never asks which method it runs."""

    default_caption: str | None  # caption of images that have none and no --instance_prompt
    card_type: str  # "lora", "dreambooth" or "textual-inversion": the model card's tags and usage snippet

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder's output changes during training (then captions cannot be cached)."""

    def text_encoder_trains_at(self, step: int) -> bool:
        """Whether the text encoder is still trained at optimizer step ``step``."""

    def transform_caption(self, caption: str, rng: random.Random) -> str:
        """The caption to train on (e.g. fill a template, expand a multi-vector token)."""

    def prepare(self, components: Components) -> list[dict]:
        """Freeze/unfreeze and inject what is trained; return optimizer parameter groups."""

    def trained_models(self, components: Components) -> list[torch.nn.Module]:
        """Modules that hold trained parameters (wrapped for DDP, accumulated, checkpointed)."""

    def stopped_param_groups(self, step: int) -> set[int]:
        """Indices (into prepare()'s groups) that no longer train from optimizer step ``step`` on."""

    def after_step(self, components: Components) -> None:
        """Called after every optimizer step (e.g. restore frozen embedding rows)."""

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        """Only the trained state, for checkpoints."""

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (on a freshly prepared model)."""

    def export(self, components: Components, output_dir: Path) -> dict[str, Path]:
        """Write every output format; return {format name: path}."""

    def export_checkpoint(self, components: Components, folder: Path) -> dict[str, Path]:
        """Write the loadable outputs a ``checkpoint-N`` folder holds (the trained model at that step).

        Training goes on afterwards: nothing here may change the trained or the EMA weights.
        """

    # The seams of methods that add inputs to the UNet (ControlNet); MethodDefaults has the plain answers.
    def attach_inputs(self, records: list) -> list:
        """The training records with what else each image needs (e.g. its control map)."""

    def extra_unet_inputs(self, forward_module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, unet_inputs: dict,
                          batch: dict) -> dict:
        """More keyword arguments of the UNet's forward (e.g. ControlNet residuals). ``forward_module(m)`` is the
        wrapper (DDP, autocast) to run a trained module ``m`` through."""

    def validation_controls(self, components: Components):
        """``(controlnet, control images)`` that validation images are conditioned on, or None."""


class MethodDefaults:
    """The Method seams for methods that feed the UNet nothing beyond the noisy latents and the text."""

    def attach_inputs(self, records: list) -> list:
        return records

    def extra_unet_inputs(self, forward_module, noisy_latents, timesteps, unet_inputs, batch) -> dict:
        return {}

    def validation_controls(self, components: Components):
        return None


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def text_encoder_learning_rates(config, components: Components) -> dict[str, float]:
    """Learning rate of each text encoder, by pipeline name: --text_encoder_lr (default --learning_rate),
    and for SDXL's second encoder --text_encoder_2_lr (default --text_encoder_lr)."""
    first = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
    second = config.text_encoder_2_lr if config.text_encoder_2_lr is not None else first
    return dict(zip(components.conditioning.encoder_names, (first, second)))
