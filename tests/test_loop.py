"""The training loop: seeded loss regression, exact resume, caching equivalence, failures that keep work."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdtune
import sdtune.loop
import sdtune.optim
from sdtune import train_lora
from sdtune.checkpoint import list_checkpoints, resolve_checkpoint
from sdtune.errors import ConfigError, SdtuneError, TrainingDiverged
from sdtune.loop import Trainer
from sdtune.optim import build_optimizer

EXPECTED_LOSSES = Path(__file__).parent / "data" / "expected_losses.json"


def _lora_weights(result):
    return load_file(result.outputs["diffusers"])


def test_seeded_losses_match_the_committed_values(lora_config, tiny_model_v):
    """Regenerate on purpose only: SDTUNE_REGENERATE_LOSSES=1 pytest tests/test_loop.py -k committed."""
    runs = {
        "epsilon": lora_config,
        "v_prediction_min_snr_noise_offset": dataclasses.replace(
            lora_config, pretrained_model_name_or_path=str(tiny_model_v), snr_gamma=5.0, noise_offset=0.05,
            output_dir=lora_config.output_dir + "-v"),
    }
    losses = {name: train_lora(config).loss_history for name, config in runs.items()}
    if os.environ.get("SDTUNE_REGENERATE_LOSSES"):
        EXPECTED_LOSSES.write_text(json.dumps(losses, indent=1) + "\n")
    expected = json.loads(EXPECTED_LOSSES.read_text())
    for name in runs:
        assert len(losses[name]) == lora_config.max_train_steps
        torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(expected[name]), rtol=1e-4, atol=1e-6)


def test_same_seed_same_run_and_other_seed_differs(lora_config, tmp_path):
    a = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "a")))
    b = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "b")))
    c = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "c"), seed=1))
    assert a.loss_history == b.loss_history != c.loss_history


class _Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(lora_config, tmp_path, monkeypatch):
    config = dataclasses.replace(lora_config, max_train_steps=4, checkpointing_steps=2, train_batch_size=3, lr_scheduler="cosine",
                                 lr_warmup_steps=1, random_flip=True, shuffle_caption=True, caption_dropout_rate=0.3)
    full = train_lora(dataclasses.replace(config, output_dir=str(tmp_path / "full")))

    interrupted = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"))
    original_save = Trainer.save_checkpoint

    def save_then_die(self):
        original_save(self)
        raise _Killed  # killed right after the step-2 checkpoint

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_lora(interrupted)
    monkeypatch.setattr(Trainer, "save_checkpoint", original_save)
    assert [p.name for p in list_checkpoints(Path(interrupted.output_dir))] == ["checkpoint-2"]

    resumed = train_lora(dataclasses.replace(interrupted, resume_from_checkpoint="latest"))
    assert resumed.global_step == 4
    assert resumed.loss_history == full.loss_history  # bit for bit, batches 3-4 included
    for key, value in _lora_weights(full).items():
        assert torch.equal(_lora_weights(resumed)[key], value), key
    # the checkpoint holds only LoRA weights, and the same keys as a fresh run (no re-added adapters)
    trained = load_file(Path(interrupted.output_dir) / "checkpoint-4" / "trained.safetensors")
    assert trained.keys() == load_file(Path(full.output_dir) / "checkpoint-4" / "trained.safetensors").keys()
    assert all("lora_" in k for k in trained)


def test_resume_keeps_the_learning_rate_schedule(lora_config, tmp_path, monkeypatch):
    config = dataclasses.replace(lora_config, max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear",
                                 output_dir=str(tmp_path / "o"))
    train_lora(dataclasses.replace(config, max_train_steps=2))
    state = json.loads((tmp_path / "o" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == 2
    trainer = Trainer(dataclasses.replace(config, resume_from_checkpoint="latest"), __import__("sdtune").LoRAMethod(config))
    trainer.setup()
    try:
        assert trainer.state.global_step == 2
        # the saved 2-step schedule ended at lr 0; the 4-step one is half way down
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(config.learning_rate * 0.5)
        assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(config.learning_rate * 0.5)
    finally:
        trainer.cleanup()


def test_half_written_checkpoints_are_ignored(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # killed mid-save
    (tmp_path / "checkpoint-6").mkdir()  # no state file: incomplete
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(SdtuneError, match="checkpoint-6: not a complete sdtune checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)


def test_checkpoints_total_limit_keeps_the_newest(lora_config):
    config = dataclasses.replace(lora_config, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2)
    train_lora(config)
    assert [p.name for p in list_checkpoints(Path(config.output_dir))] == ["checkpoint-4", "checkpoint-6"]


def test_cached_and_uncached_training_agree(lora_config, tmp_path):
    cached = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "c"), random_flip=True))
    uncached = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "u"), random_flip=True,
                                              cache_latents=False, cache_text_embeddings=False))
    torch.testing.assert_close(torch.tensor(cached.loss_history), torch.tensor(uncached.loss_history), rtol=1e-4, atol=1e-6)


def test_disk_cache_is_used_on_the_second_run(lora_config, tmp_path):
    config = dataclasses.replace(lora_config, cache_dir=str(tmp_path / "cache"))
    first = train_lora(dataclasses.replace(config, output_dir=str(tmp_path / "1")))
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 8
    second = train_lora(dataclasses.replace(config, output_dir=str(tmp_path / "2")))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries
    assert first.loss_history == second.loss_history


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(lora_config, monkeypatch):
    config = dataclasses.replace(lora_config, max_train_steps=6, checkpointing_steps=2)
    real_loss = sdtune.loop.diffusion.diffusion_loss
    calls = {"n": 0}

    def loss_that_explodes(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(sdtune.loop.diffusion, "diffusion_loss", loss_that_explodes)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 3; .*resume from .*checkpoint-2"):
        train_lora(config)
    assert [p.name for p in list_checkpoints(Path(config.output_dir))] == ["checkpoint-2"]
    weights = load_file(Path(config.output_dir) / "checkpoint-2" / "trained.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_gradient_accumulation_and_clipping_run(lora_config):
    result = train_lora(dataclasses.replace(lora_config, gradient_accumulation_steps=2, max_grad_norm=0.01, train_batch_size=1))
    assert result.global_step == 4 and len(result.loss_history) == 4


def test_bf16_keeps_trained_weights_in_fp32(lora_config):
    config = dataclasses.replace(lora_config, mixed_precision="bf16", max_train_steps=2)
    trainer = Trainer(config, sdtune.LoRAMethod(config))
    trainer.setup()
    try:
        result = trainer.train()
        unet = trainer.components.unet
        assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
        assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if not p.requires_grad)
        assert all(torch.isfinite(torch.tensor(result.loss_history)))
    finally:
        trainer.cleanup()


def test_adamw_is_fused_on_the_cpu_unless_turned_off(lora_config):
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert build_optimizer(lora_config, params).defaults["fused"] is True
    assert not build_optimizer(dataclasses.replace(lora_config, fused_optimizer=False), params).defaults["fused"]


def test_fused_adamw_before_torch_2_4_falls_back_by_default_and_is_refused_when_asked(lora_config, monkeypatch):
    monkeypatch.setattr(sdtune.optim, "_torch_has_fused_adamw_on_cpu", lambda: False)  # torch before 2.4
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert build_optimizer(lora_config, params).defaults["fused"] is None
    with pytest.raises(ConfigError, match=r"^--fused_optimizer true needs torch 2.4 or newer on the CPU"):
        build_optimizer(dataclasses.replace(lora_config, fused_optimizer=True), params)


def test_adamw8bit_without_cuda_explains_itself(lora_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="--optimizer adamw8bit needs a CUDA GPU"):
        train_lora(dataclasses.replace(lora_config, optimizer="adamw8bit"))


def test_training_the_text_encoder_turns_off_caption_caching(lora_config):
    config = dataclasses.replace(lora_config, train_text_encoder=True, max_train_steps=1)
    trainer = Trainer(config, sdtune.LoRAMethod(config))
    trainer.setup()
    try:
        assert trainer.text_cache is None
    finally:
        trainer.cleanup()


def test_validation_images_and_config_are_written(lora_config):
    config = dataclasses.replace(lora_config, validation_prompt="a sks shape", validation_steps=2, num_validation_images=2,
                                 validation_inference_steps=2, report_to="tensorboard")
    result = train_lora(config)
    out = Path(config.output_dir)
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "step000002-00.png", "step000002-01.png", "step000004-00.png", "step000004-01.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    saved = (out / "sdtune_config.yaml").read_text()
    assert "rank: 4" in saved and result.outputs["config"] == out / "sdtune_config.yaml"


def test_python_api_result(lora_config):
    result = train_lora(lora_config)
    assert result.global_step == 4 and result.final_loss == result.loss_history[-1]
    assert result.outputs["diffusers"].name == "pytorch_lora_weights.safetensors" and result.outputs["kohya"].is_file()
    assert not list(Path(lora_config.output_dir).rglob("*.bin")) and not list(Path(lora_config.output_dir).rglob("*.pkl"))


def test_resume_with_other_settings_names_the_mismatch_in_one_line(lora_config, tmp_path):
    """Another --rank used to end in a raw optimizer or state-dict error."""
    config = dataclasses.replace(lora_config, max_train_steps=2, checkpointing_steps=2, output_dir=str(tmp_path / "out"))
    train_lora(config)
    with pytest.raises(ConfigError, match="saved with other settings") as err:
        train_lora(dataclasses.replace(config, rank=8, max_train_steps=4, resume_from_checkpoint="latest"))
    assert "\n" not in str(err.value) and "[4, " in str(err.value) and "[8, " in str(err.value)


def test_a_wrong_checkpoint_path_fails_before_the_model_loads(lora_config, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the checkpoint path was checked")

    monkeypatch.setattr(sdtune.loop, "load_components", no_loading)
    with pytest.raises(SdtuneError, match="not a complete sdtune checkpoint"):
        train_lora(dataclasses.replace(lora_config, resume_from_checkpoint=str(tmp_path / "nope")))


def test_log_lines_go_through_tqdm_during_training(lora_config, monkeypatch):
    """A console log handler would print inside the progress bar; during the loop tqdm's handler replaces it."""
    import logging
    import sys

    console = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(console)
    seen = []
    original_step = Trainer.training_step

    def step(self, batch, micro_step):
        seen.append([type(h).__name__ for h in logging.root.handlers])
        return original_step(self, batch, micro_step)

    monkeypatch.setattr(Trainer, "training_step", step)
    try:
        train_lora(dataclasses.replace(lora_config, max_train_steps=1))
    finally:
        logging.root.removeHandler(console)
    assert seen and "_TqdmLoggingHandler" in seen[0] and "StreamHandler" not in seen[0]


