"""The flags of diffusers' SD 1.x example scripts that are not sdtune option names.

``train_dreambooth.py``, ``train_dreambooth_lora.py``, ``train_text_to_image_lora.py``,
``textual_inversion.py`` and ``train_controlnet.py`` command lines keep working after swapping the program name. Most of
their flags are sdtune options of the same name; the rest are listed here, once:

- ALIASES: another name for an sdtune option, with the value it becomes;
- MOOT: accepted, with one logged line saying why nothing changes;
- REFUSED: one error line saying why.

``--hub_token`` is the one special case: the token goes to the process environment (HF_TOKEN),
never into the config, so it cannot reach sdtune_config.yaml, logs, cards or checkpoints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from sdtune.options import parse_bool
from sdtune.errors import ConfigError

logger = logging.getLogger("sdtune")


@dataclass(frozen=True)
class Alias:
    field: str  # the sdtune option it sets
    convert: Callable[[Any], Any]  # the flag's text → the option's value (None: leave the option alone)
    nargs: str | None = None  # "?" for diffusers' store_true flags


ALIASES: dict[str, Alias] = {
    "use_8bit_adam": Alias("optimizer", lambda text: "adamw8bit" if parse_bool(text) else None, "?"),
    "save_steps": Alias("checkpointing_steps", int),  # textual_inversion.py's embedding snapshots
    "pre_compute_text_embeddings": Alias("cache_text_embeddings", lambda text: True if parse_bool(text) else None, "?"),
    "proportion_empty_prompts": Alias("caption_dropout_rate", float),  # train_controlnet.py's name
    "offset_noise": Alias("noise_offset", lambda text: 0.1 if parse_bool(text) else None, "?"),  # train_dreambooth.py's fixed 0.1
}

# flag → (nargs, why it changes nothing in sdtune)
MOOT: dict[str, tuple[str | None, str]] = {
    "enable_xformers_memory_efficient_attention": ("?", "PyTorch SDPA attention is already used"),
    "local_rank": (None, "accelerate sets each process's rank"),
    "image_interpolation_mode": (None, "images are resized with Lanczos, the diffusers default"),
    "validation_scheduler": (None, "validation images use DPMSolverMultistepScheduler, the diffusers default"),
    "prior_generation_precision": (None, "class images are generated in the training weight dtype (--mixed_precision)"),
    "tokenizer_max_length": (None, "prompts are padded to the tokenizer's model_max_length (77 for Stable Diffusion)"),
    "text_encoder_use_attention_mask": ("?", "Stable Diffusion's CLIP text encoder runs without a mask, as it was trained "
                                             "(the flag is for DeepFloyd IF)"),
    "class_labels_conditioning": (None, "Stable Diffusion's UNet has no class embedding (the flag is for DeepFloyd IF)"),
    "validation_images": ("+", "validation is text-to-image; input images are for image-conditioned pipelines"),
    "skip_save_text_encoder": ("?", "the pipeline folder always holds the text encoder, so it loads on its own"),
}

REFUSED: dict[str, tuple[str | None, str]] = {
    "no_safe_serialization": ("?", "only safetensors files are written"),
}

HUB_TOKEN = "hub_token"

# a diffusers *_epochs flag and the *_steps option that wins when both are given (as in diffusers)
STEPS_WIN = {"num_train_epochs": "max_train_steps", "validation_epochs": "validation_steps"}


def compat_flags() -> dict[str, tuple[str | None, str]]:
    """Every flag handled here → (nargs, help text), for the parser."""
    flags = {name: (alias.nargs, f"diffusers name: sets --{alias.field}") for name, alias in ALIASES.items()}
    flags.update({name: (nargs, f"accepted; {why}") for name, (nargs, why) in MOOT.items()})
    flags.update({name: (nargs, f"refused: {why}") for name, (nargs, why) in REFUSED.items()})
    flags[HUB_TOKEN] = (None, "accepted for diffusers command lines, but HF_TOKEN is safer; never written anywhere")
    return flags


def apply_compat_flags(given: dict[str, Any], values: dict[str, Any], explicit: set[str]) -> None:
    """Fold the diffusers-only flags in ``given`` (name → text) into ``values`` (option → value), in place.

    ``explicit`` holds the sdtune options given on the command line: they win over an alias.

    Raises:
        ConfigError: a refused flag, or a value an alias cannot read.
    """
    refused = [f"--{name}: {REFUSED[name][1]}" for name in given if name in REFUSED]
    if refused:
        raise ConfigError("; ".join(refused))
    for name, text in given.items():
        if name == HUB_TOKEN:
            _use_hub_token(text)
        elif name in MOOT:
            logger.info("--%s: accepted and ignored; %s", name, MOOT[name][1])
        elif name in ALIASES:
            alias = ALIASES[name]
            if alias.field in explicit:
                logger.info("--%s: ignored; --%s is given", name, alias.field)
                continue
            try:
                value = alias.convert(text)
            except ValueError as err:
                raise ConfigError(f"--{name}: {str(err).splitlines()[0]}") from None
            if value is not None:
                values[alias.field] = value
                logger.info("--%s: read as --%s %s", name, alias.field, value)
    for epochs, steps in STEPS_WIN.items():
        if epochs in explicit and steps in explicit:
            values[epochs] = None
            logger.info("--%s: ignored; --%s is given and wins, as in diffusers", epochs, steps)


def _use_hub_token(token: str) -> None:
    """Hand the token to huggingface_hub through this process's environment, never through the config."""
    os.environ["HF_TOKEN"] = token
    logger.warning("--hub_token: a token on the command line shows in shell history and the process list; "
                   "set HF_TOKEN or run `hf auth login` instead")


def hide_hub_token(argv: list[str]) -> None:
    """Blank the token in ``argv`` (e.g. sys.argv) in place, so trackers that record the command line cannot see it."""
    for index, arg in enumerate(argv):
        for flag in ("--hub_token", "--hub-token"):
            if arg == flag and index + 1 < len(argv):
                argv[index + 1] = "***"
            elif arg.startswith(flag + "="):
                argv[index] = flag + "=***"
