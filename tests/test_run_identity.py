"""Two runs never mix silently: an earlier run's checkpoints are refused, deleted on request, or continued;
a checkpoint resumed with other settings or data says so; one past the end of the run is refused."""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune import train_lora
from sdtune.checkpoint import list_checkpoints
from sdtune.cli import main
from sdtune.errors import ConfigError


@pytest.fixture
def earlier_run(lora_config, tmp_path):
    """A finished run of 6 steps that left checkpoint-2/4/6 in its --output_dir."""
    config = dataclasses.replace(lora_config, max_train_steps=6, checkpointing_steps=2, output_dir=str(tmp_path / "out"))
    train_lora(config)
    assert [p.name for p in list_checkpoints(Path(config.output_dir))] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return config


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_in_one_line(earlier_run, capsys):
    with pytest.raises(ConfigError, match="holds checkpoint-6 of an earlier run; continue it with --resume_from_checkpoint "
                                          "latest, start anew there with --overwrite_output_dir"):
        train_lora(dataclasses.replace(earlier_run, max_train_steps=3))
    code = main(["train-lora", "--pretrained_model_name_or_path", earlier_run.pretrained_model_name_or_path,
                 "--instance_data_dir", earlier_run.instance_data_dir, "--output_dir", earlier_run.output_dir,
                 "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--overwrite_output_dir" in err and "Traceback" not in err
    assert len(list_checkpoints(Path(earlier_run.output_dir))) == 3  # nothing touched


def test_overwrite_starts_anew_and_latest_never_reaches_the_earlier_run(earlier_run, caplog):
    out = Path(earlier_run.output_dir)
    old_final = load_file(out / "checkpoint-6" / "trained.safetensors")
    new = dataclasses.replace(earlier_run, max_train_steps=3, checkpointing_steps=3, learning_rate=5e-3,
                              overwrite_output_dir=True)
    first_part = train_lora(new)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]  # the earlier run's 2/4/6 are gone
    # The sequence: `latest` with a longer run continues the new run's step 3, not the old step 6.
    with caplog.at_level(logging.INFO, logger="sdtune"):
        result = train_lora(dataclasses.replace(new, overwrite_output_dir=False, max_train_steps=6, resume_from_checkpoint="latest"))
    assert "resumed from" in caplog.text and "checkpoint-3 at step 3" in caplog.text
    assert "trained with other settings" not in caplog.text  # the same run: only the length changed
    assert result.global_step == 6 and result.loss_history[:3] == first_part.loss_history  # the new run, continued
    trained = load_file(out / "checkpoint-3" / "trained.safetensors")
    assert any(not (trained[k] == old_final[k]).all() for k in trained)  # checkpoint-3 is the new run's, not the old


def test_resume_refuses_a_checkpoint_past_the_end_of_the_run(earlier_run):
    with pytest.raises(ConfigError, match=r"checkpoint-6 is at step 6, past --max_train_steps 4; pass --max_train_steps 6"):
        train_lora(dataclasses.replace(earlier_run, max_train_steps=4, resume_from_checkpoint="latest"))


def test_resume_with_other_settings_or_data_says_so(earlier_run, tmp_path, caplog):
    changed = dataclasses.replace(earlier_run, max_train_steps=7, learning_rate=2e-3, resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING, logger="sdtune"):
        train_lora(changed)
    assert "trained with other settings: learning_rate 0.001 -> 0.002" in caplog.text
    assert "training data" not in caplog.text
    caplog.clear()
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for path in sorted(Path(earlier_run.instance_data_dir).iterdir())[:8]:  # four of the eight images (png + txt)
        (fewer / path.name).write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="sdtune"):
        train_lora(dataclasses.replace(changed, instance_data_dir=str(fewer), max_train_steps=8))
    assert "the training data (images, crops, captions or class images) differ" in caplog.text


def test_an_output_dir_that_is_a_file_is_one_line(lora_config, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code = main(["train-lora", "--pretrained_model_name_or_path", lora_config.pretrained_model_name_or_path,
                 "--instance_data_dir", lora_config.instance_data_dir, "--output_dir", str(a_file), "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"sdtune: error: --output_dir {a_file} is a file; pass a folder (it is created if missing)\n"


def test_overwrite_and_resume_together_are_refused(lora_config):
    with pytest.raises(ConfigError, match="pass one of them"):
        train_lora(dataclasses.replace(lora_config, overwrite_output_dir=True, resume_from_checkpoint="latest"))


def test_a_failed_export_keeps_the_trained_weights_and_a_rerun_exports_them(lora_config, monkeypatch, capsys):
    from sdtune.methods.lora import LoRAMethod

    real_export = LoRAMethod.export

    def disk_full(self, components, output_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LoRAMethod, "export", disk_full)
    argv = ["train-lora", "--pretrained_model_name_or_path", lora_config.pretrained_model_name_or_path,
            "--instance_data_dir", lora_config.instance_data_dir, "--output_dir", lora_config.output_dir,
            "--report_to", "none", "--resolution", "64", "--max_train_steps", "3", "--checkpointing_steps", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    error = err.splitlines()[-1]  # after the progress bars: the one line that says what happened and what to do
    assert error.startswith("sdtune: error: training finished (3 steps) but the export failed (OSError: [Errno 28] No space")
    assert "the trained weights are in" in error and "--resume_from_checkpoint latest" in error and "Traceback" not in err
    out = Path(lora_config.output_dir)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"] and not (out / "pytorch_lora_weights.safetensors").exists()
    trained = load_file(out / "checkpoint-3" / "trained.safetensors")

    monkeypatch.setattr(LoRAMethod, "export", real_export)
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0  # no training step: the same weights, exported
    assert capsys.readouterr().out.startswith("done: 3 steps")
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    ours = {k.removeprefix("unet."): v for k, v in trained.items() if k.startswith("unet.")}
    assert exported.keys() and all(any(torch.equal(v, w) for w in ours.values()) for v in exported.values())