def test_frozen_text_encoders_leave_the_gpu_once_captions_are_cached(lora_config):
    from sdtune.loop import parked_text_encoder_device

    assert parked_text_encoder_device(torch.device("cuda", 0)) == torch.device("cpu")
    assert parked_text_encoder_device(torch.device("cpu")) == torch.device("cpu")
    # on the CPU nothing moves, and a caption first seen mid-run is encoded and cached beside the others
    trainer = Trainer(lora_config, sdtune.LoRAMethod(lora_config))
    trainer.setup()
    try:
        before = len(trainer.text_cache.entries)
        text = trainer.text_cache(["a caption no image has"])
        assert text["encoder_hidden_states"].device == trainer.accelerator.device
        assert len(trainer.text_cache.entries) == before + 1
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("lever", [{"fused_optimizer": False}, {"channels_last": True}, {"reuse_host_memory": False}])
def test_speed_levers_train_the_same_model(lora_config, tmp_path, lever):
    """AdamW's kernel (fused by default on the CPU), channels-last and malloc's thresholds change how the
    step runs, not what it computes."""
    plain = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "plain")))
    fast = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "fast"), **lever))
    assert fast.loss_history == pytest.approx(plain.loss_history, rel=1e-4, abs=1e-6)
    a, b = load_file(plain.outputs["diffusers"]), load_file(fast.outputs["diffusers"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_compile_compiles_the_repeated_blocks_and_trains_the_same_model(lora_config, tmp_path):
    from sdtune.loop import COMPILED_BLOCKS

    plain = train_lora(dataclasses.replace(lora_config, output_dir=str(tmp_path / "plain"), max_train_steps=2))
    trainer = Trainer(dataclasses.replace(lora_config, output_dir=str(tmp_path / "compiled"), max_train_steps=2, compile=True),
                      sdtune.LoRAMethod(lora_config))
    trainer.setup()
    try:
        blocks = [m for m in trainer.components.unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
        assert blocks and all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert result.loss_history == pytest.approx(plain.loss_history, rel=1e-4, abs=1e-6)


def test_adam_state_is_checkpointed_at_the_last_step_then_freed_before_export(lora_config, tmp_path):
    config = dataclasses.replace(lora_config, max_train_steps=2, checkpointing_steps=2, output_dir=str(tmp_path / "out"))
    trainer = Trainer(config, sdtune.LoRAMethod(config))
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert len(trainer.optimizer.state) == 0  # twice the trained weights, not held while exporting
    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / "optimizer.safetensors"))
    moments = [tensor for key, tensor in saved.items() if key.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments and all(tensor.abs().sum() > 0 for tensor in moments)
