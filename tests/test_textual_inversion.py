"""Textual inversion and pivotal tuning: only the new rows learn, tokens expand, both formats load."""

import dataclasses
import random

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdtune import LoRAConfig, TextualInversionConfig, TextualInversionMethod, train_lora
from sdtune.cli import main
from sdtune.errors import ConfigError
from sdtune.export import DIFFUSERS_LORA_FILE, LEARNED_EMBEDS_FILE
from sdtune.loop import Trainer
from sdtune.methods.embeddings import NewTokenEmbeddings
from sdtune.methods.textual_inversion import OBJECT_TEMPLATES, TEMPLATE_CAPTION, caption_from_templates
from sdtune.models import load_components

TOKEN = "<cat-toy>"


@pytest.fixture
def ti_config(tiny_model, shapes_dir, tmp_path):
    return TextualInversionConfig(
        pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(shapes_dir), output_dir=str(tmp_path / "out"),
        placeholder_token=TOKEN, initializer_token="shape", num_vectors=3, resolution=64, learning_rate=5e-2,
        max_train_steps=3, train_batch_size=2, checkpointing_steps=0, report_to="none",
        adam_weight_decay=0.0,  # so any change of the new rows is learning, not decay
    )


def _train(config, method):
    trainer = Trainer(config, method)
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    return trainer, result


def _prompt_embedding(pipe_or_components, prompt):
    tokenizer, text_encoder = pipe_or_components.tokenizer, pipe_or_components.text_encoder
    if hasattr(pipe_or_components, "maybe_convert_prompt"):
        prompt = pipe_or_components.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_only_the_new_rows_change(ti_config, tiny_model):
    base = load_components(str(tiny_model))
    trainer, result = _train(ti_config, TextualInversionMethod(ti_config))
    c = trainer.components
    new_ids = trainer.method.embeddings.token_ids[0]
    assert c.tokenizer.convert_ids_to_tokens(new_ids) == [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    trained = c.text_encoder.get_input_embeddings().weight.detach()
    original = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(trained[: original.shape[0]], original)  # every old row restored exactly
    init = original[base.tokenizer.encode("shape", add_special_tokens=False)[0]]
    assert all(not torch.allclose(trained[i], init) for i in new_ids)  # the new rows learned
    for name in ("unet", "vae"):
        for k, v in getattr(base, name).state_dict().items():
            assert torch.equal(getattr(c, name).state_dict()[k], v)
    for k, v in base.text_encoder.state_dict().items():
        if "token_embedding" not in k:
            assert torch.equal(c.text_encoder.state_dict()[k], v)


def test_initializer_that_splits_is_rejected_with_the_count(tiny_model):
    components = load_components(str(tiny_model))
    with pytest.raises(ConfigError, match=r"--initializer_token 'sks' splits into 2 tokens \(s, ks</w>\)"):
        NewTokenEmbeddings(TOKEN, "sks", 1).add_to(components)
    with pytest.raises(ConfigError, match="'red</w>' is already a token|'red' is already a token"):
        NewTokenEmbeddings("red", None, 1).add_to(components)


def test_multi_vector_prompts_expand_and_templates_fill_in():
    emb = NewTokenEmbeddings(TOKEN, None, 3)
    assert emb.expand(f"a photo of {TOKEN} on a table") == f"a photo of {TOKEN} {TOKEN}_1 {TOKEN}_2 on a table"
    assert emb.expand("no token here") == "no token here"
    caption = caption_from_templates(TEMPLATE_CAPTION, random.Random(0), TOKEN, "object")
    assert caption in {t.format(TOKEN) for t in OBJECT_TEMPLATES}
    assert "in the style of <cat-toy>" in caption_from_templates(TEMPLATE_CAPTION, random.Random(0), TOKEN, "style")
    own = f"my own caption with {TOKEN}"
    assert caption_from_templates(own, random.Random(0), TOKEN, "object") == own
    # a caption without the token would teach it nothing: a template replaces it
    assert TOKEN in caption_from_templates("a sks shape", random.Random(0), TOKEN, "object")


@pytest.mark.parametrize("which", ["diffusers", "a1111"])
def test_both_export_formats_load_in_diffusers(ti_config, tiny_model, which):
    trainer, result = _train(ti_config, TextualInversionMethod(ti_config))
    reference = _prompt_embedding(trainer.components, f"a photo of {TOKEN} {TOKEN}_1 {TOKEN}_2")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    if which == "diffusers":
        assert result.outputs["diffusers"].name == LEARNED_EMBEDS_FILE
        pipe.load_textual_inversion(result.output_dir)  # the token name comes from the file
    else:
        assert result.outputs["a1111"].name == "cat-toy.safetensors"
        with safe_open(result.outputs["a1111"], "pt") as f:
            assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (3, 32)
            assert f.metadata()["token"] == TOKEN
        pipe.load_textual_inversion(str(result.outputs["a1111"]), token=TOKEN)
    loaded = _prompt_embedding(pipe, f"a photo of {TOKEN}")  # the pipeline expands <tok> to its 3 vectors
    torch.testing.assert_close(loaded, reference)


def test_cli_with_the_diffusers_script_flags(ti_config, tmp_path):
    code = main(["train-textual-inversion", "--pretrained_model_name_or_path", ti_config.pretrained_model_name_or_path,
                 "--train_data_dir", ti_config.train_data_dir, "--placeholder_token", TOKEN, "--initializer_token", "shape",
                 "--num_vectors", "2", "--learnable_property", "style", "--resolution", "64", "--max_train_steps", "1",
                 "--output_dir", str(tmp_path / "cli"), "--report_to", "none"])
    assert code == 0 and (tmp_path / "cli" / LEARNED_EMBEDS_FILE).is_file() and (tmp_path / "cli" / "cat-toy.safetensors").is_file()


# ----------------------------------------------------------------------------- pivotal tuning


@pytest.fixture
def pivotal_config(tiny_model, shapes_dir, tmp_path):
    return LoRAConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), output_dir=str(tmp_path / "piv"),
        instance_prompt=f"a photo of {TOKEN}", placeholder_token=TOKEN, initializer_token="shape", num_vectors=2,
        train_text_embeddings=True, text_embeddings_lr=5e-2, train_text_embeddings_frac=0.5, resolution=64, learning_rate=1e-2,
        max_train_steps=4, train_batch_size=2, checkpointing_steps=0, report_to="none",
    )


