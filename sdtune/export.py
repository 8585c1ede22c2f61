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
KOHYA_SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")  # CLIP ViT-L, OpenCLIP bigG
KOHYA_SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version; A1111 tells SDXL LoRAs by "sdxl_"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def peft_to_kohya(state_dict: dict[str, torch.Tensor], prefix: str, alpha: float,
                  module_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename a peft LoRA state dict (``<module>.lora_A.weight``) to kohya-ss keys.

    kohya names a module by its dotted path with dots turned to underscores after a prefix
    (``lora_unet_down_blocks_0_attentions_0_proj_in``), with ``.lora_down.weight``,
    ``.lora_up.weight`` and the scalar ``.alpha`` (scale = alpha / rank, as in peft).
    ``module_names`` (diffusers module -> other module name, matched by the longest prefix of
    the path) renames the paths first; see ``sdxl_unet_module_names``.

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
        if module_names is not None:
            module = _renamed_module(module, module_names)
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


def _renamed_module(module: str, names: dict[str, str]) -> str:
    """``module`` with its longest dotted prefix that ``names`` holds renamed (the rest of the path kept)."""
    head, tail = module, []
    while head not in names:
        if "." not in head:
            raise ValueError(f"no original (SGM) name for UNet module {module}: only SD-family UNets convert")
        head, _, part = head.rpartition(".")
        tail.insert(0, part)
    return ".".join([names[head], *tail])


def sdxl_unet_module_names(unet) -> dict[str, str]:
    """diffusers UNet module -> the original SGM/LDM module name kohya-ss trains SDXL under.

    kohya-ss trains SDXL on its own copy of the original UNet (``sdxl_original_unet.py``), so an
    SDXL LoRA names ``input_blocks.4.1`` (with diffusers' names inside the attention block:
    ``transformer_blocks.0.attn1.to_q``), a resnet's ``conv1`` as ``in_layers.2``, ``conv2`` as
    ``out_layers.3``, ``time_emb_proj`` as ``emb_layers.1``, ``conv_shortcut`` as
    ``skip_connection``, the samplers ``input_blocks.3.0.op`` / ``output_blocks.2.2.conv``, and
    the added-conditioning MLP ``label_emb.0.0/2``. The names come from the blocks this UNet has
    (the single-file converter's map).
    """
    from sdtune.single_file import unet_original_names  # single_file imports this module

    return unet_original_names(unet)  # label_emb included for a text_time UNet


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
    text_encoder_2_state_dict: dict[str, torch.Tensor] | None = None,
    sdxl_unet: torch.nn.Module | None = None,
) -> Path:
    """Write one kohya-format LoRA file (what A1111's and ComfyUI's LoRA loaders read).

    Weights are stored in ``dtype`` (fp16 by default, as these UIs expect); ``metadata`` adds
    ``ss_*`` training notes that the UIs display; ``extra`` adds tensors such as embedding bundles.

    SD 1.x/2.x: kohya's UNet for these has diffusers' module names, so UNet modules keep
    diffusers' paths (``lora_unet_down_blocks_0_...``); the text encoder is ``lora_te_text_model_...``.

    SDXL (``sdxl_unet`` given, the trained UNet, read for its module names only): kohya-ss
    names UNet modules by the original SGM names (``lora_unet_input_blocks_4_1_transformer_
    blocks_0_attn1_to_q``, see ``sdxl_unet_module_names``) and the two text encoders
    ``lora_te1_text_model_...`` and ``lora_te2_text_model_...``. A1111 finds an SDXL UNet's
    modules by exactly these names (``lora_unet_`` becomes ``diffusion_model_``) and its text
    encoders only as ``lora_te1_``/``lora_te2_``; ComfyUI and diffusers read them too.
    ``ss_base_model_version`` defaults to kohya's SDXL value, by which A1111 files the LoRA
    under SDXL.
    """
    if text_encoder_2_state_dict and sdxl_unet is None:
        raise ValueError("a second text encoder's LoRA is SDXL's: pass sdxl_unet for the SDXL UNet names")
    module_names = sdxl_unet_module_names(sdxl_unet) if sdxl_unet is not None else None
    tensors = peft_to_kohya(unet_state_dict, KOHYA_UNET_PREFIX, alpha, module_names)
    prefixes = KOHYA_SDXL_TEXT_ENCODER_PREFIXES if sdxl_unet is not None else (KOHYA_TEXT_ENCODER_PREFIX,)
    for prefix, text_state_dict in zip(prefixes, (text_encoder_state_dict, text_encoder_2_state_dict)):
        if text_state_dict:
            tensors.update(peft_to_kohya(with_text_model_level(text_state_dict), prefix, alpha))
    tensors.update(extra or {})  # e.g. bundled pivotal-tuning embeddings
    tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()}
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    if sdxl_unet is not None:
        header["ss_base_model_version"] = KOHYA_SDXL_BASE_MODEL_VERSION
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


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # vectors for SDXL's first (CLIP ViT-L) and second (OpenCLIP bigG) text encoder


