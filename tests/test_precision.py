"""Every method runs end to end (training, class images, validation, checkpoint, export) in every precision
this machine offers; the others are refused at start in one line. --mixed_precision auto detects, never assumes."""

import dataclasses
from pathlib import Path

import pytest
import torch

from sdtune import (
    ControlNetConfig, DreamBoothConfig, LoRAConfig, TextualInversionConfig, train_controlnet, train_dreambooth, train_lora,
    train_textual_inversion,
)
from sdtune.errors import ConfigError
from sdtune.precision import cpu_has_amx_bf16, resolve_mixed_precision

METHODS = ["lora", "dreambooth", "dreambooth_lora", "textual_inversion", "pivotal", "controlnet"]


def _run(method: str, mixed_precision: str, tiny_model, shapes_dir, tmp_path):
    """2 steps with a checkpoint, validation and (DreamBooth) generated class images."""
    common = dict(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), output_dir=str(tmp_path / "out"),
        resolution=64, max_train_steps=2, train_batch_size=1, checkpointing_steps=2, report_to="none",
        mixed_precision=mixed_precision, validation_prompt="a sks shape", validation_steps=2, num_validation_images=1,
        validation_inference_steps=2, instance_prompt="a sks shape",
    )
    prior = dict(with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a shape",
                 num_class_images=1, class_generation_steps=2, sample_batch_size=1)
    token = dict(placeholder_token="<sks>", initializer_token="shape", validation_prompt="a <sks> shape")
    if method == "lora":
        return train_lora(LoRAConfig(**common, rank=2))
    if method == "dreambooth":
        return train_dreambooth(DreamBoothConfig(**common, **prior, learning_rate=1e-4, save_single_file=True))
    if method == "dreambooth_lora":
        return train_dreambooth(DreamBoothConfig(**common, **prior, use_lora=True, rank=2, learning_rate=1e-4))
    if method == "controlnet":
        from PIL import Image

        from sdtune.control import canny

        maps = tmp_path / "edges"
        maps.mkdir()
        for path in shapes_dir.glob("*.png"):
            canny(Image.open(path).convert("RGB")).save(maps / path.name)
        return train_controlnet(ControlNetConfig(**common, conditioning_data_dir=str(maps), learning_rate=1e-4,
                                                 validation_image=str(maps / path.name)))
    if method == "textual_inversion":
        common.pop("instance_data_dir"), common.pop("instance_prompt")
        return train_textual_inversion(TextualInversionConfig(**{**common, **token}, train_data_dir=str(shapes_dir)))
    return train_lora(LoRAConfig(**{**common, **token, "instance_prompt": "a <sks> shape"}, rank=2, train_text_embeddings=True))


EXPECTED_OUTPUTS = {
    "lora": {"diffusers", "kohya"}, "dreambooth_lora": {"diffusers", "kohya"}, "pivotal": {"diffusers", "kohya", "embeddings"},
    "dreambooth": {"pipeline", "single_file"}, "textual_inversion": {"diffusers", "a1111"},
    "controlnet": {"controlnet", "single_file"},
}


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(method, mixed_precision, tiny_model, shapes_dir, tmp_path):
    result = _run(method, mixed_precision, tiny_model, shapes_dir, tmp_path)
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.loss_history)))
    assert EXPECTED_OUTPUTS[method] <= result.outputs.keys() and all(p.exists() for p in result.outputs.values())
    out = Path(result.output_dir)
    assert len(list((out / "validation").glob("step000002-*.png"))) == 1
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    if method.startswith("dreambooth"):
        assert list((tmp_path / "class").glob("class-*.png"))


@pytest.mark.parametrize("method", METHODS)
def test_fp16_runs_on_a_gpu_and_is_refused_on_the_cpu_in_one_line(method, tiny_model, shapes_dir, tmp_path):
    if torch.cuda.is_available():
        result = _run(method, "fp16", tiny_model, shapes_dir, tmp_path)
        assert all(torch.isfinite(torch.tensor(result.loss_history)))
        return
    with pytest.raises(ConfigError, match=r"^--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision auto"):
        _run(method, "fp16", tiny_model, shapes_dir, tmp_path)
    assert not (tmp_path / "class").exists()  # refused before any work


def test_auto_picks_bf16_on_the_cpu_only_with_amx(tmp_path, monkeypatch):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile amx_int8\n")
    assert not cpu_has_amx_bf16(str(avx2)) and cpu_has_amx_bf16(str(amx))
    assert not cpu_has_amx_bf16(str(tmp_path / "missing"))  # not Linux: never assumed
    cpu = torch.device("cpu")
    monkeypatch.setattr("sdtune.precision.cpu_has_amx_bf16", lambda: False)
    assert resolve_mixed_precision("auto", cpu) == "no"
    monkeypatch.setattr("sdtune.precision.cpu_has_amx_bf16", lambda: True)
    assert resolve_mixed_precision("auto", cpu) == "bf16"
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert resolve_mixed_precision("auto", torch.device("cuda")) == expected
    assert resolve_mixed_precision("auto", torch.device("mps")) == "no"
    assert [resolve_mixed_precision(p, cpu) for p in ("no", "fp16", "bf16", None)] == ["no", "fp16", "bf16", None]


def test_auto_runs_here(lora_config):
    result = train_lora(dataclasses.replace(lora_config, mixed_precision="auto", max_train_steps=1))
    assert result.global_step == 1


def test_recipes_use_auto():
    recipes = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))
    for recipe in recipes:
        assert "mixed_precision: fp16" not in recipe.read_text() and "mixed_precision: bf16" not in recipe.read_text()
    assert sum("mixed_precision: auto" in r.read_text() for r in recipes) == len(recipes)


def test_fp16_from_accelerates_config_is_refused_naming_where_it_came_from(lora_config, monkeypatch):
    """The shipped accelerate_config.yaml says fp16; on a CPU the refusal must not name a flag the user never passed."""
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine's GPU")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --config_file` sets
    with pytest.raises(ConfigError, match=r"^fp16 mixed precision \(from accelerate's config: `accelerate launch "
                                          r"--config_file` or ACCELERATE_MIXED_PRECISION\) needs a GPU; on the CPU use"):
        train_lora(dataclasses.replace(lora_config, mixed_precision=None))
