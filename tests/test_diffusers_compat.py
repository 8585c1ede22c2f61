"""diffusers example-script flags: every one is accepted, mapped, ignored with a reason, or refused in one line."""

import dataclasses
import logging
import os

import pytest

from sdtune.cli import main, parse_config
from sdtune.config import DreamBoothConfig, LoRAConfig, TextualInversionConfig, resolve_epochs
from sdtune.diffusers_compat import ALIASES, MOOT, REFUSED, hide_hub_token

# Every flag of the four SD 1.x scripts (their argparse lists), with a value where it takes one.
VALUE = {
    "adam_beta1": "0.9", "adam_beta2": "0.999", "adam_epsilon": "1e-08", "adam_weight_decay": "0.01", "cache_dir": "c",
    "caption_column": "text", "checkpointing_steps": "500", "checkpoints_total_limit": "2", "class_data_dir": "cls",
    "class_labels_conditioning": "timesteps", "class_prompt": "a dog", "dataloader_num_workers": "0",
    "dataset_config_name": "default", "dataset_name": "d", "gradient_accumulation_steps": "1", "hub_model_id": "me/x",
    "hub_token": "hf_x", "image_column": "image", "image_interpolation_mode": "lanczos", "initializer_token": "toy",
    "instance_data_dir": "d", "instance_prompt": "a sks dog", "learnable_property": "object", "learning_rate": "1e-4",
    "local_rank": "-1", "logging_dir": "logs", "lora_dropout": "0.0", "lr_num_cycles": "1", "lr_power": "1.0",
    "lr_scheduler": "constant", "lr_warmup_steps": "0", "max_grad_norm": "1.0", "max_train_samples": "10",
    "max_train_steps": "10", "mixed_precision": "no", "noise_offset": "0.05", "num_class_images": "100",
    "num_train_epochs": "1", "num_validation_images": "4", "num_vectors": "1", "output_dir": "out",
    "placeholder_token": "<cat-toy>", "prediction_type": "epsilon", "pretrained_model_name_or_path": "m",
    "prior_generation_precision": "fp16", "prior_loss_weight": "1.0", "rank": "4", "repeats": "100", "report_to": "none",
    "resolution": "512", "resume_from_checkpoint": "latest", "revision": "main", "sample_batch_size": "4",
    "save_steps": "500", "seed": "0", "snr_gamma": "5.0", "tokenizer_max_length": "77", "tokenizer_name": "tok",
    "train_batch_size": "1", "train_data_dir": "d", "validation_epochs": "1", "validation_prompt": "a dog",
    "validation_scheduler": "DPMSolverMultistepScheduler", "validation_steps": "100", "variant": "fp16",
}
STORE_TRUE = {"allow_tf32", "center_crop", "enable_xformers_memory_efficient_attention", "gradient_checkpointing",
              "offset_noise", "pre_compute_text_embeddings", "push_to_hub", "random_flip", "save_as_full_pipeline",
              "scale_lr", "set_grads_to_none", "skip_save_text_encoder", "text_encoder_use_attention_mask",
              "train_text_encoder", "use_8bit_adam", "with_prior_preservation"}
COMMON = ["adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "allow_tf32", "center_crop", "checkpointing_steps",
          "checkpoints_total_limit", "dataloader_num_workers", "enable_xformers_memory_efficient_attention",
          "gradient_accumulation_steps", "gradient_checkpointing", "hub_model_id", "hub_token", "learning_rate", "local_rank",
          "logging_dir", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "mixed_precision", "num_train_epochs",
          "num_validation_images", "output_dir", "pretrained_model_name_or_path", "push_to_hub", "report_to", "resolution",
          "resume_from_checkpoint", "revision", "scale_lr", "seed", "train_batch_size", "validation_prompt", "variant"]
DREAMBOOTH = ["class_data_dir", "class_labels_conditioning", "class_prompt", "instance_data_dir", "instance_prompt",
              "lr_num_cycles", "lr_power", "max_grad_norm", "num_class_images", "pre_compute_text_embeddings",
              "prior_generation_precision", "prior_loss_weight", "sample_batch_size", "text_encoder_use_attention_mask",
              "tokenizer_max_length", "tokenizer_name", "train_text_encoder", "use_8bit_adam", "validation_images",
              "with_prior_preservation"]
