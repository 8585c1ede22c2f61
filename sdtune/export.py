"""File formats of trained weights: diffusers/peft LoRA and kohya-ss LoRA (AUTOMATIC1111, ComfyUI).

Only safetensors are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def peft_to_kohya(state_dict: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """Rename a peft LoRA state dict (``<module>.lora_A.weight``) to kohya-ss keys.

    kohya names a module by its dotted path with dots turned to underscores after a prefix
    (``lora_unet_down_blocks_0_attentions_0_proj_in``), with ``.lora_down.weight``,
    ``.lora_up.weight`` and the scalar ``.alpha`` (scale = alpha / rank, as in peft).

    DoRA: peft's magnitude is a per-output-row norm, which LyCORIS calls ``wd_on_out`` and
    stores as ``.dora_scale`` shaped [out, 1] (linear) or [out, 1, 1, 1] (conv). ComfyUI and
    Forge read that layout; AUTOMATIC1111 reads only the per-input-column variant.
    """
    renames = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
    out: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for suffix in (*renames, ".lora_magnitude_vector", ".lora_magnitude_vector.weight"):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                break
        else:
            raise ValueError(f"not a LoRA key: {key}")
        name = f"{prefix}_{module.replace('.', '_')}"
        if suffix in renames:
            out[name + renames[suffix]] = tensor.contiguous()
            out[name + ".alpha"] = torch.tensor(float(alpha))
        else:
            magnitudes[name] = tensor
    for name, magnitude in magnitudes.items():
        weight_ndim = out[name + ".lora_down.weight"].ndim  # 2 for linear, 4 for conv
        # peft keeps [out] for linear and [1, out, 1, 1] for conv layers
        out[name + ".dora_scale"] = magnitude.reshape(-1, *([1] * (weight_ndim - 1))).contiguous()
    return out


def save_kohya_lora(
    path: str | Path,
    unet_state_dict: dict[str, torch.Tensor],
    text_encoder_state_dict: dict[str, torch.Tensor] | None,
    *,
    alpha: float,
    rank: int,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one kohya-format LoRA file (what A1111's and ComfyUI's LoRA loaders read).

    Weights are stored in ``dtype`` (fp16 by default, as these UIs expect); ``metadata`` adds
    ``ss_*`` training notes that the UIs display; ``extra`` adds tensors such as embedding bundles.
    """
    tensors = peft_to_kohya(unet_state_dict, KOHYA_UNET_PREFIX, alpha)
    if text_encoder_state_dict:
        tensors.update(peft_to_kohya(with_text_model_level(text_encoder_state_dict), KOHYA_TEXT_ENCODER_PREFIX, alpha))
    tensors.update(extra or {})  # e.g. bundled pivotal-tuning embeddings
    tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()}
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    header.update(metadata or {})
    return atomic_save_file(tensors, path, header)


def with_text_model_level(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-encoder keys with the ``text_model.`` level (``text_model.encoder.layers.0...``).

    transformers 5 dropped that level from ``CLIPTextModel``; transformers 4 (with diffusers
    0.32's LoRA loader), A1111 and ComfyUI still need it, and diffusers with transformers 5
    reads it too, so files are written with it whatever transformers trained them.
    """
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def add_text_model_level_to_saved_text_encoder(folder: str | Path) -> None:
    """Rewrite a saved ``CLIPTextModel``'s safetensors with the ``text_model.`` key level.

    transformers 5 saves the keys without it, and transformers 4 then loads the folder with a
    randomly initialised text encoder (a warning, not an error). transformers 5 reads both.
    """
    from safetensors import safe_open

    folder = Path(folder)
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if all(key.startswith("text_model.") for key in f.keys()):
                continue
            metadata = f.metadata()
            tensors = with_text_model_level({key: f.get_tensor(key) for key in f.keys()})
        atomic_save_file(tensors, path, metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names every key too
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = with_text_model_level(data["weight_map"])
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.save_file`` through a temporary file, so a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; follow the umask like every other file
    os.replace(tmp, path)
    return path


def follow_umask(folder: str | Path) -> None:
    """Give the ``.safetensors`` files under ``folder`` the umask's mode, as every other file has.

    safetensors creates its files 0600 (diffusers' and transformers' ``save_pretrained`` and
    ``save_lora_weights`` included), which a shared model folder or web server cannot read.
    """
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            path.chmod(mode)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def save_tokenizer_vocab_files(tokenizer_dir: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` beside a saved CLIP ``tokenizer.json`` if they are missing.

    transformers 5 saves a CLIP tokenizer as ``tokenizer.json`` only; transformers 4's
    ``CLIPTokenizer`` (what diffusers loads there), A1111 and other tools read the vocabulary and
    merges files. Both come from the tokenizer.json's BPE model, so the tokenizers are identical.
    """
    folder = Path(tokenizer_dir)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if (vocab_path.is_file() and merges_path.is_file()) or not (folder / "tokenizer.json").is_file():
        return
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # "a b" or ["a", "b"]
    vocab_path.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    # CLIPTokenizer skips the first line of merges.txt, the version header
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def save_precision_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"


LEARNED_EMBEDS_FILE_2 = "learned_embeds_2.safetensors"  # SDXL's second text encoder


def save_learned_embeds(output_dir: str | Path, token: str, vectors: torch.Tensor, filename: str = LEARNED_EMBEDS_FILE) -> Path:
    """diffusers' textual-inversion file: ``{token: [num_vectors, dim]}`` (``pipe.load_textual_inversion(path)``)."""
    return atomic_save_file({token: vectors}, Path(output_dir) / filename)


def a1111_embedding_name(token: str) -> str:
    """A1111 names an embedding after its file: '<cat-toy>' → 'cat-toy' (typed in prompts as cat-toy)."""
    return token.strip("<>") or "embedding"


def save_a1111_embedding(output_dir: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """AUTOMATIC1111 / ComfyUI embedding: the vectors under ``emb_params``, in ``<name>.safetensors``."""
    name = a1111_embedding_name(token)
    return atomic_save_file({"emb_params": vectors}, Path(output_dir) / f"{name}.safetensors", {"name": name, "token": token})


BUNDLE_PREFIX = "bundle_emb."
BUNDLE_TOKENS_METADATA = "sdtune_bundle_tokens"  # {bundle name: the token it was trained as}


def kohya_embedding_bundle(token: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embeddings inside a kohya LoRA file, as A1111 (1.7+), ComfyUI and OneTrainer read them."""
    return {f"{BUNDLE_PREFIX}{a1111_embedding_name(token)}.string_to_param.*": vectors}


def split_embedding_bundle(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoRA tensors, {bundle name: vectors}) of a kohya file; diffusers' LoRA loader rejects bundle keys."""
    lora = {k: v for k, v in state_dict.items() if not k.startswith(BUNDLE_PREFIX)}
    bundles = {k[len(BUNDLE_PREFIX):].split(".")[0]: v for k, v in state_dict.items() if k.startswith(BUNDLE_PREFIX)}
    return lora, bundles
