"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from sdtune.config import TrainConfig
from sdtune.errors import ConfigError


def build_optimizer(config: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes' 8-bit AdamW (CUDA only) or Prodigy, per ``config.optimizer``.

    Raises:
        ConfigError: the optimizer's package is missing, or 8-bit AdamW is asked for without CUDA.
    """
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.optimizer == "adamw":
        # fused: one kernel updates every parameter (CUDA, and the CPU since torch 2.4); else torch's foreach default
        return torch.optim.AdamW(param_groups, lr=config.learning_rate, fused=config.fused_optimizer or None, **kwargs)
    if config.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise ConfigError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes); on this machine use --optimizer adamw")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install 'sdtune[bnb]'") from None
        return bnb.optim.AdamW8bit(param_groups, lr=config.learning_rate, **kwargs)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("--optimizer prodigy needs prodigyopt: pip install 'sdtune[prodigy]'") from None
        return Prodigy(param_groups, lr=config.learning_rate, betas=kwargs["betas"],
                       weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    raise ConfigError(f"--optimizer {config.optimizer}: unknown optimizer")


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """The schedule over ``max_train_steps`` optimizer steps (stepped once per optimizer step)."""
    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
