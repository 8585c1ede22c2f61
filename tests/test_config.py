"""Recipes, flags and validation: every recipe loads, flags override, mistakes give one clear line."""

import dataclasses
from pathlib import Path

import pytest

from sdtune.cli import build_parser, main, parse_config
from sdtune.config import LoRAConfig
from sdtune.options import build_config, load_recipe
from sdtune.errors import ConfigError

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert {p.relative_to(p.parents[1]).as_posix() for p in RECIPES} >= {
        "sd15/lora.yaml", "sd21/lora.yaml", "sd15/dreambooth.yaml", "sd15/dreambooth_lora.yaml", "sd21/dreambooth.yaml",
        "sd15/textual_inversion.yaml", "sd15/pivotal.yaml", "sdxl/lora.yaml", "sdxl/dreambooth_lora.yaml",
        "sdxl/dreambooth.yaml", "sdxl/textual_inversion.yaml", "sdxl/pivotal.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_loads(recipe):
    command = {"dreambooth": "train-dreambooth", "textual": "train-textual-inversion"}.get(recipe.stem.split("_")[0], "train-lora")
    config, _ = parse_config(command, ["--config", str(recipe)])
    assert config.pretrained_model_name_or_path


def test_sd21_recipe_is_v_prediction_at_768():
    config, _ = parse_config("train-lora", ["--config", str(Path(__file__).parents[1] / "recipes/sd21/lora.yaml")])
    assert config.prediction_type == "v_prediction" and config.resolution == 768


def test_flags_override_recipe_with_dashes_or_underscores(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rank: 8\nrandom_flip: true\nlearning_rate: 1.0e-4\n")
    config, _ = parse_config("train-lora", ["--config", str(recipe), "--rank", "32", "--random-flip", "false", "--learning_rate", "3e-4"])
    assert (config.rank, config.random_flip, config.learning_rate) == (32, False, 3e-4)
    config, _ = parse_config("train-lora", ["--random_flip", "--snr_gamma", "5", "--lora_alpha", "none"])
    assert config.random_flip is True and config.snr_gamma == 5.0 and config.lora_alpha is None


def test_diffusers_script_flag_names_are_accepted():
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a photo of sks dog",
            "--resolution", "512", "--rank", "16", "--max_train_steps", "1000", "--output_dir", "out", "--train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--lr_scheduler", "cosine_with_restarts",
            "--lr_num_cycles", "3", "--lr_warmup_steps", "10", "--checkpointing_steps", "100", "--seed", "1"]
    config, _ = parse_config("train-lora", argv)
    assert config.lr_num_cycles == 3 and config.mixed_precision == "bf16" and config.instance_prompt == "a photo of sks dog"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rnak", "4"], "unknown option '--rnak' (did you mean '--rank'?)"),
        (["--rank", "four"], "--rank: expected int, got 'four'"),
        (["--lora_targets", "atn"], "lora_targets: 'atn' is not one of attn, attn_ff, all; did you mean 'attn'?"),
        (["--mixed_precision", "fp8"], "mixed_precision: 'fp8' is not one of no, fp16, bf16"),
        (["--rank", "0"], "rank must be positive, got 0"),
        (["--caption_dropout_rate", "2"], "caption_dropout_rate must be between 0 and 1"),
        (["--random_flip", "maybe"], "--random_flip: expected true or false, got 'maybe'"),
        (["--resolution", "60"], "resolution must be a multiple of 8, got 60 (try 56)"),
        (["--resolution", "64", "--enable_bucket"], "min_bucket_reso (256) is larger than resolution (64): every bucket "
                                                    "would be larger than the training size; pass --min_bucket_reso 64 or less"),
    ],
)
def test_bad_flags_give_one_clear_line(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_config("train-lora", argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_recipe_key_suggests_the_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key in .*r.yaml 'learning_rat'; did you mean 'learning_rate'\?"):
        parse_config("train-lora", ["--config", str(recipe)])


def test_wrong_type_in_recipe_is_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rank: [1, 2]\n")
    with pytest.raises(ConfigError, match="rank: expected int"):
        parse_config("train-lora", ["--config", str(recipe)])


def test_missing_recipe_file_is_named():
    with pytest.raises(ConfigError, match="--config nope.yaml: no such file"):
        load_recipe("nope.yaml")


def test_help_lists_every_option_with_its_default(capsys):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train-lora"]
    text = sub.format_help()
    for f in dataclasses.fields(LoRAConfig):
        assert f"--{f.name}" in text
    assert "(default: 4)" in text  # rank


@pytest.mark.parametrize("command", ["train-lora", "train-dreambooth", "train-textual-inversion", "generate", "caption",
                                     "push", "demo"])
def test_help_says_each_default_once(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert (action.help or "").count("(default") <= 1, action.help
    if command == "demo":
        base = next(a for a in sub._actions if a.dest == "base_model")
        assert base.help.endswith("(default: the one shipped with sdtune).")


def test_print_config_prints_resolved_yaml(capsys):
    assert main(["train-lora", "--rank", "12", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "rank: 12" in out and "method: lora" in out


def test_cli_errors_are_one_line_without_traceback(capsys, tmp_path):
    code = main(["train-lora", "--pretrained_model_name_or_path", str(tmp_path / "missing"), "--instance_data_dir", str(tmp_path),
                 "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sdtune: error: --pretrained_model_name_or_path") and err.count("\n") == 1
    assert "Traceback" not in err


def test_configs_are_frozen_and_validated_from_python():
    config = build_config(LoRAConfig, {"rank": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 3
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRAConfig(rank=-1)


@pytest.mark.parametrize("value", ["-1e-4", "-1E-4", "-0.5", "-3"])
def test_negative_numbers_are_values_and_meet_the_range_check(value):
    """argparse took `-1e-4` for an option and printed the usage text; now the range check answers in one line."""
    with pytest.raises(ConfigError, match="learning_rate must not be negative") as info:
        parse_config("train-lora", ["--learning_rate", value])
    assert "\n" not in str(info.value)
