"""File formats other tools read: tokenizer files for transformers 4, file modes."""

import json
import os

import pytest
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


# --- SDXL: kohya-ss LoRA names and the clip_l/clip_g embedding layout -------------------------

def _sdxl_pipe(model_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model_dir).to("cpu")


def _sdxl_image(pipe):
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
                generator=generator, output_type="np").images[0]


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl_model, tmp_path_factory):
    """A randomised LoRA on the tiny SDXL (UNet attention, feed-forward, resnet and sampler
    convs; both text encoders' q/k/v/out), saved as diffusers' file and as the kohya file."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdtune.export import save_kohya_lora
    from sdtune.methods.lora import TEXT_ENCODER_TARGETS, unet_target_modules

    pipe = _sdxl_pipe(tiny_sdxl_model)
    torch.manual_seed(1)

    def lora_config(targets):
        return LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)

    pipe.unet.add_adapter(lora_config(unet_target_modules(pipe.unet, "all")))
    pipe.text_encoder.add_adapter(lora_config(TEXT_ENCODER_TARGETS))
    pipe.text_encoder_2.add_adapter(lora_config(TEXT_ENCODER_TARGETS))
    states = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name)
        with torch.no_grad():  # lora_B starts at zero; randomise it so that the LoRA changes the image
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.normal_(0, 0.3)
        states[name] = get_peft_model_state_dict(model)
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=states["unet"], text_encoder_lora_layers=states["text_encoder"],
        text_encoder_2_lora_layers=states["text_encoder_2"], safe_serialization=True)
    kohya = save_kohya_lora(folder / "kohya.safetensors", states["unet"], states["text_encoder"], alpha=4, rank=4,
                            dtype=torch.float32, text_encoder_2_state_dict=states["text_encoder_2"], sdxl_unet=pipe.unet)
    return folder / "pytorch_lora_weights.safetensors", kohya


def test_sdxl_kohya_lora_names_modules_as_kohya_ss_does(sdxl_lora):
    from safetensors import safe_open

    with safe_open(str(sdxl_lora[1]), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    modules = {key.split(".")[0] for key in keys}
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                   "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(m.startswith(prefix) for m in modules), prefix
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
            "lora_unet_input_blocks_1_0_in_layers_2",  # down_blocks.0.resnets.0.conv1
            "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_2_2_conv", "lora_unet_middle_block_0_emb_layers_1",
            "lora_unet_output_blocks_0_0_out_layers_3",
            "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"} <= modules
    assert not any(m.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_"))
                   for m in modules)
    assert metadata["ss_base_model_version"].startswith("sdxl_")  # how A1111 files it under SDXL


def test_sdxl_kohya_lora_loads_in_diffusers_like_the_diffusers_file(sdxl_lora, tiny_sdxl_model, caplog):
    """Every kohya key lands on the module diffusers' own file puts it on, and the images agree."""
    import logging

    import numpy as np
    import torch
    from diffusers.utils import logging as diffusers_logging
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    base = _sdxl_image(_sdxl_pipe(tiny_sdxl_model))
    images, adapters = {}, {}
    for name, path in zip(("diffusers", "kohya"), sdxl_lora):
        pipe = _sdxl_pipe(tiny_sdxl_model)
        caplog.clear()
        diffusers_logging.enable_propagation()  # diffusers' logger does not reach caplog otherwise
        try:
            with caplog.at_level(logging.WARNING):
                # diffusers raises on a kohya key it cannot rename, and warns of LoRA keys no module takes
                pipe.load_lora_weights(load_file(str(path)), adapter_name="lora")
        finally:
            diffusers_logging.disable_propagation()
        assert not [r for r in caplog.records if "keys" in r.getMessage()], caplog.text
        adapters[name] = {part: get_peft_model_state_dict(getattr(pipe, part), adapter_name="lora")
                          for part in ("unet", "text_encoder", "text_encoder_2")}
        images[name] = _sdxl_image(pipe)
    for part, weights in adapters["diffusers"].items():
        assert weights and weights.keys() == adapters["kohya"][part].keys(), part
        assert all(torch.equal(weights[k], adapters["kohya"][part][k]) for k in weights), part
    assert np.abs(images["kohya"] - images["diffusers"]).max() < 1e-5
    for image in images.values():
        assert np.abs(image - base).mean() > 0.01  # the LoRA visibly changes the image


def test_sdxl_embedding_file_and_bundle(tmp_path):
    import torch
    from safetensors.torch import load_file

    from sdtune.export import kohya_embedding_bundle, save_a1111_embedding, split_embedding_bundle

    vectors = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    path = save_a1111_embedding(tmp_path, "<cat-toy>", vectors)
    assert path.name == "cat-toy.safetensors"
    saved = load_file(str(path))
    assert sorted(saved) == ["clip_g", "clip_l"]  # A1111's and ComfyUI's SDXL embedding layout
    assert all(torch.equal(saved[k], vectors[k]) for k in vectors)
    bundle = kohya_embedding_bundle("<cat-toy>", vectors)
    assert sorted(bundle) == ["bundle_emb.cat-toy.clip_g", "bundle_emb.cat-toy.clip_l"]
    sd1 = kohya_embedding_bundle("<dog>", torch.randn(3, 768))
    lora, bundles = split_embedding_bundle({**bundle, **sd1, "lora_unet_x.alpha": torch.tensor(4.0)})
    assert list(lora) == ["lora_unet_x.alpha"]
    assert bundles.keys() == {"cat-toy", "dog"} and torch.equal(bundles["dog"], sd1["bundle_emb.dog.string_to_param.*"])
    assert bundles["cat-toy"].keys() == vectors.keys()
    assert all(torch.equal(bundles["cat-toy"][k], vectors[k]) for k in vectors)
    with pytest.raises(ValueError):
        save_a1111_embedding(tmp_path, "<x>", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)})


def test_sdxl_kohya_names_dora_magnitudes_and_refuses_what_it_cannot_name(tiny_sdxl_model, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.export import KOHYA_UNET_PREFIX, peft_to_kohya, save_kohya_lora, sdxl_unet_module_names

    names = sdxl_unet_module_names(UNet2DConditionModel.from_pretrained(tiny_sdxl_model, subfolder="unet"))
    module = "down_blocks.0.resnets.0.conv1"
    dora = {f"{module}.lora_A.weight": torch.zeros(4, 16, 3, 3), f"{module}.lora_B.weight": torch.zeros(16, 4, 1, 1),
            f"{module}.lora_magnitude_vector": torch.ones(1, 16, 1, 1)}
    out = peft_to_kohya(dora, KOHYA_UNET_PREFIX, 4, names)
    assert out["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (16, 1, 1, 1)
    with pytest.raises(ValueError, match="no original"):
        peft_to_kohya({"not_a_unet_module.lora_A.weight": torch.zeros(1)}, KOHYA_UNET_PREFIX, 4, names)
    with pytest.raises(ValueError, match="sdxl_unet"):  # lora_te2_ only makes sense with SDXL's UNet names
        save_kohya_lora(tmp_path / "x.safetensors", {}, None, alpha=4, rank=4,
                        text_encoder_2_state_dict={"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1)})
