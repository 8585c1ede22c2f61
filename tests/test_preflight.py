"""Mistakes a run can know at start are refused at start: before torch is imported (CLI), before the model
loads (Python API), never after training."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

import sdtune.loop
from sdtune import train_lora
from sdtune.errors import ConfigError


def _cli_in_fresh_process(args: list[str], tmp_path) -> tuple[str, str]:
    """Run sdtune's CLI in a new interpreter; return (stderr's last line, whether torch had been imported)."""
    probe = ("import sys; from sdtune.cli import main; code = main(sys.argv[1:]); "
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported', code)")
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path)
    return result.stderr.strip().splitlines()[-1], result.stdout.strip()


@pytest.mark.parametrize("wrong, message", [
    (["--pretrained_model_name_or_path", "./no-such-model"], "--pretrained_model_name_or_path ./no-such-model: no such file or folder"),
    (["--instance_data_dir", "./no-such-folder"], "--instance_data_dir ./no-such-folder: no such folder"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_data_dir FOLDER"),
])
def test_cli_mistakes_fail_before_torch_is_imported(wrong, message, tiny_model, shapes_dir, tmp_path):
    args = ["train-dreambooth", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(shapes_dir),
            "--instance_prompt", "a sks shape", "--output_dir", str(tmp_path / "out"), *wrong]
    error, outcome = _cli_in_fresh_process(args, tmp_path)
    assert error == f"sdtune: error: {message}" or (error.startswith("sdtune: error: ") and message in error)
    assert outcome == "torch not imported 2"


def _no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was refused")

    monkeypatch.setattr(sdtune.loop, "load_components", refuse)


def test_adamw8bit_without_cuda_is_refused_before_the_model_loads(lora_config, monkeypatch):
    _no_model_loading(monkeypatch)
    with pytest.raises(ConfigError, match="--optimizer adamw8bit needs a CUDA GPU"):
        train_lora(dataclasses.replace(lora_config, optimizer="adamw8bit"))


def test_push_to_hub_while_offline_is_refused_before_training(lora_config, monkeypatch):
    _no_model_loading(monkeypatch)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it when huggingface_hub is imported
    with pytest.raises(ConfigError, match=r"--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set \(offline\)"):
        train_lora(dataclasses.replace(lora_config, push_to_hub=True, hub_model_id="me/x"))


def test_a_hub_id_while_offline_is_one_line_that_says_offline_and_nothing_else(lora_config, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdtune", "train-lora", "--pretrained_model_name_or_path", "someone/some-model",
         "--instance_data_dir", lora_config.instance_data_dir, "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("sdtune: error: --pretrained_model_name_or_path someone/some-model: could not load the "
                                "model (HF_HUB_OFFLINE is set (offline), so a Hub id loads only from the local cache: ")
    # around it only sdtune's own log lines (time, logger), no notices from libraries (local_dir_use_symlinks, ...)
    assert all(re.match(r"\d\d:\d\d:\d\d sdtune", line) for line in lines[:-1]), lines
    assert "Traceback" not in result.stderr and "deprecated" not in result.stderr


def test_no_notices_a_user_cannot_act_on(lora_config, tmp_path):
    """Gradient checkpointing of a trained text encoder warned (transformers renamed the method); a LoRA without
    text-encoder keys made diffusers say so at every generate."""
    import warnings


    config = dataclasses.replace(lora_config, train_text_encoder=True, gradient_checkpointing=True, max_train_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lora(config)
    assert not [w for w in caught if "checkpointing_enable" in str(w.message)]
    unet_only = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "unet-only"), max_train_steps=1))
    result = subprocess.run(
        [sys.executable, "-m", "sdtune", "generate", "--pretrained_model_name_or_path", lora_config.pretrained_model_name_or_path,
         "--lora", str(unet_only.output_dir), "--prompt", "a sks shape", "--num_inference_steps", "2", "--height", "64",
         "--width", "64", "--output_dir", str(tmp_path / "images")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No LoRA keys" not in result.stderr and "deprecated" not in result.stderr
