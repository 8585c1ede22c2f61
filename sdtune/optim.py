"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import importlib.util

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
        return torch.optim.AdamW(param_groups, lr=config.learning_rate, fused=_fused_adamw(config, param_groups), **kwargs)
    check_optimizer_available(config)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=config.learning_rate, **kwargs)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, lr=config.learning_rate, betas=kwargs["betas"],
                       weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    raise ConfigError(f"--optimizer {config.optimizer}: unknown optimizer")


def check_optimizer_available(config: TrainConfig) -> None:
    """Refuse, before any work, an optimizer this machine cannot run (checked again when it is built).

    Raises:
        ConfigError: 8-bit AdamW without CUDA or bitsandbytes, Prodigy without prodigyopt.
    """
    if config.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise ConfigError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes); on this machine use --optimizer adamw")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install 'sdtune[bnb]'")
    if config.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise ConfigError("--optimizer prodigy needs prodigyopt: pip install 'sdtune[prodigy]'")


def _fused_adamw(config: TrainConfig, param_groups: list[dict]) -> bool | None:
    """``fused`` for torch's AdamW: what was asked for, else on for CPU training (None: torch's own choice).

    On the CPU torch's default is a Python loop over the parameters, several passes over each;
    the fused kernel makes one. That made a full fine-tune's update of SD 1.5's UNet 3-6x faster
    on a 2-core CPU (benchmarks/README.md). On GPUs torch's foreach default stays: unmeasured here.
    """
    on_cpu = all(p.device.type == "cpu" for group in param_groups for p in group["params"])
    if config.fused_optimizer is None:
        return True if on_cpu and _torch_has_fused_adamw_on_cpu() else None
    if config.fused_optimizer and on_cpu and not _torch_has_fused_adamw_on_cpu():
        raise ConfigError(f"--fused_optimizer true needs torch 2.4 or newer on the CPU (this is {torch.__version__}); "
                          "upgrade torch or leave the option out")
    return config.fused_optimizer or None


def _torch_has_fused_adamw_on_cpu() -> bool:
    return torch.__version__ >= (2, 4)  # a TorchVersion: compares as a version, local tags included


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """The schedule over ``max_train_steps`` optimizer steps (stepped once per optimizer step)."""
    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
