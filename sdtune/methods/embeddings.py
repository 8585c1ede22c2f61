"""New token embeddings: the part textual inversion and pivotal tuning share.

Adds ``<tok>``, ``<tok>_1``, ... to the tokenizer (diffusers' multi-vector naming), initialises
their rows from an initializer word, trains only those rows (every other row is restored
after each step), and expands ``<tok>`` in prompts to all of its vectors.
"""

from __future__ import annotations

import torch

from sdtune.errors import ConfigError
from sdtune.methods import unwrap_model
from sdtune.models import Components


class NewTokenEmbeddings:
    def __init__(self, placeholder_token: str, initializer_token: str | None, num_vectors: int = 1):
        if num_vectors < 1:
            raise ConfigError(f"--num_vectors must be at least 1, got {num_vectors}")
        self.placeholder_token = placeholder_token
        self.initializer_token = initializer_token
        self.tokens = [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
        self.token_ids: list[int] = []
        self._original: torch.Tensor | None = None
        self._frozen_rows: torch.Tensor | None = None

    def add_to(self, components: Components) -> torch.nn.Parameter:
        """Add the tokens and their rows; return the (whole) embedding matrix, now trainable in fp32.

        Raises:
            ConfigError: a token already exists, or the initializer is not exactly one token.
        """
        tokenizer, text_encoder = components.tokenizer, components.text_encoder
        clashes = [t for t in self.tokens if t in tokenizer.get_vocab()]
        if clashes:
            raise ConfigError(f"--placeholder_token {self.placeholder_token}: '{clashes[0]}' is already a token; pick a new word like <my-thing>")
        init_ids = self._initializer_ids(tokenizer)
        tokenizer.add_tokens(self.tokens)
        self.token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        # mean-resizing (transformers' default) only matters for rows we do not overwrite from the initializer
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=init_ids is None)
        # The whole text encoder runs in fp32, as in diffusers' textual inversion: the trained rows need
        # fp32 masters, and their fp32 output would meet bf16/fp16 layer norms, which the CPU refuses
        # ("mixed dtype"). Its cost: the text encoder's size once more (0.25 GB for SD 1.5).
        text_encoder.to(torch.float32)
        embedding = text_encoder.get_input_embeddings()
        with torch.no_grad():
            if init_ids is not None:
                embedding.weight[self.token_ids] = embedding.weight[init_ids].mean(dim=0, keepdim=True)
        embedding.weight.requires_grad_(True)
        self._original = embedding.weight.detach().clone()
        self._frozen_rows = torch.ones(len(tokenizer), dtype=torch.bool, device=embedding.weight.device)
        self._frozen_rows[self.token_ids] = False
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

    def restore_frozen_rows(self, text_encoder) -> None:
        """Undo what weight decay and Adam did to every row that is not ours."""
        weight = unwrap_model(text_encoder).get_input_embeddings().weight
        with torch.no_grad():
            weight[self._frozen_rows] = self._original[self._frozen_rows]

    def expand(self, prompt: str) -> str:
        """'a photo of <tok>' → 'a photo of <tok> <tok>_1 ...' for multi-vector tokens."""
        if len(self.tokens) == 1 or self.placeholder_token not in prompt:
            return prompt
        return prompt.replace(self.placeholder_token, " ".join(self.tokens))

    def vectors(self, text_encoder) -> torch.Tensor:
        """The learned rows. [num_vectors, dim]"""
        return unwrap_model(text_encoder).get_input_embeddings().weight[self.token_ids].detach().float().cpu()

    def load_vectors(self, text_encoder, vectors: torch.Tensor) -> None:
        with torch.no_grad():
            unwrap_model(text_encoder).get_input_embeddings().weight[self.token_ids] = vectors.to(self._original.device)
