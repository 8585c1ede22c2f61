"""The LoRA method: what trains, what stays frozen, and that both exports load in diffusers."""

import dataclasses
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdtune import LoRAMethod
from sdtune.export import DIFFUSERS_LORA_FILE
from sdtune.loop import Trainer
from sdtune.methods.lora import KOHYA_LORA_FILE, unet_target_modules
from sdtune.models import load_components


def _train(config):
    trainer = Trainer(config, LoRAMethod(config))
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    return trainer, result


def _fixed_inputs(tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = tokenizer(["a sks shape"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g), ids


@pytest.fixture(scope="module", params=[("attn", False), ("all", True)], ids=["attn", "all+text_encoder"])
def trained(request, tiny_model, shapes_dir, tmp_path_factory):
    """A LoRA trained 5 steps with lora_alpha != rank, and its model's outputs on fixed inputs."""
    from sdtune import LoRAConfig

    targets, train_te = request.param
    config = LoRAConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir),
        output_dir=str(tmp_path_factory.mktemp("lora")), resolution=64, rank=4, lora_alpha=8, learning_rate=1e-2,
        max_train_steps=5, train_batch_size=2, checkpointing_steps=0, report_to="none", lora_targets=targets,
        train_text_encoder=train_te,
    )
    trainer, result = _train(config)
    x, t, ehs, ids = _fixed_inputs(trainer.components.tokenizer)
    with torch.no_grad():
        unet_out = trainer.components.unet(x, t, ehs).sample
        te_out = trainer.components.text_encoder(ids)[0]
    return config, trainer, result, unet_out, te_out


def test_only_lora_parameters_change(trained, tiny_model):
    config, trainer, *_ = trained
    base = load_components(str(tiny_model))
    for name in ("unet", "text_encoder", "vae"):
        trained_sd = getattr(trainer.components, name).state_dict()
        base_sd = getattr(base, name).state_dict()
        lora_keys = [k for k in trained_sd if "lora_" in k]
        assert bool(lora_keys) == (name == "unet" or (name == "text_encoder" and config.train_text_encoder))
        for key, value in base_sd.items():
            trained_key = key if key in trained_sd else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(trained_sd[trained_key], value), f"{name}.{key} changed"
        for key in lora_keys:
            if "lora_B" in key:  # initialised to zero: any change is training
                assert trained_sd[key].abs().sum() > 0, f"{key} did not train"


def test_lora_targets_select_attention_feedforward_and_convs(tiny_model):
    unet = load_components(str(tiny_model)).unet
    attn, attn_ff, everything = (set(unet_target_modules(unet, t)) for t in ("attn", "attn_ff", "all"))
    assert attn and attn < attn_ff < everything
    assert all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for name in attn)
    assert any(name.endswith("ff.net.2") for name in attn_ff) and any(name.endswith("proj_in") for name in attn_ff)
    assert any(name.endswith("resnets.0.conv1") for name in everything)
    assert all(isinstance(unet.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d)) for n in everything)


@pytest.mark.parametrize("weight_name", [None, KOHYA_LORA_FILE], ids=["diffusers", "kohya"])
def test_exports_load_in_diffusers_with_the_trained_scale(trained, tiny_model, weight_name):
    """Loading either file in diffusers reproduces the trained model (alpha 8 at rank 4 included)."""
    config, trainer, result, unet_out, te_out = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    x, t, ehs, ids = _fixed_inputs(pipe.tokenizer)
    with torch.no_grad():
        base_out = pipe.unet(x, t, ehs).sample
    # weight_name: diffusers before ~0.40 cannot search a local folder offline
    pipe.load_lora_weights(result.output_dir, weight_name=weight_name or DIFFUSERS_LORA_FILE)
    with torch.no_grad():
        loaded_out = pipe.unet(x, t, ehs).sample
        loaded_te = pipe.text_encoder(ids)[0]
    tolerance = 1e-5 if weight_name is None else 2e-3  # the kohya file is fp16, as the UIs expect
    assert (unet_out - base_out).abs().max() > 0.05  # the LoRA matters ...
    torch.testing.assert_close(loaded_out, unet_out, atol=tolerance, rtol=tolerance)  # ... and loads exactly
    torch.testing.assert_close(loaded_te, te_out, atol=tolerance, rtol=tolerance)


def test_export_changes_the_generated_image(trained, tiny_model):
    _, _, result, *_ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        out = pipe("a sks shape", num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(0),
                   output_type="np")
        return torch.from_numpy(out.images[0])

    before = image()
    pipe.load_lora_weights(result.output_dir, weight_name=DIFFUSERS_LORA_FILE)
    assert (image() - before).abs().max() > 1 / 255


def test_kohya_keys_and_alpha(trained):
    config, trainer, result, *_ = trained
    with safe_open(result.outputs["kohya"], "pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        metadata = f.metadata()
        downs = [k for k in keys if k.endswith(".lora_down.weight")]
        assert all(f.get_tensor(k).dtype == torch.float16 for k in downs)
    assert alphas == {8.0}  # the real alpha, not the rank
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys) == config.train_text_encoder
    if config.lora_targets == "all":
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 8.0
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert len(downs) * 3 == len(keys)  # down, up, alpha per module


def test_diffusers_file_records_lora_alpha(trained):
    import json

    _, _, result, *_ = trained
    with safe_open(result.outputs["diffusers"], "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8 and metadata["unet.r"] == 4


@pytest.mark.parametrize("targets", ["attn", "all"])  # "all" has conv layers: peft's magnitude there is [1, out, 1, 1]
def test_dora_trains_and_exports_magnitude(lora_config, targets):
    config = dataclasses.replace(lora_config, use_dora=True, max_train_steps=2, lora_targets=targets)
    trainer, result = _train(config)
    with safe_open(result.outputs["kohya"], "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".dora_scale")}
        ups = {k: f.get_tensor(k.replace(".dora_scale", ".lora_up.weight")) for k in scales}
    assert scales  # per-output-row magnitudes as LyCORIS/ComfyUI read them: [out, 1]
    assert all(s.shape == (ups[k].shape[0],) + (1,) * (ups[k].ndim - 1) for k, s in scales.items())
    pipe = StableDiffusionPipeline.from_pretrained(config.pretrained_model_name_or_path, safety_checker=None)
    # the diffusers file carries DoRA's magnitudes
    pipe.load_lora_weights(result.output_dir, weight_name=DIFFUSERS_LORA_FILE)
    x, t, ehs, _ = _fixed_inputs(pipe.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, trainer.components.unet(x, t, ehs).sample, atol=1e-5, rtol=1e-5)


def test_diffusers_file_keeps_the_text_model_level_and_files_follow_the_umask(trained):
    """diffusers 0.32 + transformers 4 fail (IndexError in get_peft_kwargs) on text-encoder keys without `text_model.`."""
    config, trainer, result, *_ = trained
    with safe_open(result.outputs["diffusers"], "pt") as f:
        te_keys = [k for k in f.keys() if k.startswith("text_encoder.")]
    assert bool(te_keys) == config.train_text_encoder
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    umask = os.umask(0)
    os.umask(umask)
    for path in (result.outputs["diffusers"], result.outputs["kohya"], result.outputs["config"]):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # safetensors alone writes 0600
