"""DreamBooth: prior preservation as data, class-image generation, full fine-tune, EMA, exports, launch."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file
from PIL import Image

from sdtune import DreamBoothConfig, DreamBoothMethod, train_dreambooth
from sdtune.data.class_images import class_image_name, ensure_class_images
from sdtune.data.dataset import BucketBatchSampler
from sdtune.diffusion import diffusion_loss, min_snr_weights
from sdtune.loop import Trainer
from sdtune.models import load_components

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_config(tiny_model, shapes_dir, tmp_path):
    return DreamBoothConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), instance_prompt="a sks shape",
        output_dir=str(tmp_path / "out"), resolution=64, learning_rate=1e-3, max_train_steps=3, train_batch_size=1,
        checkpointing_steps=0, report_to="none", save_precision="fp32",
    )


def _with_prior(config, tmp_path, num=4):
    return dataclasses.replace(config, with_prior_preservation=True, class_data_dir=str(tmp_path / "class"),
                               class_prompt="a shape", num_class_images=num, class_generation_steps=2, sample_batch_size=3)


def _trainer(config):
    trainer = Trainer(config, DreamBoothMethod(config))
    trainer.setup()
    return trainer


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_preservation_loss_equals_the_diffusers_formula(snr_gamma):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    timesteps = torch.tensor([3, 100, 500, 900])
    prior_weight = 0.7
    weights = torch.tensor([1.0, 1.0, prior_weight, prior_weight])  # 2 instance images, then 2 class images
    snr = torch.ones(4)
    if snr_gamma is not None:  # min-SNR and prior preservation together: per-sample weights, no split (diffusers #5791)
        ac = torch.linspace(0.999, 0.001, 1000)
        snr = min_snr_weights(timesteps, ac, snr_gamma, "epsilon")
        weights = weights * snr
    ours = diffusion_loss(pred, target, weights, num_primary=2)
    # diffusers train_dreambooth.py: chunk the batch, MSE of each half, add the prior loss
    pred_i, pred_c = pred.chunk(2)
    target_i, target_c = target.chunk(2)
    snr_i, snr_c = snr.chunk(2)
    instance = (F.mse_loss(pred_i, target_i, reduction="none").mean(dim=(1, 2, 3)) * snr_i).mean()
    prior = (F.mse_loss(pred_c, target_c, reduction="none").mean(dim=(1, 2, 3)) * snr_c).mean()
    torch.testing.assert_close(ours, instance + prior_weight * prior)


def test_every_batch_pairs_instance_and_class_images():
    buckets = [(64, 64)] * 3 + [(64, 64)] * 5  # 3 instance, 5 class
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0, companions=list(range(3, 8)))
    it = iter(sampler)
    batches = [next(it) for _ in range(6)]
    assert all([i < 3 for i, _ in b] == [True, True, False, False] for b in batches)
    seen_class = [i for b in batches for i, _ in b[2:]]
    assert set(seen_class) == set(range(3, 8))  # the class pool is cycled through
    parts = [BucketBatchSampler(buckets, batch_size=1, num_processes=2, process_index=p, seed=0, companions=list(range(3, 8)))
             for p in (0, 1)]
    its = [iter(p) for p in parts]
    for batch in batches:  # two processes hold the same global batch between them
        a, b = next(its[0]), next(its[1])
        assert sorted(a + b) == sorted(batch)


# ----------------------------------------------------------------------------- class images


class _OneProcess:
    process_index, num_processes, is_local_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def test_class_images_are_generated_up_to_the_count_and_resumed(tiny_model, tmp_path):
    components = load_components(str(tiny_model))
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "mine.png")  # the user's own class image counts
    kwargs = dict(class_data_dir=str(folder), class_prompt="a shape", resolution=64, num_inference_steps=2, sample_batch_size=2)
    assert ensure_class_images(components, _OneProcess(), num_class_images=3, **kwargs) == 2
    first = (folder / class_image_name("a shape", 1)).read_bytes()
    (folder / class_image_name("a shape", 1)).unlink()  # as if killed before this file was written
    assert ensure_class_images(components, _OneProcess(), num_class_images=5, **kwargs) == 3
    assert len(list(folder.glob("*.png"))) == 5 and not list(folder.glob(".*tmp*"))
    assert (folder / class_image_name("a shape", 1)).read_bytes() == first  # the same pixels as before the "kill"
    assert ensure_class_images(components, _OneProcess(), num_class_images=5, **kwargs) == 0  # a re-run makes none


def test_prior_preservation_needs_its_options(db_config):
    from sdtune.errors import ConfigError

    with pytest.raises(ConfigError, match="--with_prior_preservation needs --class_data_dir"):
        Trainer(dataclasses.replace(db_config, with_prior_preservation=True), DreamBoothMethod(db_config))


# ----------------------------------------------------------------------------- training and exports


def test_full_finetune_changes_the_unet_and_the_text_encoder_only_when_asked(db_config, tiny_model, tmp_path):
    base = load_components(str(tiny_model))
    trainer = _trainer(_with_prior(db_config, tmp_path))
    result = trainer.train()
    trainer.cleanup()
    unet = trainer.components.unet.state_dict()
    assert sum(not torch.equal(unet[k], v) for k, v in base.unet.state_dict().items()) > len(unet) // 2
    for name in ("text_encoder", "vae"):
        for k, v in getattr(base, name).state_dict().items():
            assert torch.equal(getattr(trainer.components, name).state_dict()[k], v)
    assert len(result.loss_history) == 3 and len(list((tmp_path / "class").glob("*.png"))) == 4

    config = dataclasses.replace(db_config, train_text_encoder=True, stop_text_encoder_training=2, max_train_steps=3,
                                 output_dir=str(tmp_path / "te"))
    trainer = _trainer(config)
    snapshots = []
    original_step = trainer.method.after_step

    def record(components):
        original_step(components)
        snapshots.append({k: v.clone() for k, v in components.text_encoder.state_dict().items()})

    trainer.method.after_step = record
    trainer.train()
    trainer.cleanup()
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert changed(snapshots[0], {k: v.float() for k, v in base.text_encoder.state_dict().items()})
    assert changed(snapshots[1], snapshots[0])  # step 2 still trains the text encoder
    assert not changed(snapshots[2], snapshots[1])  # frozen after --stop_text_encoder_training 2


def test_pipeline_and_single_file_exports_round_trip(db_config, tmp_path):
    config = dataclasses.replace(db_config, train_text_encoder=True, save_single_file=True)
    trainer = _trainer(config)
    result = trainer.train()
    trainer.cleanup()
    out = Path(config.output_dir)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    for name in ("unet", "text_encoder"):
        trained = getattr(trainer.components, name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.equal(v, trained[k]), f"{name}.{k}"
    single = StableDiffusionPipeline.from_single_file(str(result.outputs["single_file"]), config=str(out), safety_checker=None)
    for k, v in single.unet.state_dict().items():
        assert torch.equal(v, pipe.unet.state_dict()[k])
    assert (out / "sdtune_config.yaml").is_file() and not list(out.rglob("*.bin"))
    # transformers 4's CLIPTokenizer (diffusers 0.32's loader there) needs vocab.json + merges.txt
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    # transformers 4 loads text-encoder keys without `text_model.` as a random encoder (transformers 5 writes them so)
    assert all(k.startswith("text_model.") for k in load_file(str(out / "text_encoder" / "model.safetensors")))


def test_output_folder_loads_with_a_plain_from_pretrained_and_generates(db_config):
    # a bf16 run with the default --save_precision fp16: the pipeline folder is fp32 all the same; the single file is fp16
    config = dataclasses.replace(db_config, save_precision="fp16", save_single_file=True, max_train_steps=1, mixed_precision="bf16")
    trainer = _trainer(config)
    result = trainer.train()
    try:
        assert trainer.components.text_encoder.dtype == torch.bfloat16  # export cast copies, not the training weights
    finally:
        trainer.cleanup()
    pipe = DiffusionPipeline.from_pretrained(config.output_dir)  # no dtype argument
    assert {m.dtype for m in (pipe.unet, pipe.text_encoder, pipe.vae)} == {torch.float32}
    image = pipe("a sks shape", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    from safetensors import safe_open

    with safe_open(str(result.outputs["single_file"]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "model.diffusion_model" in k} == {"F16"}


def test_ema_weights_differ_from_the_raw_weights_and_are_exported(db_config):
    config = dataclasses.replace(db_config, use_ema=True, ema_decay=0.5)
    trainer = _trainer(config)
    raw_after_training = {}
    original_export = trainer.method.export

    def capture(components, output_dir):
        raw_after_training.update({k: v.clone() for k, v in components.unet.state_dict().items()})
        return original_export(components, output_dir)

    trainer.method.export = capture
    trainer.train()
    trainer.cleanup()
    exported = StableDiffusionPipeline.from_pretrained(config.output_dir, safety_checker=None).unet.state_dict()
    ema = dict(zip([n for n, _ in trainer.components.unet.named_parameters()], trainer.method.ema.shadow_params))
    assert any(not torch.equal(exported[n], raw_after_training[n]) for n in ema)
    for name, shadow in ema.items():
        torch.testing.assert_close(exported[name], shadow.float())


def test_dreambooth_lora_uses_the_lora_exports(db_config, tmp_path):
    result = train_dreambooth(dataclasses.replace(_with_prior(db_config, tmp_path), use_lora=True, max_train_steps=2))
    assert result.outputs["diffusers"].name == "pytorch_lora_weights.safetensors" and result.outputs["kohya"].is_file()
    assert not (Path(result.output_dir) / "model_index.json").exists()


def test_resume_with_prior_preservation_is_exact(db_config, tmp_path):
    config = dataclasses.replace(_with_prior(db_config, tmp_path), max_train_steps=4, checkpointing_steps=2, use_ema=True)
    full = train_dreambooth(dataclasses.replace(config, output_dir=str(tmp_path / "full")))
    train_dreambooth(dataclasses.replace(config, output_dir=str(tmp_path / "part"), max_train_steps=2))
    resumed = train_dreambooth(dataclasses.replace(config, output_dir=str(tmp_path / "part"), resume_from_checkpoint="latest"))
    assert resumed.loss_history == full.loss_history


# ----------------------------------------------------------------------------- launch


def _launch_args(tiny_model, shapes_dir, tmp_path, out, *extra):
    return ["sdtune", "train-dreambooth", "--config", "recipes/sd15/dreambooth.yaml",
            "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(shapes_dir),
            "--instance_prompt", "a sks shape", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"),
            "--class_prompt", "a shape", "--num_class_images", "4", "--output_dir", str(out),
            "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "2", "--mixed_precision", "no",
            "--class_generation_steps", "2", "--report_to", "none", *extra]


def test_the_documented_accelerate_launch_command_runs(tiny_model, shapes_dir, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *_launch_args(tiny_model, shapes_dir, tmp_path, tmp_path / "out")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None).unet is not None


@pytest.mark.slow
def test_two_cpu_processes_equal_one_with_prior_preservation(tiny_model, shapes_dir, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *_launch_args(tiny_model, shapes_dir, tmp_path, two, "--train_batch_size", "1")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "class").glob("*.png"))) == 4  # generated once, split across the processes
    cmd = [sys.executable, *_launch_args(tiny_model, shapes_dir, tmp_path, one, "--train_batch_size", "2")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads((d / "checkpoint-2" / "trainer_state.json").read_text())["loss_history"] for d in (two, one)]
    # gradients summed per process then averaged differ from one summed batch in the last bits
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-6)


def test_class_images_of_another_prompt_are_not_used(tmp_path):
    from sdtune.data.class_images import class_records

    folder = tmp_path / "class"
    folder.mkdir()
    for prompt in ("a photo of dog", "a photo of cat"):
        for i in range(3):
            Image.new("RGB", (8, 8)).save(folder / class_image_name(prompt, i))
    Image.new("RGB", (8, 8)).save(folder / "users-own.png")
    records = class_records(str(folder), "a photo of cat", 3, 1.0)
    names = [r.path.name for r in records]
    assert names[0] == "users-own.png" and all(n.startswith(class_image_name("a photo of cat", 0)[:15]) for n in names[1:])
    assert len(names) == 3 and all(r.caption == "a photo of cat" for r in records)
