"""`sdtune eval` and `--eval_steps`: every metric runs through real pipelines on tiny models; the figures that can be
known exactly are asserted exactly (a model is its own reference: no drift, prior preservation 1)."""

import dataclasses
import json

import pytest
import torch

from sdtune.api import evaluate, train_dreambooth, train_lora
from sdtune.cli import main
from sdtune.command_configs import EvalConfig
from sdtune.config import DreamBoothConfig
from sdtune.errors import ConfigError
from sdtune.toy.base_model import BASE_DIR

ALL_FEATURE_METRICS = "clip_t,clip_i,dino,fid,kid,prior_drift"


@pytest.fixture
def eval_config(tiny_model, shapes_dir, tiny_clip, tiny_dino, tmp_path):
    return EvalConfig(
        pretrained_model_name_or_path=str(tiny_model), prompt="a sks shape", num_images=3, instance_data_dir=str(shapes_dir),
        class_prompt="a shape", metrics=ALL_FEATURE_METRICS, clip_model=str(tiny_clip), dino_model=str(tiny_dino),
        fid_features="clip", num_inference_steps=2, output_dir=str(tmp_path / "eval"), cache_dir=str(tmp_path / "cache"),
    )


@pytest.fixture
def strong_lora(lora_config, tmp_path):
    """A LoRA trained hard enough (lr 3e-2) that its images differ visibly from the base's."""
    result = train_lora(dataclasses.replace(lora_config, learning_rate=3e-2, max_train_steps=4,
                                            output_dir=str(tmp_path / "lora")))
    return result.output_dir


