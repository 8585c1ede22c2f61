"""write_model_card: Hub metadata that round-trips through ModelCard.load, usage per method, no secrets."""

import pytest
from huggingface_hub import ModelCard

from sdtune.errors import ConfigError
from sdtune.model_card import public_settings, write_model_card

BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SETTINGS = {
    "pretrained_model_name_or_path": BASE,
    "rank": 4,
    "learning_rate": 1e-4,
    "max_train_steps": 500,
    "mixed_precision": "fp16",
    "hub_token": "hf_SuperSecretToken0123456789abcd",
    "WANDB_API_KEY": "wandb-secret-value",
    "db_password": "hunter2",
    "client_secret": "s3cr3t",
    "report": {"to": "tensorboard", "access_token": "nested-secret-value"},
    "note": "uses hf_AnotherToken0123456789abcdefgh inline",
}
SECRET_VALUES = ["hf_SuperSecretToken0123456789abcd", "wandb-secret-value", "hunter2", "s3cr3t", "nested-secret-value",
                 "hf_AnotherToken0123456789abcdefgh"]
LOADERS = {
    "lora": "pipe.load_lora_weights(",
    "dreambooth": 'StableDiffusionPipeline.from_pretrained("someone/sks-dog"',
    "textual-inversion": "pipe.load_textual_inversion(",
}


def card_for(tmp_path, method, **overrides):
    kwargs = dict(method=method, base_model=BASE, instance_prompt="a photo of sks dog", trigger_words=["sks"],
                  training_settings=SETTINGS, sample_images=None, repo_id="someone/sks-dog")
    kwargs.update(overrides)
    return write_model_card(tmp_path, **kwargs)


@pytest.mark.parametrize("method", list(LOADERS))
def test_metadata_round_trips_through_ModelCard_load(tmp_path, method):
    path = card_for(tmp_path, method)
    assert path == tmp_path / "README.md"

    data = ModelCard.load(path).data
    assert data.base_model == BASE
    assert data.tags == ["stable-diffusion", "text-to-image", "diffusers", method, "sdtune"]
    assert data.license == "creativeml-openrail-m"
    assert data.instance_prompt == "a photo of sks dog"
    assert data.library_name == "diffusers"


@pytest.mark.parametrize("method", list(LOADERS))
def test_snippet_uses_the_loader_of_the_method_and_the_repo_id(tmp_path, method):
    text = ModelCard.load(card_for(tmp_path, method)).text
    assert LOADERS[method] in text
    assert '"someone/sks-dog"' in text
    assert all(LOADERS[other] not in text for other in LOADERS if other != method)


def test_without_repo_id_the_snippet_loads_the_local_folder(tmp_path):
    text = ModelCard.load(card_for(tmp_path, "lora", repo_id=None)).text
    assert f'pipe.load_lora_weights("{tmp_path}")' in text


def test_secrets_never_reach_the_card(tmp_path):
    content = card_for(tmp_path, "lora").read_text()
    assert all(secret not in content for secret in SECRET_VALUES)
    assert all(key not in content for key in ("hub_token", "WANDB_API_KEY", "db_password", "client_secret"))
    assert "| learning_rate | 0.0001 |" in content and "| rank | 4 |" in content


def test_public_settings_drops_token_secret_password_key_names_at_any_depth():
    kept = public_settings(SETTINGS)
    assert set(kept) == {"pretrained_model_name_or_path", "rank", "learning_rate", "max_train_steps",
                         "mixed_precision", "report"}
    assert kept["report"] == {"to": "tensorboard"}


def test_trigger_words_and_ui_file_are_listed(tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "kohya_lora.safetensors").write_bytes(b"x")
    text = ModelCard.load(card_for(tmp_path, "lora", trigger_words=["sks", "dog"])).text
    assert "`sks`, `dog`" in text
    assert "`kohya_lora.safetensors`" in text and "models/Lora" in text
    assert "`pytorch_lora_weights.safetensors` in" not in text


def test_sample_images_become_widget_and_relative_links(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "samples").mkdir(parents=True)
    elsewhere.mkdir()
    inside, outside = out / "samples" / "a.png", elsewhere / "a.png"
    inside.write_bytes(b"png-inside")
    outside.write_bytes(b"png-outside")

    card = ModelCard.load(card_for(out, "dreambooth", sample_images=[inside, outside]))

    urls = [w["output"]["url"] for w in card.data.widget]
    assert urls == ["samples/a.png", "images/a.png"]
    assert (out / "images" / "a.png").read_bytes() == b"png-outside"
    assert all(w["text"] == "a photo of sks dog" for w in card.data.widget)
    assert "![sample 1](samples/a.png)" in card.text and "![sample 2](images/a.png)" in card.text


def test_local_base_model_stays_out_of_the_metadata(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    card = ModelCard.load(card_for(tmp_path / "out", "lora", base_model=str(local), instance_prompt=None))
    assert "base_model" not in card.data.to_dict() and "instance_prompt" not in card.data.to_dict()
    assert str(local) in card.text


def test_unknown_method_and_missing_image_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        card_for(tmp_path, "hypernetwork")
    with pytest.raises(ConfigError, match="does not exist"):
        card_for(tmp_path, "lora", sample_images=[tmp_path / "missing.png"])


def test_snippet_runs_on_a_machine_without_cuda(tmp_path, tiny_model, monkeypatch):
    """The card's code picks the device (no hard-coded .to("cuda") in fp16) and runs as written on a CPU."""
    import re
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    text = ModelCard.load(card_for(folder, "dreambooth", repo_id=None)).text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert '.to("cuda")' not in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    scope["fast"] = lambda prompt: scope["pipe"](prompt, num_inference_steps=2, height=64, width=64)  # a tiny model
    exec(compile(code.replace("image = pipe(", "image = fast("), "card", "exec"), scope)
    assert (tmp_path / "sample.png").is_file()