def save_a1111_embedding(output_dir: str | Path, token: str, vectors: torch.Tensor | dict[str, torch.Tensor]) -> Path:
    """AUTOMATIC1111 / ComfyUI embedding, in ``<name>.safetensors``.

    SD 1.x/2.x: the vectors under ``emb_params``. SDXL (``vectors`` a dict): exactly the keys
    ``clip_l`` ([n, 768] for SDXL) and ``clip_g`` ([n, 1280]), one set of vectors per text
    encoder; that is what A1111 recognises as an SDXL embedding, what ComfyUI's SDXL tokenizers
    read (each by its own key) and what kohya-ss' SDXL textual inversion writes.
    """
    name = a1111_embedding_name(token)
    tensors = _sdxl_embedding(vectors) if isinstance(vectors, dict) else {"emb_params": vectors}
    return atomic_save_file(tensors, Path(output_dir) / f"{name}.safetensors", {"name": name, "token": token})


def _sdxl_embedding(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``clip_l``/``clip_g`` pair, checked: both present, nothing else, as many vectors each."""
    if set(vectors) != set(SDXL_EMBEDDING_KEYS):
        raise ValueError(f"an SDXL embedding has exactly the keys {SDXL_EMBEDDING_KEYS}, not {sorted(vectors)}")
    if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
        raise ValueError(f"clip_l has {vectors['clip_l'].shape[0]} vectors and clip_g {vectors['clip_g'].shape[0]}")
    return {key: vectors[key] for key in SDXL_EMBEDDING_KEYS}


BUNDLE_PREFIX = "bundle_emb."
BUNDLE_TOKENS_METADATA = "sdtune_bundle_tokens"  # {bundle name: the token it was trained as}


def kohya_embedding_bundle(token: str, vectors: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embeddings inside a kohya LoRA file, as A1111 (1.7+), ComfyUI and OneTrainer read them.

    ``bundle_emb.<name>.<key>``: A1111 gathers a name's keys into the dict it would load from an
    embedding file, so SD 1.x/2.x vectors are ``string_to_param.*`` (the .pt embedding layout)
    and SDXL's are ``clip_l`` and ``clip_g`` (``vectors`` a dict, as for ``save_a1111_embedding``).
    ComfyUI reads a LoRA file put in its embeddings folder by the same suffixes.
    """
    name = a1111_embedding_name(token)
    if isinstance(vectors, dict):
        return {f"{BUNDLE_PREFIX}{name}.{key}": tensor for key, tensor in _sdxl_embedding(vectors).items()}
    return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors}


def split_embedding_bundle(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LoRA tensors, {bundle name: vectors}) of a kohya file; diffusers' LoRA loader rejects bundle keys.

    The vectors are a tensor for SD 1.x/2.x and ``{"clip_l": tensor, "clip_g": tensor}`` for SDXL.
    """
    lora, bundles = {}, {}
    for key, tensor in state_dict.items():
        if not key.startswith(BUNDLE_PREFIX):
            lora[key] = tensor
            continue
        name, _, part = key[len(BUNDLE_PREFIX):].partition(".")  # split at the first dot, as A1111 does
        if part in SDXL_EMBEDDING_KEYS:
            bundles.setdefault(name, {})[part] = tensor
        else:
            bundles[name] = tensor
    return lora, bundles