SCRIPTS = {
    "train_dreambooth.py": ("train-dreambooth", COMMON + DREAMBOOTH + [
        "offset_noise", "set_grads_to_none", "skip_save_text_encoder", "snr_gamma", "validation_scheduler",
        "validation_steps"]),
    "train_dreambooth_lora.py": ("train-dreambooth", COMMON + DREAMBOOTH + [
        "image_interpolation_mode", "lora_dropout", "rank", "validation_epochs"]),
    "train_text_to_image_lora.py": ("train-lora", COMMON + [
        "cache_dir", "caption_column", "dataset_config_name", "dataset_name", "image_column", "image_interpolation_mode",
        "max_grad_norm", "max_train_samples", "noise_offset", "prediction_type", "random_flip", "rank", "snr_gamma",
        "train_data_dir", "use_8bit_adam", "validation_epochs"]),
    "textual_inversion.py": ("train-textual-inversion", COMMON + [
        "initializer_token", "learnable_property", "lr_num_cycles", "num_vectors", "placeholder_token", "repeats",
        "save_as_full_pipeline", "save_steps", "tokenizer_name", "train_data_dir", "validation_epochs",
        "validation_steps"]),
}


def _argv(flags):
    argv = []
    for flag in flags:
        argv.append(f"--{flag}")
        if flag == "validation_images":
            argv += ["a.png", "b.png"]  # nargs="+"
        elif flag not in STORE_TRUE:
            argv.append(VALUE[flag])
    return argv


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_the_diffusers_script_is_accepted(script, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "")  # --hub_token writes it; monkeypatch restores it
    command, flags = SCRIPTS[script]
    config, _ = parse_config(command, _argv(flags))
    assert config.pretrained_model_name_or_path == "m"


def test_the_table_covers_only_flags_that_are_not_options():
    fields = {f.name for cls in (LoRAConfig, DreamBoothConfig, TextualInversionConfig) for f in dataclasses.fields(cls)}
    assert not (set(ALIASES) | set(MOOT) | set(REFUSED)) & fields
    assert all(alias.field in fields for alias in ALIASES.values())


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--use_8bit_adam"], "optimizer", "adamw8bit"),
        (["--save_steps", "7"], "checkpointing_steps", 7),
        (["--offset_noise"], "noise_offset", 0.1),
        (["--pre_compute_text_embeddings"], "cache_text_embeddings", True),
        (["--use_8bit_adam", "--optimizer", "prodigy"], "optimizer", "prodigy"),  # the sdtune option wins
        (["--save_steps", "7", "--checkpointing_steps", "3"], "checkpointing_steps", 3),
        (["--num_train_epochs", "3", "--max_train_steps", "9"], "num_train_epochs", None),  # steps win, as in diffusers
        (["--num_train_epochs", "3"], "num_train_epochs", 3),
        (["--allow_tf32"], "allow_tf32", True),
        (["--num_validation_images", "0"], "num_validation_images", 0),
    ],
)
def test_diffusers_aliases_map_to_sdtune_options(argv, field, value):
    config, _ = parse_config("train-dreambooth", argv)
    assert getattr(config, field) == value


