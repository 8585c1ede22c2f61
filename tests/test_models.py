"""Loading the pretrained components: layouts, prediction type, dtype, and refusing pickle by default."""

import json
import shutil

import pytest
import torch

from sdtune.errors import ModelLoadError
from sdtune.models import load_components


def test_loads_a_diffusers_folder_frozen_in_eval_mode(tiny_model):
    c = load_components(str(tiny_model))
    assert c.prediction_type == "epsilon"
    for module in (c.unet, c.vae, c.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert c.tokenizer.model_max_length == 77 and len(c.fingerprint) == 16


def test_prediction_type_comes_from_the_scheduler_or_the_option(tiny_model, tiny_model_v):
    assert load_components(str(tiny_model_v)).prediction_type == "v_prediction"
    assert load_components(str(tiny_model), prediction_type="v_prediction").prediction_type == "v_prediction"


def test_weight_dtype_applies_to_frozen_parts_and_the_vae_stays_fp32_under_fp16(tiny_model):
    c = load_components(str(tiny_model), weight_dtype=torch.float16)
    assert c.unet.dtype == torch.float16 and c.text_encoder.dtype == torch.float16
    assert c.vae.dtype == torch.float32  # SD 2.x/XL VAEs overflow to NaN in fp16
    assert load_components(str(tiny_model), weight_dtype=torch.bfloat16).vae.dtype == torch.bfloat16


def test_tokenizer_saved_without_max_length_is_fixed(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    config_path = model / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_max_length", None)
    config_path.write_text(json.dumps(config))
    assert load_components(str(model)).tokenizer.model_max_length == 77


def test_fingerprint_follows_the_vae_weights(tiny_model, tmp_path):
    from sdtune.toy import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    assert load_components(str(tiny_model)).fingerprint == load_components(str(tiny_model)).fingerprint
    assert load_components(str(tiny_model)).fingerprint != load_components(str(other)).fingerprint


def test_pickle_weights_are_refused_unless_allowed(tiny_model, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    for path in model.rglob("*.safetensors"):
        path.with_suffix(".bin").write_bytes(b"")  # stand-in: only the presence of pickle files matters here
        path.unlink()
    with pytest.raises(ModelLoadError, match="holds only pickle weights .* pass --allow_pickle"):
        load_components(str(model))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model.ckpt is a pickle file, .* pass --allow_pickle"):
        load_components(str(ckpt))


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_components(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_components("someone/not-downloaded-model")  # offline: a Hub id not in the cache