def test_pivotal_export_loads_in_diffusers_and_changes_the_image(pivotal_config, tiny_model):
    result = train_lora(dataclasses.replace(pivotal_config, shuffle_caption=False))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(result.output_dir)
    prompt = f"a photo of {TOKEN}"

    def image():
        out = pipe(prompt, num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="np")
        return torch.from_numpy(out.images[0])

    embeddings_only = image()
    pipe.load_lora_weights(result.output_dir, weight_name=DIFFUSERS_LORA_FILE)
    assert (image() - embeddings_only).abs().max() > 1 / 255
    with safe_open(result.outputs["kohya"], "pt") as f:
        keys = list(f.keys())
        bundle = f.get_tensor("bundle_emb.cat-toy.string_to_param.*")
    assert bundle.shape == (2, 32) and any(k.startswith("lora_unet_") for k in keys)
    # ComfyUI skips bundle_emb keys: the embedding also comes as its own file, for models/embeddings
    with safe_open(result.outputs["a1111_embedding"], "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        torch.testing.assert_close(f.get_tensor("emb_params"), bundle.float(), atol=1e-3, rtol=1e-3)  # bundle: fp16
    assert result.outputs["a1111_embedding"].name == "cat-toy.safetensors"


@pytest.mark.parametrize("set_grads_to_none", [True, False])
@pytest.mark.parametrize("train_text_encoder", [False, True])  # with a text-encoder LoRA the encoder keeps training
def test_pivotal_embeddings_stop_learning_after_the_fraction(pivotal_config, set_grads_to_none, train_text_encoder):
    pivotal_config = dataclasses.replace(pivotal_config, set_grads_to_none=set_grads_to_none,
                                         train_text_encoder=train_text_encoder)
    trainer = Trainer(pivotal_config, __import__("sdtune").LoRAMethod(pivotal_config))
    trainer.setup()
    snapshots = []
    original = trainer.method.after_step

    def record(components):
        original(components)
        snapshots.append(trainer.method.embeddings.vectors(components)[0])

    trainer.method.after_step = record
    trainer.train()
    trainer.cleanup()
    assert not torch.equal(snapshots[1], snapshots[0])  # steps 1-2 learn the embeddings (frac 0.5 of 4)
    assert torch.equal(snapshots[3], snapshots[2]) and torch.equal(snapshots[2], snapshots[1])  # frozen after


def test_pivotal_needs_a_placeholder_token(pivotal_config):
    with pytest.raises(ConfigError, match="--placeholder_token is required"):
        train_lora(dataclasses.replace(pivotal_config, placeholder_token=None))


def test_generate_loads_the_pivotal_kohya_file_with_its_bundled_embedding(pivotal_config, tmp_path):
    import numpy as np
    from PIL import Image

    from sdtune.command_configs import GenerateConfig
    from sdtune.sampling import run_generate

    result = train_lora(pivotal_config)
    gen = GenerateConfig(pretrained_model_name_or_path=pivotal_config.pretrained_model_name_or_path,
                         prompt=f"a photo of {TOKEN}", num_inference_steps=3, output_dir=str(tmp_path / "kohya"))
    from_kohya = run_generate(dataclasses.replace(gen, lora=str(result.outputs["kohya"])))[0]
    from_pair = run_generate(dataclasses.replace(gen, lora=str(result.output_dir), embedding=str(result.output_dir),
                                                 output_dir=str(tmp_path / "pair")))[0]
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (from_kohya, from_pair))
    assert np.abs(a - b).max() <= 3  # the same LoRA and token; the kohya file is fp16
