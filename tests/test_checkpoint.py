"""Checkpoints hold the method's loadable outputs: the real diffusers loaders reproduce the model at that step."""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from sdtune import DreamBoothConfig, DreamBoothMethod, LoRAMethod, TextualInversionConfig, TextualInversionMethod
from sdtune.checkpoint import list_checkpoints
from sdtune.export import split_embedding_bundle
from sdtune.loop import Trainer
from sdtune.conditioning import SDConditioning


def _train(config, method_cls):
    trainer = Trainer(config, method_cls(config))
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()


def _at_checkpoint(config, method_cls, checkpoint: Path) -> Trainer:
    """The model as training had it at ``checkpoint`` (resumed, not trained further); call cleanup()."""
    config = dataclasses.replace(config, resume_from_checkpoint=str(checkpoint))
    trainer = Trainer(config, method_cls(config))
    trainer.setup()
    trainer.components.unet.eval()
    trainer.components.text_encoder.eval()
    return trainer


def _base(tiny_model) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


@torch.no_grad()
def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return unet(latents, torch.tensor([500]), hidden).sample


@torch.no_grad()
def _text_output(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    return SDConditioning().encode([text_encoder], [tokenizer], [prompt], "cpu")["encoder_hidden_states"]


@pytest.mark.parametrize("pivotal", [False, True], ids=["lora", "pivotal"])
def test_lora_checkpoint_loads_with_load_lora_weights(lora_config, tiny_model, pivotal):
    config = dataclasses.replace(lora_config, max_train_steps=3, checkpointing_steps=2, train_text_encoder=True, lora_alpha=2.0)
    prompt = "a red circle"
    if pivotal:
        config = dataclasses.replace(config, train_text_embeddings=True, placeholder_token="<sks>", initializer_token="shape",
                                     num_vectors=2, instance_prompt="a <sks> shape")
        prompt = "a <sks> circle"
    _train(config, LoRAMethod)
    checkpoint = Path(config.output_dir) / "checkpoint-2"
    trainer = _at_checkpoint(config, LoRAMethod, checkpoint)
    try:
        pipe = _base(tiny_model)
        pipe.load_lora_weights(checkpoint)
        kohya = _base(tiny_model)
        # diffusers' LoRA loader rejects the embedding bundled in a pivotal kohya file; split it off as `sdtune generate` does
        lora, bundles = split_embedding_bundle(load_file(checkpoint / "kohya_lora.safetensors"))
        kohya.load_lora_weights(lora)
        if pivotal:
            pipe.load_textual_inversion(checkpoint)
            kohya.load_textual_inversion(bundles["sks"], token="<sks>")
        expanded = trainer.method.transform_caption(prompt, None)
        torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(trainer.components.unet), rtol=1e-4, atol=1e-5)
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # what the pipeline does with a multi-vector token
        torch.testing.assert_close(_text_output(pipe.tokenizer, pipe.text_encoder, converted),
                                   _text_output(trainer.components.tokenizer, trainer.components.text_encoder, expanded),
                                   rtol=1e-4, atol=1e-5)
        # the kohya file is stored in fp16: the same model up to fp16 rounding of the LoRA weights
        torch.testing.assert_close(_unet_output(kohya.unet), _unet_output(trainer.components.unet), rtol=1e-2, atol=1e-3)
        assert not torch.equal(_unet_output(pipe.unet), _unet_output(_base(tiny_model).unet))  # it did train
    finally:
        trainer.cleanup()


def test_textual_inversion_checkpoint_loads_with_load_textual_inversion(tiny_model, shapes_dir, tmp_path):
    config = TextualInversionConfig(
        pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(shapes_dir), output_dir=str(tmp_path / "out"),
        placeholder_token="<cat-toy>", initializer_token="shape", num_vectors=2, resolution=64, learning_rate=5e-2,
        max_train_steps=3, checkpointing_steps=2, train_batch_size=2, report_to="none",
    )
    _train(config, TextualInversionMethod)
    checkpoint = Path(config.output_dir) / "checkpoint-2"
    assert (checkpoint / "learned_embeds.safetensors").is_file() and (checkpoint / "cat-toy.safetensors").is_file()
    trainer = _at_checkpoint(config, TextualInversionMethod, checkpoint)
    try:
        pipe = _base(tiny_model)
        pipe.load_textual_inversion(checkpoint)
        ours = _text_output(trainer.components.tokenizer, trainer.components.text_encoder, "a <cat-toy> <cat-toy>_1 toy")
        converted = pipe.maybe_convert_prompt("a <cat-toy> toy", pipe.tokenizer)
        assert converted == "a <cat-toy> <cat-toy>_1 toy"
        torch.testing.assert_close(_text_output(pipe.tokenizer, pipe.text_encoder, converted), ours)
        final = load_file(Path(config.output_dir) / "learned_embeds.safetensors")["<cat-toy>"]
        assert not torch.equal(load_file(checkpoint / "learned_embeds.safetensors")["<cat-toy>"], final)  # step 2, not 3
    finally:
        trainer.cleanup()


@pytest.fixture
def db_ema_config(tiny_model, shapes_dir, tmp_path):
    return DreamBoothConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), instance_prompt="a sks shape",
        output_dir=str(tmp_path / "out"), resolution=64, learning_rate=1e-3, max_train_steps=3, train_batch_size=1,
        checkpointing_steps=1, checkpoints_total_limit=2, report_to="none", use_ema=True, ema_decay=0.5,
        train_text_encoder=True,
    )


def test_dreambooth_checkpoint_holds_the_ema_unet_and_the_text_encoder(db_ema_config):
    config = db_ema_config
    result = _train(config, DreamBoothMethod)
    out = Path(config.output_dir)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # --checkpoints_total_limit 2
    assert not list(out.glob(".checkpoint-*"))  # written through a temporary folder, renamed when complete
    checkpoint = out / "checkpoint-2"
    trainer = _at_checkpoint(config, DreamBoothMethod, checkpoint)
    try:
        unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
        names = [n for n, _ in trainer.components.unet.named_parameters()]
        ema = dict(zip(names, trainer.method.ema.shadow_params))
        loaded = dict(unet.named_parameters())
        assert unet.dtype == torch.float32
        assert all(torch.equal(loaded[n], ema[n]) for n in names)  # the EMA weights, as diffusers' checkpoints
        raw = dict(trainer.components.unet.named_parameters())
        assert any(not torch.equal(loaded[n], raw[n]) for n in names)
        text_encoder = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder")
        trained_te = trainer.components.text_encoder.state_dict()
        assert all(torch.equal(v, trained_te[k]) for k, v in text_encoder.state_dict().items())
    finally:
        trainer.cleanup()
    # exporting the EMA weights at every step disturbed nothing: the same losses as a run without checkpoints
    quiet = dataclasses.replace(config, checkpointing_steps=0, output_dir=str(out.parent / "quiet"))
    assert _train(quiet, DreamBoothMethod).loss_history == result.loss_history
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    quiet_exported = load_file(out.parent / "quiet" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, quiet_exported[k]) for k, v in exported.items())


def test_full_dreambooth_checkpoint_without_text_encoder_training_holds_only_the_unet(db_ema_config):
    config = dataclasses.replace(db_ema_config, use_ema=False, train_text_encoder=False, max_train_steps=1)
    _train(config, DreamBoothMethod)
    checkpoint = Path(config.output_dir) / "checkpoint-1"
    assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (checkpoint / "text_encoder").exists()
    trained = load_file(checkpoint / "trained.safetensors")
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    assert all(torch.equal(v, trained[f"unet.{k}"]) for k, v in unet.state_dict().items())
