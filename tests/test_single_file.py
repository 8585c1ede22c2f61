"""Single-file export: original SD key layout, and diffusers' from_single_file loads it back unchanged."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.models import load_components
from sdtune.single_file import save_single_file, to_original_state_dict


def _assert_same_weights(expected, actual):
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(expected, name).state_dict(), getattr(actual, name).state_dict()
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}.{key}"


def _without_text_model_level(state_dict):
    """transformers 4's CLIPTextModel keys (text_model.encoder...) as transformers 5 names them."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _image(pipe):
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


def _assert_same_image(want: torch.Tensor, got: torch.Tensor) -> None:
    """Images of two pipelines with bit-identical weights (checked before this), built by different code.

    Not bit-identical themselves: the reloaded modules may run other CPU kernels (1.5e-6 apart on an
    AVX-512 machine); 1e-4 is still far below one 8-bit level of a saved image (3.9e-3).
    """
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny model with every weight nudged (so reloads cannot pass by reading the folder), saved in fp32."""
    components = load_components(str(tiny_model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (components.unet, components.vae, components.text_encoder):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    assert save_single_file(path, components.unet, components.vae, components.text_encoder, dtype=torch.float32) == path
    return components, path


def test_round_trip_through_from_single_file(exported, tiny_model):
    components, path = exported
    reloaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model), safety_checker=None)
    _assert_same_weights(components, reloaded)
    _assert_same_image(_image(components.pipeline()), _image(reloaded))


def test_key_layout(exported):
    components, path = exported
    tensors = load_file(str(path))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in tensors)
    unet, vae, te = (m.state_dict() for m in (components.unet, components.vae, components.text_encoder))
    te = _without_text_model_level(te)
    assert len(tensors) == len(unet) + len(vae) + len(te)
    spot_checks = {
        "model.diffusion_model.input_blocks.0.0.weight": unet["conv_in.weight"],
        "model.diffusion_model.time_embed.2.weight": unet["time_embedding.linear_2.weight"],
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": unet["down_blocks.0.resnets.0.conv1.weight"],
        "model.diffusion_model.input_blocks.2.0.op.weight": unet["down_blocks.0.downsamplers.0.conv.weight"],
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": unet["mid_block.resnets.1.time_emb_proj.weight"],
        "model.diffusion_model.output_blocks.1.1.conv.weight": unet["up_blocks.0.upsamplers.0.conv.weight"],
        "model.diffusion_model.output_blocks.2.1.proj_in.weight": unet["up_blocks.1.attentions.0.proj_in.weight"],
        "model.diffusion_model.out.2.weight": unet["conv_out.weight"],
        "first_stage_model.encoder.conv_in.weight": vae["encoder.conv_in.weight"],
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight":
            vae["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"],
        "first_stage_model.decoder.up.3.upsample.conv.weight": vae["decoder.up_blocks.0.upsamplers.0.conv.weight"],
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight":
            vae["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"],
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight":
            te["encoder.layers.1.self_attn.q_proj.weight"],
    }
    for key, want in spot_checks.items():
        assert torch.equal(tensors[key], want), key
    # LDM's VAE attention uses 1x1 convolutions where diffusers has linear layers
    q = tensors["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert q.shape == (16, 16, 1, 1)
    assert torch.equal(q[:, :, 0, 0], vae["decoder.mid_block.attentions.0.to_q.weight"])


def test_default_dtype_is_fp16_and_path_must_be_safetensors(exported, tmp_path):
    components, _ = exported
    parts = (components.unet, components.vae, components.text_encoder)
    path = save_single_file(tmp_path / "half.safetensors", *parts)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]  # no temporary file left behind
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(tmp_path / "model.ckpt", *parts)


def test_load_components_reads_the_file(exported, tiny_model):
    components, path = exported
    loaded = load_components(str(path), single_file_config=str(tiny_model))
    _assert_same_weights(components, loaded)
    assert loaded.prediction_type == "epsilon"


def test_v_prediction_model_round_trips(tiny_model_v, tmp_path):
    components = load_components(str(tiny_model_v))
    path = save_single_file(tmp_path / "v.safetensors", components.unet, components.vae, components.text_encoder,
                            dtype=torch.float32)
    loaded = load_components(str(path), single_file_config=str(tiny_model_v))
    _assert_same_weights(components, loaded)
    assert loaded.prediction_type == "v_prediction"


def test_unet_layout_follows_the_config(exported, tmp_path):
    """Three levels, two layers per block, linear attention projections (SD 2.x): read back by diffusers."""
    components, _ = exported
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
    )
    unet.save_config(tmp_path / "unet")  # the config only: the weights must come from the file
    tensors = to_original_state_dict(unet, components.vae, components.text_encoder)
    unet_tensors = {k: v.contiguous() for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    assert len(unet_tensors) == len(unet.state_dict())
    # 1 (conv_in) + 2 levels x (2 layers + downsampler): the second downsampler is input_blocks.6
    assert "model.diffusion_model.input_blocks.6.0.op.weight" in unet_tensors
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in unet_tensors  # after the level's attention
    assert unet_tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear, as in SD 2.x
    save_file(unet_tensors, str(tmp_path / "unet.safetensors"))
    reloaded = UNet2DConditionModel.from_single_file(str(tmp_path / "unet.safetensors"), config=str(tmp_path),
                                                     subfolder="unet")
    want, got = unet.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_openclip_layout_fuses_qkv(exported, tiny_model, tmp_path):
    components, _ = exported
    te = _without_text_model_level(components.text_encoder.state_dict())
    tensors = to_original_state_dict(components.unet, components.vae, components.text_encoder,
                                     text_encoder_layout="openclip")
    text_keys = [k for k in tensors if k.startswith("cond_stage_model.")]
    assert all(k.startswith("cond_stage_model.model.") for k in text_keys)
    assert len(text_keys) == len(te) - 4 * components.text_encoder.config.num_hidden_layers  # q/k/v: 6 -> 2 fused
    prefix = "cond_stage_model.model."
    for n in range(components.text_encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{n}.self_attn."
        fused = tensors[f"{prefix}transformer.resblocks.{n}.attn.in_proj_weight"]
        assert torch.equal(fused, torch.cat([te[f"{layer}{p}_proj.weight"] for p in "qkv"]))
        bias = tensors[f"{prefix}transformer.resblocks.{n}.attn.in_proj_bias"]
        assert torch.equal(bias, torch.cat([te[f"{layer}{p}_proj.bias"] for p in "qkv"]))
        c_fc = tensors[f"{prefix}transformer.resblocks.{n}.mlp.c_fc.weight"]
        assert torch.equal(c_fc, te[f"encoder.layers.{n}.mlp.fc1.weight"])
    assert torch.equal(tensors[prefix + "positional_embedding"], te["embeddings.position_embedding.weight"])
    assert torch.equal(tensors[prefix + "ln_final.weight"], te["final_layer_norm.weight"])
    # diffusers reads this layout as SD 2.x's text encoder, splitting in_proj back into q/k/v
    path = save_single_file(tmp_path / "sd2.safetensors", components.unet, components.vae, components.text_encoder,
                            dtype=torch.float32, text_encoder_layout="openclip")
    reloaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model), safety_checker=None)
    _assert_same_weights(components, reloaded)


def test_the_text_encoder_layout_follows_the_model_family_not_the_activation(exported, tiny_sdxl_model):
    components, _ = exported
    config = CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                            num_hidden_layers=1, max_position_embeddings=77, hidden_act="gelu")
    gelu_encoder = CLIPTextModel(config)
    # SD 1.x's UNet (no linear attention projections): OpenAI's CLIP layout, whatever the activation
    tensors = to_original_state_dict(components.unet, components.vae, gelu_encoder)
    assert any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    sd2_unet = UNet2DConditionModel.from_config({**components.unet.config, "use_linear_projection": True})
    tensors = to_original_state_dict(sd2_unet, components.vae, gelu_encoder)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
    assert not any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    # SDXL with a gelu first encoder (as diffusers' tiny SDXL test models have): CLIP, not a ValueError
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    gelu_first = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    tensors = to_original_state_dict(pipe.unet, pipe.vae, gelu_first, text_encoder_2=pipe.text_encoder_2)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in tensors)


def test_text_encoder_tensors_diffusers_drops_are_carried_from_the_source_file(exported, tiny_model, tmp_path):
    """An SD 2.x file's last OpenCLIP layer (which diffusers does not load) survives a DreamBooth export (ComfyUI)."""
    components, _ = exported
    source = to_original_state_dict(components.unet, components.vae, components.text_encoder, text_encoder_layout="openclip")
    layers = components.text_encoder.config.num_hidden_layers
    last = f"cond_stage_model.model.transformer.resblocks.{layers}."  # the layer SD 2.x skips
    g = torch.Generator().manual_seed(2)
    extra = {last + k: torch.randn(v.shape, generator=g) for k, v in source.items()
             if k.startswith("cond_stage_model.model.transformer.resblocks.0.")}
    extra["cond_stage_model.model.text_projection"] = torch.randn(32, 32, generator=g)
    save_file({**{k: v.contiguous() for k, v in source.items()}, **extra}, str(tmp_path / "sd2.safetensors"))
    loaded = load_components(str(tmp_path / "sd2.safetensors"), single_file_config=str(tiny_model))
    assert loaded.source_file == str(tmp_path / "sd2.safetensors")
    assert loaded.text_encoder.config.num_hidden_layers == layers
    path = save_single_file(tmp_path / "out.safetensors", loaded.unet, loaded.vae, loaded.text_encoder,
                            dtype=torch.float32, text_encoder_layout="openclip", carry_from=loaded.source_file)
    written = load_file(str(path))
    for key, tensor in extra.items():
        assert torch.equal(written[key], tensor), key
    assert len(written) == len(source) + len(extra)
    # the carried layer is not read back by diffusers, and the model is unchanged
    _assert_same_weights(components, StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model),
                                                                              safety_checker=None))


