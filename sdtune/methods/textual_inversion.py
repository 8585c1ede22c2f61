"""Textual inversion: learn new token embeddings; every other weight stays frozen."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sdtune.config import TextualInversionConfig
from sdtune.methods.embeddings import NewTokenEmbeddings, save_embedding_files
from sdtune.methods import MethodDefaults
from sdtune.models import Components

# Captions for images without one. {} is the placeholder token.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a dark photo of the {}", "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}",
    "a photo of one {}", "a rendition of the {}", "a photo of the nice {}", "a photo of a small {}", "a photo of the large {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dark painting in the style of {}",
    "a picture in the style of {}", "a cool painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}", "art in the style of {}",
)
TEMPLATE_CAPTION = "{template}"  # marks samples captioned from the templates


def caption_from_templates(caption: str, rng: random.Random, placeholder_token: str, learnable_property: str) -> str:
    """The dataset's own caption if it names the placeholder token, else a template (object or style).

    A caption without the token would teach the token nothing (it would get no gradient).
    """
    if caption != TEMPLATE_CAPTION and placeholder_token in caption:
        return caption
    templates = STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES
    return rng.choice(templates).format(placeholder_token)


class TextualInversionMethod(MethodDefaults):
    def __init__(self, config: TextualInversionConfig):
        self.config = config
        self.embeddings = NewTokenEmbeddings(config.placeholder_token, config.initializer_token, config.num_vectors)

    default_caption = TEMPLATE_CAPTION
    card_type = "textual-inversion"
    trains_text_encoder = True  # its output changes, so captions cannot be cached

    def text_encoder_trains_at(self, step: int) -> bool:
        return True

    def stopped_param_groups(self, step: int) -> set[int]:
        return set()

    def transform_caption(self, caption: str, rng: random.Random) -> str:
        caption = caption_from_templates(caption, rng, self.config.placeholder_token, self.config.learnable_property)
        return self.embeddings.expand(caption)

    def prepare(self, components: Components) -> list[dict]:
        for text_encoder in components.text_encoders:
            text_encoder.train()  # gradient checkpointing acts only in train mode
        weights = self.embeddings.add_to(components)  # SDXL: one embedding per text encoder
        return [{"params": weights, "lr": self.config.learning_rate}]

    def trained_models(self, components: Components) -> list[torch.nn.Module]:
        return components.text_encoders

    def after_step(self, components: Components) -> None:
        self.embeddings.restore_frozen_rows(components)

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        return self.embeddings.state_dict(components, "embeddings")

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor]) -> None:
        self.embeddings.load_state_dict(components, state_dict, "embeddings")

    def export(self, components: Components, output_dir: Path) -> dict[str, Path]:
        outputs = self.export_checkpoint(components, output_dir)
        if self.config.save_as_full_pipeline:  # the tokenizer and text encoder already hold the new token
            components.pipeline().save_pretrained(output_dir, safe_serialization=True)
            outputs["pipeline"] = output_dir / "model_index.json"
        return outputs

    def export_checkpoint(self, components: Components, folder: Path) -> dict[str, Path]:
        """The embedding files (not the full pipeline): they read the vectors and change nothing."""
        return save_embedding_files(folder, self.config.placeholder_token, self.embeddings.vectors(components))
