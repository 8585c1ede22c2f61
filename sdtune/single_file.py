"""Save a diffusers Stable Diffusion 1.x/2.x/XL model as one original-layout checkpoint (AUTOMATIC1111, ComfyUI).

The original (CompVis/LDM) checkpoint is one flat state dict with three prefixes:

``model.diffusion_model.``
    The UNet. ``input_blocks.0.0`` is ``conv_in``; then, per resolution level, one
    ``input_blocks.N`` per layer holding ``[resnet, (attention)]`` as ``N.0``/``N.1``, and one
    holding the downsampler (``N.0.op``) on every level but the last. ``middle_block.0/1/2`` is
    resnet, attention, resnet. ``output_blocks.N`` counts the up levels' layers the same way, the
    upsampler sitting after the layer's attention (``N.1.conv`` or ``N.2.conv``). Resnets name
    their parts ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``;
    attention blocks are named as in diffusers. ``time_embed.0/2`` and ``out.0/2`` are the
    time-embedding MLP and the output norm/conv; SDXL's added (pooled text + size/crop)
    embedding MLP, diffusers' ``add_embedding.linear_1/2``, is ``label_emb.0.0/2``.
``first_stage_model.``
    The VAE: ``encoder.down.N.block.M``, ``encoder.down.N.downsample``, ``mid.block_1``,
    ``mid.attn_1``, ``mid.block_2``, ``norm_out``; the decoder's ``up.N`` are numbered from the
    lowest resolution up, i.e. in the reverse of diffusers' ``up_blocks`` order. The mid
    attention's ``q``/``k``/``v``/``proj_out`` are 1x1 convolutions.
``cond_stage_model.``
    SD 1.x: ``transformer.text_model.*``, the transformers CLIP names under a ``text_model``
    level. SD 2.x: ``model.*``, OpenCLIP's names, with q/k/v fused into ``attn.in_proj_weight``.
``conditioner.embedders.``
    SDXL (Stability's SGM layout) replaces ``cond_stage_model.`` with one entry per text
    encoder: ``0.transformer.text_model.*`` is the CLIP ViT-L encoder with the transformers
    names, as in SD 1.x; ``1.model.*`` is OpenCLIP ViT-bigG with OpenCLIP's names, as in SD 2.x,
    every layer kept (SDXL reads the penultimate layer but diffusers loads them all) plus the
    pooled-embedding projection ``text_projection``, stored as OpenCLIP multiplies by it,
    ``[width, projection_dim]``, the transpose of the transformers ``Linear`` weight.

UNet and VAE keys are built from the modules the models actually have, so any SD-family
configuration converts; a parameter with no original name (a peft adapter, a class embedding)
raises instead of being dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.export import atomic_save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def to_original_state_dict(unet, vae, text_encoder, text_encoder_layout: str = "auto", *,
                           text_encoder_2=None) -> dict[str, torch.Tensor]:
    """Rename the weights of a diffusers SD pipeline to the original single-checkpoint layout.

    Args:
        unet: A ``UNet2DConditionModel`` of the SD 1.x/2.x/XL family.
        vae: The ``AutoencoderKL``.
        text_encoder: The transformers ``CLIPTextModel``.
        text_encoder_layout: ``"clip"`` (SD 1.x, OpenAI CLIP), ``"openclip"`` (SD 2.x) or
            ``"auto"``: the model family's, see :func:`text_encoder_layout_of`.
            With ``text_encoder_2`` the first encoder is always CLIP (``"auto"`` or ``"clip"``).
        text_encoder_2: SDXL's second encoder, a ``CLIPTextModelWithProjection`` (OpenCLIP
            ViT-bigG). Given, the SDXL layout is written: both encoders under
            ``conditioner.embedders.``, and the UNet's ``text_time`` added embedding as ``label_emb``.

    Returns:
        Detached tensors (views of the models' weights where no reshaping was needed), by original key.

    Raises:
        ValueError: a parameter has no original name (e.g. an unmerged peft adapter), the layout
            is unknown, or the UNet's added embedding and ``text_encoder_2`` do not go together.
    """
    for model in (unet, vae, text_encoder, text_encoder_2):
        if getattr(model, "peft_config", None):
            raise ValueError(f"{type(model).__name__} has peft adapters: merge_and_unload() them before exporting")
    sdxl_unet = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if sdxl_unet != (text_encoder_2 is not None):
        raise ValueError("an SDXL UNet (addition_embed_type='text_time') is exported with its text_encoder_2, "
                         "and text_encoder_2 only with an SDXL UNet")
    out = _rename(unet.state_dict(), unet_original_names(unet), UNET_PREFIX)
    vae_weights = _rename(vae.state_dict(), _vae_names(vae), VAE_PREFIX)
    for key, tensor in vae_weights.items():
        if ".attn_1." in key and tensor.ndim == 2:  # linear [out, in] -> 1x1 conv [out, in, 1, 1]
            vae_weights[key] = tensor[:, :, None, None]
    out.update(vae_weights)
    if text_encoder_layout == "auto":
        text_encoder_layout = text_encoder_layout_of(unet)
    # transformers 5 dropped CLIPTextModel's `text_model.` level; strip it for either version
    text_weights = {k.removeprefix("text_model."): v.detach() for k, v in text_encoder.state_dict().items()}
    if text_encoder_2 is not None:
        if text_encoder_layout not in ("auto", "clip"):
            raise ValueError(f"SDXL's first text encoder is CLIP: text_encoder_layout must be 'auto' or 'clip', "
                             f"not {text_encoder_layout!r}")
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in text_weights.items()})
        # CLIPTextModelWithProjection: text_model.* and the pooled output's text_projection.weight
        weights_2 = {k.removeprefix("text_model."): v.detach() for k, v in text_encoder_2.state_dict().items()}
        out.update({SDXL_OPENCLIP_PREFIX + k: v for k, v in _openclip(weights_2).items()})
    elif text_encoder_layout == "clip":
        out.update({CLIP_PREFIX + k: v for k, v in text_weights.items()})
    elif text_encoder_layout == "openclip":
        out.update({OPENCLIP_PREFIX + k: v for k, v in _openclip(text_weights).items()})
    else:
        raise ValueError(f"text_encoder_layout must be 'auto', 'clip' or 'openclip', not {text_encoder_layout!r}")
    return out


def text_encoder_layout_of(unet) -> str:
    """The original layout of the model family's (first) text encoder, read from its UNet.

    SDXL's first encoder is OpenAI's CLIP; SD 2.x (the only other family with linear attention
    projections, ``use_linear_projection``) conditions on OpenCLIP; SD 1.x on OpenAI's CLIP. Not from
    the text encoder's activation: small test models of SDXL use ``gelu`` in both encoders.
    """
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "clip"
    return "openclip" if getattr(unet.config, "use_linear_projection", False) else "clip"


def save_single_file(path: str | Path, unet, vae, text_encoder, dtype: torch.dtype | None = torch.float16,
                     text_encoder_layout: str = "auto", carry_from: str | Path | None = None, *,
                     text_encoder_2=None) -> Path:
    """Write the model as one original-layout ``.safetensors`` checkpoint, atomically.

    Args:
        path: Destination; must end in ``.safetensors`` (pickle checkpoints are never written).
        unet: The UNet (trained adapters must be merged first).
        vae: The VAE.
        text_encoder: The CLIP text encoder.
        dtype: Floating-point dtype to store (fp16, as the UIs ship models); ``None`` keeps each tensor's own.
        text_encoder_layout: See ``to_original_state_dict``.
        carry_from: The single file the base model was loaded from: its text-encoder tensors that
            diffusers does not load are copied over unchanged. For SD 2.x that is OpenCLIP's last
            layer (``resblocks.23``; SD conditions on the penultimate one, so diffusers drops it),
            which ComfyUI otherwise reports as "clip missing". For SDXL, the ``conditioner.embedders.``
            tensors diffusers skips (e.g. a ``position_ids`` buffer) are carried the same way.
        text_encoder_2: SDXL's second text encoder; see ``to_original_state_dict``.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint is written as .safetensors only")
    tensors = to_original_state_dict(unet, vae, text_encoder, text_encoder_layout, text_encoder_2=text_encoder_2)
    if carry_from is not None and str(carry_from).endswith(".safetensors"):
        tensors.update(_unloaded_text_encoder_tensors(carry_from, tensors))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return atomic_save_file({k: v.detach().cpu() for k, v in tensors.items()}, path)


def _unloaded_text_encoder_tensors(source: str | Path, written: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder tensors of ``source`` that ``written`` lacks (text encoders are never trained there).

    Only under the encoder prefixes ``written`` has, so a file of another layout contributes nothing.
    """
    from safetensors import safe_open

    prefixes = {_text_encoder_prefix(key) for key in written} - {None}
    with safe_open(str(source), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()
                if _text_encoder_prefix(key) in prefixes and key not in written}


def _text_encoder_prefix(key: str) -> str | None:
    """``cond_stage_model.model.``, ``conditioner.embedders.1.model.`` etc. for a text-encoder key, else None."""
    parts = key.split(".")
    if parts[0] == "cond_stage_model" and len(parts) > 2:
        return ".".join(parts[:2]) + "."  # "model" (OpenCLIP) or "transformer" (CLIP)
    if parts[0] == "conditioner" and len(parts) > 4 and parts[1] == "embedders":
        return ".".join(parts[:4]) + "."
    return None


def _rename(state_dict: dict[str, torch.Tensor], names: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """Rename each parameter by its longest module prefix found in ``names``."""
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        module, _, leaf = key.rpartition(".")
        tail = [leaf]
        while module and module not in names:
            module, _, part = module.rpartition(".")
            tail.insert(0, part)
        if module:
            out[prefix + ".".join([names[module], *tail])] = tensor.detach()
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"no original Stable Diffusion name for {len(unmapped)} parameters, e.g. {unmapped[:3]} "
                         "(merge adapters before exporting; only SD 1.x/2.x/XL architectures are supported)")
    return out


def _add(names: dict[str, str], src: str, dst: str, parts: dict[str, str] | None = None) -> None:
    """Map module ``src`` to ``dst``, or, with ``parts``, each of its children to a renamed child."""
    if parts is None:
        names[src] = dst
    else:
        names.update({f"{src}.{a}": f"{dst}.{b}" for a, b in parts.items()})


def unet_original_names(unet) -> dict[str, str]:
    """diffusers module name -> LDM module name, for the blocks this UNet has."""
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if getattr(unet, "add_embedding", None) is not None and unet.config.addition_embed_type == "text_time":
        # SDXL: an MLP on the pooled text embedding and the size/crop numbers, added to the time embedding
        _add(names, "add_embedding.linear_1", "label_emb.0.0")
        _add(names, "add_embedding.linear_2", "label_emb.0.2")
    index = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            _add(names, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET)
            if attentions:
                _add(names, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1")
            index += 1
        if block.downsamplers:
            _add(names, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            index += 1
    # middle_block interleaves resnet, attention, resnet
    for j in range(len(unet.mid_block.resnets)):
        _add(names, f"mid_block.resnets.{j}", f"middle_block.{2 * j}", UNET_RESNET)
    for j in range(len(getattr(unet.mid_block, "attentions", None) or ())):
        _add(names, f"mid_block.attentions.{j}", f"middle_block.{2 * j + 1}")
    index = 0
    for i, block in enumerate(getattr(unet, "up_blocks", ())):  # a ControlNet has the encoder half only
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            _add(names, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET)
            if attentions:
                _add(names, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1")
            index += 1
        if block.upsamplers:  # part of the level's last output block, after its resnet and attention
            _add(names, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{index - 1}.{2 if attentions else 1}.conv")
    return names


def controlnet_original_names(controlnet) -> dict[str, str]:
    """diffusers module name -> original ControlNet (``cldm``) module name.

    The encoder half is named as in the UNet; the rest is ControlNet's own: the conditioning
    embedding is ``input_hint_block`` (a Sequential with a SiLU between convolutions, so every
    other index), the zero convolutions after each input block are ``zero_convs.i.0``, and the one
    after the middle block is ``middle_block_out.0``.
    """
    names = unet_original_names(controlnet)
    embedding = controlnet.controlnet_cond_embedding
    convs = ["conv_in", *(f"blocks.{i}" for i in range(len(embedding.blocks))), "conv_out"]
    for i, conv in enumerate(convs):
        _add(names, f"controlnet_cond_embedding.{conv}", f"input_hint_block.{2 * i}")
    for i in range(len(controlnet.controlnet_down_blocks)):
        _add(names, f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0")
    _add(names, "controlnet_mid_block", "middle_block_out.0")
    return names


def save_controlnet_single_file(path: str | Path, controlnet, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write a diffusers ``ControlNetModel`` as one original-layout ``.safetensors`` file, atomically.

    The layout of lllyasviel's ControlNet 1.1 files (no ``control_model.`` prefix), which ComfyUI's
    ControlNet loader and A1111's sd-webui-controlnet read.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file ControlNet is written as .safetensors only")
    tensors = _rename(controlnet.state_dict(), controlnet_original_names(controlnet), "")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return atomic_save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def _vae_names(vae) -> dict[str, str]:
    """diffusers module name -> LDM module name, for the blocks this VAE has."""
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        _add(names, f"{side}.conv_in", f"{side}.conv_in")
        _add(names, f"{side}.conv_norm_out", f"{side}.norm_out")
        _add(names, f"{side}.conv_out", f"{side}.conv_out")
        mid = getattr(vae, side).mid_block
        for j in range(len(mid.resnets)):
            _add(names, f"{side}.mid_block.resnets.{j}", f"{side}.mid.block_{j + 1}", VAE_RESNET)
        for j in range(len(mid.attentions)):
            _add(names, f"{side}.mid_block.attentions.{j}", f"{side}.mid.attn_{j + 1}", VAE_ATTENTION)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            _add(names, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        if block.downsamplers:
            _add(names, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        for j in range(len(block.resnets)):
            _add(names, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if block.upsamplers:
            _add(names, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    return names


def _openclip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights (no ``text_model.`` level) -> OpenCLIP names.

    Every layer given is converted: SD 2.x's diffusers encoder already lacks OpenCLIP's last
    layer, which SD skips by conditioning on the penultimate one; SDXL's has all of them. SD 2.x
    has no ``text_projection`` (it never uses it); SDXL's ``CLIPTextModelWithProjection`` has one
    (``text_projection.weight``, a ``Linear`` ``[projection_dim, width]``), which OpenCLIP
    keeps as the bare matrix it right-multiplies by: ``text_projection``, ``[width, projection_dim]``.
    """
    projection = weights.pop("text_projection.weight", None)
    out = {
        "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "positional_embedding": weights.pop("embeddings.position_embedding.weight"),  # a bare [77, D] parameter
        "ln_final.weight": weights.pop("final_layer_norm.weight"),
        "ln_final.bias": weights.pop("final_layer_norm.bias"),
    }
    layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            # torch.nn.MultiheadAttention stores q, k, v stacked: [3 * D, D] and [3 * D]
            qkv = [weights.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in OPENCLIP_LAYER.items():
                out[f"{dst}{b}.{kind}"] = weights.pop(f"{src}{a}.{kind}")
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()
    if weights:
        raise ValueError(f"no OpenCLIP name for text-encoder weights {sorted(weights)[:3]}")
    return out
