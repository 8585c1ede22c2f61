"""New token embeddings: the part textual inversion and pivotal tuning share.

Adds ``<tok>``, ``<tok>_1``, ... to the tokenizer (diffusers' multi-vector naming), initialises
their rows from an initializer word, trains only those rows (every other row is restored
after each step), and expands ``<tok>`` in prompts to all of its vectors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.errors import ConfigError
from sdtune.export import LEARNED_EMBEDS_FILE_2, save_a1111_embedding, save_learned_embeds
from sdtune.methods import unwrap_model
from sdtune.models import Components


class NewTokenEmbeddings:
    """The new tokens in every (tokenizer, text encoder) pair of the model: one pair for SD 1.x/2.x,
    two for SDXL, where each encoder learns its own vectors for the same token."""

    def __init__(self, placeholder_token: str, initializer_token: str | None, num_vectors: int = 1):
        if num_vectors < 1:
            raise ConfigError(f"--num_vectors must be at least 1, got {num_vectors}")
        self.placeholder_token = placeholder_token
        self.initializer_token = initializer_token
        self.tokens = [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
        self.token_ids: list[list[int]] = []  # per encoder
        self._original: list[torch.Tensor] = []
        self._frozen_rows: list[torch.Tensor] = []

    def add_to(self, components: Components) -> list[torch.nn.Parameter]:
        """Add the tokens and their rows to every encoder; return the (whole) embedding matrices, now trainable in fp32.

        Raises:
            ConfigError: a token already exists, or the initializer is not exactly one token.
        """
        return [self._add(tokenizer, text_encoder) for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders)]

    def _add(self, tokenizer, text_encoder) -> torch.nn.Parameter:
        clashes = [t for t in self.tokens if t in tokenizer.get_vocab()]
        if clashes:
            raise ConfigError(f"--placeholder_token {self.placeholder_token}: '{clashes[0]}' is already a token; pick a new word like <my-thing>")
        init_ids = self._initializer_ids(tokenizer)
        tokenizer.add_tokens(self.tokens)
        token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        # mean-resizing (transformers' default) only matters for rows we do not overwrite from the initializer
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=init_ids is None)
        # The whole text encoder runs in fp32, as in diffusers' textual inversion: the trained rows need
        # fp32 masters, and their fp32 output would meet bf16/fp16 layer norms, which the CPU refuses
        # ("mixed dtype"). Its cost: the text encoder's size once more (0.25 GB for SD 1.5).
        text_encoder.to(torch.float32)
        embedding = text_encoder.get_input_embeddings()
        with torch.no_grad():
            if init_ids is not None:
                embedding.weight[token_ids] = embedding.weight[init_ids].mean(dim=0, keepdim=True)
        embedding.weight.requires_grad_(True)
        frozen_rows = torch.ones(len(tokenizer), dtype=torch.bool, device=embedding.weight.device)
        frozen_rows[token_ids] = False
        self.token_ids.append(token_ids)
        self._original.append(embedding.weight.detach().clone())
        self._frozen_rows.append(frozen_rows)
        return embedding.weight

    def _initializer_ids(self, tokenizer) -> list[int] | None:
        if self.initializer_token is None:
            return None  # keep the random rows resize_token_embeddings made
        ids = tokenizer.encode(self.initializer_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(
                f"--initializer_token '{self.initializer_token}' splits into {len(ids)} tokens "
                f"({', '.join(tokenizer.convert_ids_to_tokens(ids))}); pick a word that is a single token"
            )
        return ids

    def restore_frozen_rows(self, components: Components) -> None:
        """Undo what weight decay and Adam did to every row that is not ours."""
        for weight, original, frozen in zip(self._weights(components), self._original, self._frozen_rows):
            with torch.no_grad():
                weight[frozen] = original[frozen]

    def expand(self, prompt: str) -> str:
        """'a photo of <tok>' → 'a photo of <tok> <tok>_1 ...' for multi-vector tokens."""
        if len(self.tokens) == 1 or self.placeholder_token not in prompt:
            return prompt
        return prompt.replace(self.placeholder_token, " ".join(self.tokens))

    def vectors(self, components: Components) -> list[torch.Tensor]:
        """The learned rows of each encoder. [num_vectors, dim] each"""
        return [weight[ids].detach().float().cpu() for weight, ids in zip(self._weights(components), self.token_ids)]

    def load_vectors(self, components: Components, vectors: list[torch.Tensor]) -> None:
        for weight, ids, rows in zip(self._weights(components), self.token_ids, vectors):
            with torch.no_grad():
                weight[ids] = rows.to(weight.device)

    def state_dict(self, components: Components, key: str) -> dict[str, torch.Tensor]:
        """Checkpoint entries: ``key`` for the first encoder's vectors (SD 1.x/2.x's only one), ``key_2`` for SDXL's second."""
        return {_numbered(key, i): v for i, v in enumerate(self.vectors(components))}

    def load_state_dict(self, components: Components, state_dict: dict[str, torch.Tensor], key: str) -> None:
        self.load_vectors(components, [state_dict[_numbered(key, i)] for i in range(len(self.token_ids))])

    @staticmethod
    def _weights(components: Components) -> list[torch.Tensor]:
        return [unwrap_model(encoder).get_input_embeddings().weight for encoder in components.text_encoders]


def _numbered(key: str, index: int) -> str:
    return key if index == 0 else f"{key}_{index + 1}"


def save_embedding_files(output_dir, token: str, vectors: list[torch.Tensor]) -> dict[str, Path]:
    """Every file format of learned token vectors (one tensor per text encoder).

    diffusers: ``learned_embeds.safetensors`` (and ``learned_embeds_2.safetensors`` for SDXL's second
    encoder, as diffusers' SDXL textual-inversion script writes), each ``{token: vectors}``.
    AUTOMATIC1111/ComfyUI: ``<name>.safetensors`` with ``emb_params``, or SDXL's ``clip_l``/``clip_g``.
    """
    outputs = {"diffusers": save_learned_embeds(output_dir, token, vectors[0])}
    if len(vectors) == 2:
        outputs["diffusers_2"] = save_learned_embeds(output_dir, token, vectors[1], LEARNED_EMBEDS_FILE_2)
    outputs["a1111"] = save_a1111_embedding(output_dir, token, a1111_vectors(vectors))
    return outputs


def a1111_vectors(vectors: list[torch.Tensor]):
    """The A1111/ComfyUI shape of the vectors: one tensor (SD 1.x/2.x) or SDXL's ``{"clip_l", "clip_g"}``."""
    return vectors[0] if len(vectors) == 1 else {"clip_l": vectors[0], "clip_g": vectors[1]}
