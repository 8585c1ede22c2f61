"""`sdtune generate`: reproducible, every scheduler, img2img, and the trained outputs load."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from sdtune import DreamBoothConfig, TextualInversionConfig, train_dreambooth, train_lora, train_textual_inversion
from sdtune.cli import main
from sdtune.command_configs import SCHEDULERS, GenerateConfig
from sdtune.errors import ConfigError
from sdtune.sampling import run_generate


@pytest.fixture
def gen(tiny_model, tmp_path):
    return GenerateConfig(pretrained_model_name_or_path=str(tiny_model), prompt="a sks shape", num_inference_steps=3,
                          output_dir=str(tmp_path / "samples"), guidance_scale=3.0)


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_seed_makes_images_reproducible_and_different_per_image(gen, tmp_path):
    a = run_generate(dataclasses.replace(gen, num_images=2))
    b = run_generate(dataclasses.replace(gen, num_images=2, output_dir=str(tmp_path / "again")))
    assert np.array_equal(_pixels(a[0]), _pixels(b[0])) and np.array_equal(_pixels(a[1]), _pixels(b[1]))
    assert not np.array_equal(_pixels(a[0]), _pixels(a[1]))  # seed, seed + 1
    assert (tmp_path / "samples" / "grid.png").is_file()
    assert Image.open(tmp_path / "samples" / "grid.png").size == (128, 64)


def test_settings_are_in_the_png_metadata(gen):
    path = run_generate(dataclasses.replace(gen, negative_prompt="blurry", seed=7))[0]
    text = Image.open(path).text["parameters"]
    assert text.startswith("a sks shape\nNegative prompt: blurry\n")
    assert "Steps: 3" in text and "Sampler: dpm++2m-karras" in text and "Seed: 7" in text and "Size: 64x64" in text


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_name_works(gen, scheduler):
    path = run_generate(dataclasses.replace(gen, scheduler=scheduler, num_inference_steps=2))[0]
    assert Image.open(path).size == (64, 64)


def test_img2img_strength_zero_returns_the_input_and_more_changes_it(gen, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    kept = run_generate(dataclasses.replace(gen, init_image=str(init), strength=0.0))[0]
    assert np.array_equal(_pixels(kept), _pixels(init))
    changed = run_generate(dataclasses.replace(gen, init_image=str(init), strength=0.8, output_dir=str(tmp_path / "s2")))[0]
    assert np.abs(_pixels(changed) - _pixels(init)).max() > 10


def test_prompts_file_gives_one_row_per_prompt(gen, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    paths = run_generate(dataclasses.replace(gen, prompt=None, prompts_file=str(prompts), num_images=2))
    assert [p.name[:6] for p in paths] == ["000-00", "000-01", "001-00", "001-01"]
    assert Image.open(paths[2]).text["parameters"].startswith("a blue square")


def test_bad_input_is_a_clear_error(gen, tmp_path):
    with pytest.raises(ConfigError, match="pass --prompt"):
        run_generate(dataclasses.replace(gen, prompt=None))
    with pytest.raises(ConfigError, match="--lora .*nope: no such file or folder"):
        run_generate(dataclasses.replace(gen, lora=str(tmp_path / "nope")))
    no_lora = tmp_path / "not-a-lora"
    no_lora.mkdir()
    (no_lora / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"--lora .*not-a-lora: the folder holds no LoRA file; pass the LoRA file itself"):
        run_generate(dataclasses.replace(gen, lora=str(no_lora)))  # not diffusers' OSError about a .bin file
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="--init_image .*bad.png: not a readable image"):
        run_generate(dataclasses.replace(gen, init_image=str(bad)))


def test_trained_lora_folder_kohya_file_and_scale_change_the_image(gen, lora_config, tmp_path):
    result = train_lora(dataclasses.replace(lora_config, learning_rate=3e-2, max_train_steps=4))
    base = _pixels(run_generate(gen)[0])
    folder = _pixels(run_generate(dataclasses.replace(gen, lora=str(result.output_dir), output_dir=str(tmp_path / "a")))[0])
    kohya = _pixels(run_generate(dataclasses.replace(gen, lora=str(result.outputs["kohya"]), output_dir=str(tmp_path / "b")))[0])
    off = _pixels(run_generate(dataclasses.replace(gen, lora=str(result.output_dir), lora_scale=0.0, output_dir=str(tmp_path / "c")))[0])
    assert np.abs(folder - base).max() > 2
    assert np.abs(kohya - folder).max() <= 3  # the kohya file is fp16
    assert np.array_equal(off, base)


def test_embeddings_and_dreambooth_outputs_load(gen, tiny_model, shapes_dir, tmp_path):
    ti = train_textual_inversion(TextualInversionConfig(
        pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(shapes_dir), output_dir=str(tmp_path / "ti"),
        placeholder_token="<shape-x>", initializer_token="shape", num_vectors=2, resolution=64, learning_rate=0.1,
        max_train_steps=3, checkpointing_steps=0, report_to="none"))
    prompt = dataclasses.replace(gen, prompt="a photo of <shape-x>")
    without = _pixels(run_generate(prompt)[0])
    for i, embedding in enumerate([ti.outputs["diffusers"], ti.outputs["a1111"], ti.output_dir]):
        out = run_generate(dataclasses.replace(prompt, embedding=str(embedding), output_dir=str(tmp_path / f"e{i}")))[0]
        assert np.abs(_pixels(out) - without).max() > 0
    db = train_dreambooth(DreamBoothConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), instance_prompt="a sks shape",
        output_dir=str(tmp_path / "db"), resolution=64, learning_rate=1e-3, max_train_steps=2, checkpointing_steps=0,
        report_to="none", save_precision="fp32"))
    out = run_generate(dataclasses.replace(gen, pretrained_model_name_or_path=str(db.output_dir), output_dir=str(tmp_path / "d")))
    assert np.abs(_pixels(out[0]) - _pixels(run_generate(gen)[0])).max() > 0


def test_cli_generate(gen, capsys):
    assert main(["generate", "--pretrained_model_name_or_path", gen.pretrained_model_name_or_path, "--prompt", "a sks shape",
                 "--num_images", "2", "--scheduler", "euler-a", "--num_inference_steps", "2", "--output_dir", gen.output_dir]) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out


def test_embeddings_are_in_the_png_metadata(gen):
    from sdtune.sampling import png_parameters

    text = png_parameters("a <cat-toy>", dataclasses.replace(gen, embedding="out/cat-toy.safetensors"), 0, (64, 64))
    assert "Embeddings: out/cat-toy.safetensors" in text


@pytest.mark.parametrize("kind", ["lora", "embedding"])
def test_outputs_of_another_base_model_fail_in_one_line(gen, tmp_path, kind, capsys):
    """A LoRA or embedding from another base used to print a line per weight, or a raw ValueError."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / f"{kind}.safetensors"
    if kind == "lora":  # an SD 2.x-sized LoRA: the tiny model's attention is 32 wide, this one 1024
        module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        save_file({f"{module}.lora_A.weight": torch.zeros(4, 1024), f"{module}.lora_B.weight": torch.zeros(32, 4)}, str(path))
    else:
        save_file({"<other>": torch.zeros(1, 1024)}, str(path))
    config = dataclasses.replace(gen, **{kind: str(path)})
    with pytest.raises(ConfigError, match="does not fit the base model") as err:
        run_generate(config)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert main(["generate", "--pretrained_model_name_or_path", gen.pretrained_model_name_or_path, "--prompt", "x",
                 f"--{kind}", str(path), "--output_dir", gen.output_dir]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # no bars
    assert len(lines) == 1 and lines[0].startswith("sdtune: error") and ("1024" in lines[0])


def test_single_file_without_its_config_offline_hints_single_file_config(gen, tiny_model, tmp_path, capsys):
    from sdtune.models import load_components
    from sdtune.single_file import save_single_file

    components = load_components(str(tiny_model))
    path = save_single_file(tmp_path / "model.safetensors", components.unet, components.vae, components.text_encoder)
    assert main(["generate", "--pretrained_model_name_or_path", str(path), "--prompt", "x",
                 "--output_dir", gen.output_dir]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdtune: error")]
    assert len(errors) == 1 and "--single_file_config" in errors[0]