def test_moot_flags_are_accepted_with_one_logged_line(caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    parse_config("train-dreambooth", ["--enable_xformers_memory_efficient_attention", "--local_rank", "0"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("--enable_xformers_memory_efficient_attention: accepted and ignored; PyTorch SDPA")
               for line in lines)
    assert sum("--local_rank" in line for line in lines) == 1


def test_refused_flag_says_why_in_one_line(capsys):
    assert main(["train-textual-inversion", "--no_safe_serialization"]) == 2
    assert capsys.readouterr().err == "sdtune: error: --no_safe_serialization: only safetensors files are written\n"


def test_all_unknown_flags_are_reported_at_once_with_their_did_you_mean(capsys):
    assert main(["train-lora", "--rnak", "4", "--lerning-rate=1", "--zzzz"]) == 2
    err = capsys.readouterr().err
    assert err == ("sdtune: error: unknown options '--rnak' (did you mean '--rank'?), "
                   "'--lerning-rate' (did you mean '--learning_rate'?), '--zzzz'\n")


@pytest.mark.parametrize("argv, message", [
    (["--rank"], "argument --rank: expected one argument"),
    (["--use_8bit_adam", "maybe"], "--use_8bit_adam: expected true or false, got 'maybe'"),
    (["--num_train_epochs", "0"], "num_train_epochs must be positive, got 0"),
])
def test_bad_values_are_one_line(argv, message, capsys):
    assert main(["train-dreambooth", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_dreambooth_learning_rate_defaults_follow_the_diffusers_script():
    assert DreamBoothConfig().learning_rate == 5e-6  # train_dreambooth.py
    assert DreamBoothConfig(use_lora=True).learning_rate == 5e-4  # train_dreambooth_lora.py
    assert DreamBoothConfig(use_lora=True, learning_rate=1e-4).learning_rate == 1e-4
    config, _ = parse_config("train-dreambooth", ["--use_lora"])
    assert config.learning_rate == 5e-4


def test_push_to_hub_without_hub_model_id_names_the_repo_after_the_output_folder(tmp_path):
    config, _ = parse_config("train-lora", ["--push_to_hub", "--output_dir", str(tmp_path / "sks-dog-lora")])
    assert config.hub_model_id == "sks-dog-lora"


@pytest.mark.parametrize("fields, batches, expected", [
    ({"num_train_epochs": 3}, 5, {"max_train_steps": 15}),
    ({"num_train_epochs": 2, "gradient_accumulation_steps": 2}, 5, {"max_train_steps": 6}),  # ceil(5 / 2) per epoch
    ({"num_train_epochs": 1, "repeats": 100}, 1, {"max_train_steps": 100}),
    ({"validation_epochs": 2}, 4, {"validation_steps": 8, "max_train_steps": 1000}),
])
def test_epochs_become_steps_from_the_dataset_size(fields, batches, expected):
    config = resolve_epochs(LoRAConfig(**fields), batches)
    assert {name: getattr(config, name) for name in expected} == expected


def test_textual_inversion_repeats_default_is_the_diffusers_one():
    assert TextualInversionConfig().repeats == 100 and LoRAConfig().repeats == 1


def test_hub_token_goes_to_the_environment_never_to_the_config(monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "")
    config, _ = parse_config("train-lora", ["--hub_token", "hf_SecretToken123"])
    assert os.environ["HF_TOKEN"] == "hf_SecretToken123"
    assert "hf_SecretToken123" not in str(config.to_dict())
    assert "HF_TOKEN" in caplog.text and "hf_SecretToken123" not in caplog.text


def test_hub_token_is_blanked_in_the_command_line():
    argv = ["sdtune", "train-lora", "--hub_token", "hf_a", "--hub-token=hf_b", "--rank", "4"]
    hide_hub_token(argv)
    assert argv == ["sdtune", "train-lora", "--hub_token", "***", "--hub-token=***", "--rank", "4"]


def test_epochs_samples_tokenizer_and_full_pipeline_flags_train_end_to_end(tiny_model, shapes_dir, tmp_path, capsys):
    """textual_inversion.py's flags: 2 of 8 images x 2 epochs = 4 steps, validation every epoch, a pipeline folder."""
    from transformers import CLIPTokenizer

    out = tmp_path / "out"
    argv = ["train-textual-inversion", "--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(shapes_dir),
            "--placeholder_token", "<cat-toy>", "--initializer_token", "a", "--resolution", "64", "--train_batch_size", "1",
            "--max_train_samples", "2", "--repeats", "1", "--num_train_epochs", "2", "--validation_epochs", "1",
            "--validation_prompt", "a <cat-toy>", "--num_validation_images", "1", "--validation_inference_steps", "1",
            "--tokenizer_name", str(tiny_model), "--save_as_full_pipeline", "--report_to", "none", "--output_dir", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("done: 4 steps")
    assert sorted(p.name[:10] for p in (out / "validation").glob("*.png")) == ["step000002", "step000004"]
    assert "<cat-toy>" in CLIPTokenizer.from_pretrained(out / "tokenizer").get_vocab()