def test_every_metric_on_a_lora_and_no_drift_for_the_base_itself(eval_config, strong_lora, tmp_path):
    base = evaluate(dataclasses.replace(eval_config, output_dir=str(tmp_path / "base")))
    assert set(base) == {"clip_t", "clip_i", "dino", "fid_clip", "kid_clip", "kid_clip_std", "prior_drift"}
    assert base["prior_drift"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same model, same seeds
    assert all(-1.0 <= base[m] <= 1.0 for m in ("clip_t", "clip_i", "dino"))
    assert base["fid_clip"] >= 0  # named by its feature space: not comparable with an Inception FID
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())

    tuned = evaluate(dataclasses.replace(eval_config, lora=str(strong_lora)))
    assert tuned["prior_drift"] > 1e-4  # the LoRA moved the class prompt's images (the base: exactly 0)
    assert tuned["clip_i"] != base["clip_i"] and tuned["fid_clip"] != base["fid_clip"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # the reference was sampled once
    out = tmp_path / "eval"
    assert json.loads((out / "metrics.json").read_text()) == tuned
    assert (out / "grid.png").is_file()
    assert len(list(out.glob("prompts-*.png"))) == 3 and len(list(out.glob("class-*.png"))) == 3


def test_every_checkpoint_of_a_dreambooth_run_gives_a_row(eval_config, lora_config, tmp_path):
    run = tmp_path / "db"
    train_dreambooth(DreamBoothConfig(**{**dataclasses.asdict(lora_config), "learning_rate": 1e-4, "max_train_steps": 3,
                                         "checkpointing_steps": 2, "output_dir": str(run)}))
    result = evaluate(dataclasses.replace(eval_config, checkpoints=str(run), metrics="clip_t,prior_drift"))
    steps = [row["step"] for row in result["steps"]]
    assert steps == [2, 3]  # checkpoint-2 (unet/ swapped into the base), then the final pipeline folder
    assert result["steps"][0]["prior_drift"] > 0
    out = tmp_path / "eval"
    assert (out / "metrics_by_step.csv").read_text().splitlines()[0] == "step,clip_t,prior_drift"
    assert (out / "metrics_by_step.png").stat().st_size > 1000
    assert (out / "step-2" / "grid.png").is_file()


def test_toy_figures_of_the_toy_base_are_real(tmp_path):
    config = EvalConfig(pretrained_model_name_or_path=str(BASE_DIR), metrics="toy", toy_concept="a", toy_samples=12,
                        scheduler="ddim", guidance_scale=5.0, batch_size=12, output_dir=str(tmp_path / "eval"))
    figures = evaluate(config)
    assert figures["prior_preservation"] == 1.0  # the base is its own reference
    assert figures["subject_fidelity"] == 0.0  # the star is held out of the base's pretraining
    assert 0.0 <= figures["context_fidelity"] <= figures["subject_fidelity"] + 1e-9


@pytest.mark.parametrize("change, message", [
    (dict(metrics="clip_i", instance_data_dir=None), "--metrics clip_i needs --instance_data_dir"),
    (dict(metrics="prior_drift", class_prompt=None), "--metrics prior_drift needs --class_prompt"),
    (dict(metrics="toy"), "--metrics toy needs --toy_concept"),
    (dict(prompt=None, prompts="missing.txt", metrics="clip_t"), "--prompts missing.txt: no such file"),
    (dict(checkpoints="no-such-run", metrics="clip_t"), "--checkpoints no-such-run: no such folder"),
    (dict(metrics="auto", prompt=None, instance_data_dir=None, class_prompt=None), "nothing to measure"),
])
def test_bad_input_is_one_line(eval_config, change, message):
    with pytest.raises(ConfigError, match=message) as err:
        evaluate(dataclasses.replace(eval_config, **change))
    assert "\n" not in str(err.value)


def test_cli_rejects_an_unknown_metric_in_one_line(capsys):
    assert main(["eval", "--pretrained_model_name_or_path", "x", "--metrics", "clip_t,fidd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown fidd" in err


def test_auto_picks_the_metrics_whose_inputs_are_given():
    assert EvalConfig(prompt="p").metric_names() == ["clip_t"]
    assert EvalConfig(prompt="p", instance_data_dir="d", class_prompt="c").metric_names() == \
        ["clip_t", "clip_i", "dino", "prior_drift"]
    assert EvalConfig(toy_concept="b").metric_names() == ["toy"]


def _train_with_eval_steps(lora_config, tiny_clip, tmp_path, **changes):
    """4 LoRA steps measured at steps 2 and 4; returns (the run, its history.jsonl rows)."""
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"clip_model: {tiny_clip}\ndrift_features: clip\nnum_images: 2\nnum_inference_steps: 2\n")
    config = dataclasses.replace(lora_config, learning_rate=3e-2, max_train_steps=4, eval_steps=2,
                                 eval_metrics="clip_t,prior_drift", eval_config=str(recipe), class_prompt="a shape",
                                 validation_prompt="a sks shape", num_validation_images=0, **changes)
    result = train_lora(config)
    history = [json.loads(line) for line in (result.output_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [2, 4]
    assert all(-1 <= row["clip_t"] <= 1 for row in history)
    assert 0 < history[0]["prior_drift"] and history[0]["prior_drift"] != history[1]["prior_drift"]
    return result, history


def test_eval_steps_logs_the_figures_while_training(lora_config, tiny_clip, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = _train_with_eval_steps(lora_config, tiny_clip, tmp_path, report_to="tensorboard")
    events = [p for p in (result.output_dir / "logs").rglob("events.out.tfevents.*")]
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert "eval/clip_t" in tags


def test_eval_steps_under_bf16_samples_the_training_model(lora_config, tiny_clip, tmp_path):
    # the models are sampled (and the samples scored) under training's bf16 autocast, in the middle of the run
    _train_with_eval_steps(lora_config, tiny_clip, tmp_path, mixed_precision="bf16")


def test_eval_steps_checks_its_inputs_before_training(lora_config, tmp_path):
    config = dataclasses.replace(lora_config, eval_steps=2, eval_metrics="clip_i", output_dir=str(tmp_path / "o"),
                                 instance_data_dir=lora_config.instance_data_dir)
    with pytest.raises(ConfigError, match="clip_i, dino, fid and kid score samples of --prompts"):
        train_lora(config)
    assert not list((tmp_path / "o").glob("checkpoint-*"))


def test_prior_drift_is_zero_for_the_same_images():
    from sdtune.image_metrics import mean_paired_cosine

    features = torch.randn(4, 8)
    assert 1.0 - mean_paired_cosine(features, features.clone()) == pytest.approx(0.0, abs=1e-7)
