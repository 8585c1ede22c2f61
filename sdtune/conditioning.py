"""How captions and image sizes become the UNet's conditioning: the one place model families differ.

SD 1.x/2.x condition the UNet on one CLIP text encoder's last hidden state. SDXL has two
encoders (CLIP ViT-L and OpenCLIP bigG with a projection): the UNet cross-attends to both
penultimate hidden states concatenated, and its added embedding takes the second encoder's
pooled (projected) output with six size/crop numbers, ``add_time_ids``.

The loop, the text-embedding cache and the methods see only this interface: the encoders by
their pipeline names, ``encode`` (captions → a dict of tensors, cacheable row by row) and
``unet_inputs`` (those tensors and the batch's size numbers → the UNet's keyword arguments).
"""

from __future__ import annotations

from typing import Protocol

import torch

from sdtune.data.images import Placement


class TextConditioning(Protocol):
    family: str  # "sd" (1.x/2.x) or "sdxl"
    encoder_names: tuple[str, ...]  # pipeline component names: text_encoder[, text_encoder_2]

    def encode(self, encoders: list, tokenizers: list, captions: list[str], device) -> dict[str, torch.Tensor]:
        """What the UNet needs of ``captions``; every tensor has the batch as its first dimension."""

    def unet_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` besides the sample and the timesteps."""


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for CLIP). [B, 77]"""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class SDConditioning:
    """SD 1.x/2.x: the last hidden state of the one text encoder."""

    family = "sd"
    encoder_names = ("text_encoder",)

    def encode(self, encoders, tokenizers, captions, device) -> dict[str, torch.Tensor]:
        ids = tokenize(tokenizers[0], captions).to(device)
        return {"encoder_hidden_states": encoders[0](ids)[0]}  # [B, 77, D]

    def unet_inputs(self, text, time_ids, dtype) -> dict:
        return {"encoder_hidden_states": text["encoder_hidden_states"].to(dtype)}


class SDXLConditioning:
    """SDXL: both encoders' penultimate hidden states, the second's pooled embedding, and add_time_ids.

    As in diffusers' SDXL pipelines and training scripts (and kohya's), so a model trained here
    sees at inference exactly the conditioning it was trained on.
    """

    family = "sdxl"
    encoder_names = ("text_encoder", "text_encoder_2")

    def encode(self, encoders, tokenizers, captions, device) -> dict[str, torch.Tensor]:
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            output = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled output (text_embeds) is the one used
        return {"encoder_hidden_states": torch.cat(hidden_states, dim=-1), "text_embeds": pooled}  # [B,77,D1+D2], [B,P]

    def unet_inputs(self, text, time_ids, dtype) -> dict:
        added = {"text_embeds": text["text_embeds"].to(dtype), "time_ids": time_ids.to(text["text_embeds"].device, dtype)}
        return {"encoder_hidden_states": text["encoder_hidden_states"].to(dtype), "added_cond_kwargs": added}


def size_conditioning(placement: Placement, flip: bool) -> torch.Tensor:
    """SDXL's ``add_time_ids`` of one training image: original (h, w), crop top-left (top, left), target (h, w).

    The original size is the image file's; the crop is where the training tensor starts in the
    resized image, measured in the image as trained (after a flip the crop's left edge is
    mirrored). Wrong values here teach the model crop borders. [6] float32
    """
    left, top, width, height = placement.crop
    if flip:
        left = placement.resized[0] - left - width
    original_width, original_height = placement.original
    return torch.tensor([original_height, original_width, top, left, height, width], dtype=torch.float32)


def conditioning_for(unet_config) -> TextConditioning:
    """The family of a UNet: SDXL's UNets add a ``text_time`` embedding."""
    return SDXLConditioning() if unet_config.get("addition_embed_type") == "text_time" else SDConditioning()
