"""Put what sdtune trained onto a diffusers pipeline: a LoRA (sdtune folder, diffusers or kohya file) and
textual-inversion embeddings (diffusers or A1111/ComfyUI files), each failing in one line when it does not fit.

``config`` is any command config with ``lora``, ``lora_scale``, ``embedding`` and
``pretrained_model_name_or_path`` (generate, eval).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path


def add_lora(pipe, config) -> None:
    if not config.lora:
        return
    from sdtune.errors import ConfigError
    from sdtune.export import DIFFUSERS_LORA_FILE

    path = Path(config.lora)
    if not path.exists():
        raise ConfigError(f"--lora {path}: no such file or folder")
    with _one_line_on_mismatch(f"--lora {path}", config):
        if path.is_file():
            _load_lora_file(pipe, path)
        else:
            # the file named: diffusers before ~0.40 cannot search a local folder offline, and without
            # one it looks for pytorch_lora_weights.bin, a pickle file sdtune never writes or loads
            candidates = [DIFFUSERS_LORA_FILE] if (path / DIFFUSERS_LORA_FILE).is_file() else sorted(
                p.name for p in path.glob("*.safetensors"))
            if len(candidates) != 1:
                found = f"{len(candidates)} .safetensors files ({', '.join(candidates[:3])})" if candidates else "no LoRA file"
                raise ConfigError(f"--lora {path}: the folder holds {found}; pass the LoRA file itself, or a folder with "
                                  f"{DIFFUSERS_LORA_FILE}")
            pipe.load_lora_weights(str(path), weight_name=candidates[0], adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[config.lora_scale])


def _load_lora_file(pipe, path: Path) -> None:
    """A diffusers or kohya LoRA file; embeddings bundled in a kohya file (pivotal tuning) are loaded too."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from sdtune.export import BUNDLE_TOKENS_METADATA, split_embedding_bundle

    lora, bundles = split_embedding_bundle(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        tokens = json.loads((f.metadata() or {}).get(BUNDLE_TOKENS_METADATA, "{}"))
    pipe.load_lora_weights(lora, adapter_name="lora")
    for name, vectors in bundles.items():
        _load_token_vectors(pipe, vectors, tokens.get(name, name))


@contextmanager
def _one_line_on_mismatch(what: str, config):
    """A LoRA or embedding of another base model fails deep in diffusers/peft, often with one line per
    weight; say it in one line instead (the loaders' log lines are silenced meanwhile)."""
    import logging

    from sdtune.errors import ConfigError

    quiet = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)  # diffusers logs the whole error once more
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        mismatch = re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                             r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
        if mismatch:
            name, theirs, ours = mismatch.groups()
            detail = f"{name} is {theirs} in the file and {ours} in the model"
        else:
            detail = text[:160]
        raise ConfigError(f"{what} does not fit the base model {config.pretrained_model_name_or_path} "
                          f"(was it trained on another one, e.g. SD 1.x vs 2.x?): {detail}") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def add_embeddings(pipe, config) -> None:
    if not config.embedding:
        return
    for item in (e.strip() for e in config.embedding.split(",") if e.strip()):
        token, vectors = _read_embedding(item)
        _check_embedding_widths(pipe, vectors, item, config)
        with _one_line_on_mismatch(f"--embedding {item}", config):
            _load_token_vectors(pipe, vectors, token)


def _read_embedding(item: str):
    """(token, vectors) of an embedding file or folder; vectors are one tensor, or SDXL's {"clip_l", "clip_g"}.

    diffusers files are ``{token: vectors}`` (SDXL: ``learned_embeds.safetensors`` + ``learned_embeds_2.safetensors``
    in a folder); A1111/ComfyUI files are ``emb_params`` or ``clip_l``/``clip_g``, named by the file.
    """
    from safetensors import safe_open

    from sdtune.errors import ConfigError
    from sdtune.export import LEARNED_EMBEDS_FILE, LEARNED_EMBEDS_FILE_2

    path = Path(item)
    folder = path if path.is_dir() else None
    if folder is not None:
        path = folder / LEARNED_EMBEDS_FILE
    if not path.is_file():
        raise ConfigError(f"--embedding {item}: no such file (pass a learned_embeds.safetensors, an A1111 embedding or their folder)")
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        token = (f.metadata() or {}).get("token", path.stem)
    if set(tensors) == {"emb_params"}:
        return token, tensors["emb_params"]
    if set(tensors) == {"clip_l", "clip_g"}:
        return token, tensors
    if len(tensors) != 1:
        raise ConfigError(f"--embedding {item}: not an embedding file (keys {', '.join(sorted(tensors))[:80]})")
    (token, vectors), = tensors.items()
    second = folder / LEARNED_EMBEDS_FILE_2 if folder is not None else None
    if second is not None and second.is_file():
        with safe_open(str(second), "pt") as f:
            vectors = {"clip_l": vectors, "clip_g": f.get_tensor(token)}
    return token, vectors


def _check_embedding_widths(pipe, vectors, item: str, config) -> None:
    from sdtune.errors import ConfigError

    sdxl = hasattr(pipe, "text_encoder_2")
    if isinstance(vectors, dict) != sdxl:
        kind = "an SDXL embedding (clip_l + clip_g)" if isinstance(vectors, dict) else "an SD 1.x/2.x embedding (one text encoder)"
        raise ConfigError(f"--embedding {item} is {kind}, which does not fit the base model "
                          f"{config.pretrained_model_name_or_path}; it was trained on another model family")
    ours = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2} if sdxl else {"emb_params": pipe.text_encoder}
    theirs = vectors if sdxl else {"emb_params": vectors}
    for key, encoder in ours.items():
        width, their_width = encoder.config.hidden_size, theirs[key].shape[-1]
        if width != their_width:
            raise ConfigError(f"--embedding {item} does not fit the base model {config.pretrained_model_name_or_path}: "
                              f"its vectors are {their_width} wide, the text encoder's {width} "
                              "(SD 1.x: 768, SD 2.x: 1024, SDXL: 768 + 1280); it was trained on another base model")


def _load_token_vectors(pipe, vectors, token: str) -> None:
    """Add ``token`` with its vectors to the pipeline: to both text encoders for SDXL's {"clip_l", "clip_g"}."""
    if isinstance(vectors, dict):
        pipe.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(vectors, token=token)