# --- SDXL -------------------------------------------------------------------------------------------------

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_exported(tiny_sdxl_model, tmp_path_factory):
    """(pipeline, its config folder, fp32 single file); weights nudged after the folder was saved."""
    # the fixture's second encoder is wider than the first, as SDXL's: diffusers' single-file loader
    # tells them apart by width (at equal widths it reads the CLIP-L weights into text_encoder_2)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    folder = tmp_path_factory.mktemp("sdxl-copy")
    pipe.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in SDXL_PARTS:
            for p in getattr(pipe, name).parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
    pipe.set_progress_bar_config(disable=True)
    path = folder.parent / "sdxl.safetensors"
    assert save_single_file(path, pipe.unet, pipe.vae, pipe.text_encoder, dtype=torch.float32,
                            text_encoder_2=pipe.text_encoder_2) == path
    return pipe, folder, path


def test_sdxl_round_trip_through_from_single_file(sdxl_exported):
    pipe, folder, path = sdxl_exported
    reloaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    for name in SDXL_PARTS:
        want, got = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}.{key}"
    _assert_same_image(_image(pipe), _image(reloaded))


def test_sdxl_key_layout(tiny_sdxl_model):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    unet, vae, te, te2 = (_without_text_model_level(getattr(pipe, name).state_dict()) for name in SDXL_PARTS)
    tensors = to_original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert all(key.startswith(prefixes) for key in tensors)
    layers = pipe.text_encoder_2.config.num_hidden_layers
    assert len(tensors) == len(unet) + len(vae) + len(te) + len(te2) - 4 * layers  # q/k/v: 6 -> 2 fused
    spot_checks = {
        "model.diffusion_model.label_emb.0.0.weight": unet["add_embedding.linear_1.weight"],
        "model.diffusion_model.label_emb.0.2.bias": unet["add_embedding.linear_2.bias"],
        # SDXL's levels: no attention, then 1 and 2 transformer blocks; the first upsampler follows an attention
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
            unet["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.ff.net.2.weight":
            unet["down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2.weight"],
        "model.diffusion_model.middle_block.1.proj_out.weight": unet["mid_block.attentions.0.proj_out.weight"],
        "model.diffusion_model.output_blocks.2.2.conv.weight": unet["up_blocks.0.upsamplers.0.conv.weight"],
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight":
            unet["up_blocks.2.resnets.2.conv_shortcut.weight"],
        "first_stage_model.decoder.up.3.upsample.conv.weight": vae["decoder.up_blocks.0.upsamplers.0.conv.weight"],
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
            te["embeddings.position_embedding.weight"],
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight":
            te["encoder.layers.2.mlp.fc1.weight"],
        "conditioner.embedders.1.model.positional_embedding": te2["embeddings.position_embedding.weight"],
        "conditioner.embedders.1.model.token_embedding.weight": te2["embeddings.token_embedding.weight"],
        "conditioner.embedders.1.model.ln_final.bias": te2["final_layer_norm.bias"],
        # every layer is kept, the last included (SD 2.x's export has none to keep)
        f"conditioner.embedders.1.model.transformer.resblocks.{layers - 1}.mlp.c_proj.bias":
            te2[f"encoder.layers.{layers - 1}.mlp.fc2.bias"],
        f"conditioner.embedders.1.model.transformer.resblocks.{layers - 1}.attn.in_proj_weight":
            torch.cat([te2[f"encoder.layers.{layers - 1}.self_attn.{p}_proj.weight"] for p in "qkv"]),
        # OpenCLIP right-multiplies by the projection: [width, projection_dim], the Linear weight transposed
        "conditioner.embedders.1.model.text_projection": te2["text_projection.weight"].T,
    }
    for key, want in spot_checks.items():
        assert torch.equal(tensors[key], want), key
    assert not any(key.startswith("cond_stage_model.") for key in tensors)


def test_sdxl_parts_must_go_together(tiny_sdxl_model, exported):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    components, _ = exported
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_original_state_dict(components.unet, components.vae, components.text_encoder,
                               text_encoder_2=pipe.text_encoder_2)
    with pytest.raises(ValueError, match="CLIP"):
        to_original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_layout="openclip",
                               text_encoder_2=pipe.text_encoder_2)


def test_sdxl_text_encoder_tensors_diffusers_drops_are_carried(tiny_sdxl_model, tmp_path):
    """A source SDXL file's text-encoder extras (position_ids, logit_scale) survive; other layouts' do not."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    parts = (pipe.unet, pipe.vae, pipe.text_encoder)
    source = to_original_state_dict(*parts, text_encoder_2=pipe.text_encoder_2)
    extra = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6)}
    foreign = {"cond_stage_model.model.text_projection": torch.ones(2, 2), "model_ema.decay": torch.tensor(0.9)}
    save_file({**{k: v.contiguous() for k, v in source.items()}, **extra, **foreign},
              str(tmp_path / "source.safetensors"))
    path = save_single_file(tmp_path / "out.safetensors", *parts, dtype=None, text_encoder_2=pipe.text_encoder_2,
                            carry_from=tmp_path / "source.safetensors")
    written = load_file(str(path))
    assert written.keys() == source.keys() | extra.keys()
    for key, tensor in extra.items():
        assert torch.equal(written[key], tensor), key
