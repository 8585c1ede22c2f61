"""File formats other tools read: tokenizer files for transformers 4, file modes."""

import json
import os

from transformers import CLIPTokenizer

from sdtune.export import atomic_save_file, save_tokenizer_vocab_files
from sdtune.toy.tiny_model import tiny_tokenizer

PROMPTS = ["a photo of sks dog", "A CAT, on the moon!! 1234", "<cat-toy> in the style of monet"]


def test_tokenizer_files_for_transformers_4_tokenize_identically(tmp_path):
    """transformers 5 saves only tokenizer.json; transformers 4's CLIPTokenizer needs vocab.json + merges.txt."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    if (tmp_path / "tokenizer.json").is_file():  # transformers 5; transformers 4 writes the two files itself
        for name in ("vocab.json", "merges.txt"):
            (tmp_path / name).unlink(missing_ok=True)
    save_tokenizer_vocab_files(tmp_path)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert len(json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))) == len(tokenizer)
    (tmp_path / "tokenizer.json").unlink(missing_ok=True)  # load from the two files alone
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded(PROMPTS).input_ids == tokenizer(PROMPTS).input_ids


def test_safetensors_files_follow_the_umask(tmp_path):
    import torch

    old = os.umask(0o027)
    try:
        path = atomic_save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # safetensors itself writes 0600
