"""sdtune's first training steps equal diffusers' example scripts' steps, on the toy base model.

The reference steps below are re-implemented from reading diffusers' scripts (examples/dreambooth/
train_dreambooth.py and train_dreambooth_lora.py, examples/textual_inversion/textual_inversion.py,
diffusers 0.42): their own model classes loaded with ``from_pretrained``, their tokenization, their
image preprocessing, their loss, clipping and optimizer. Two things are shared on purpose, so that
everything else can be compared to float tolerance:
  - the random draws (the VAE posterior sample, the noise, the timesteps) come from one generator
    seeded as sdtune seeds each step, drawn in sdtune's order;
  - the images of each batch are the ones sdtune's sampler chose for that step (the scripts'
    DataLoader shuffles with the global RNG), and LoRA adapters start from sdtune's initial values
    (both use peft's "gaussian" init, also drawn from the global RNG).
The toy base is what the learning benchmark (benchmarks/learning_parity.py) and the demo train:
v-prediction with a zero-terminal-SNR schedule.
"""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoTokenizer, CLIPTextModel

from sdtune.config import DreamBoothConfig, TextualInversionConfig
from sdtune.loop import Trainer, _step_seed
from sdtune.methods import unwrap_model
from sdtune.methods.dreambooth import DreamBoothMethod
from sdtune.methods.lora import LoRAMethod
from sdtune.methods.textual_inversion import TextualInversionMethod
from sdtune.toy.base_model import BASE_DIR
from sdtune.toy.world import Scene, render_folder

STEPS = 3
SEED = 7
INSTANCE_PROMPT, CLASS_PROMPT = "a xon triangle", "a triangle"


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-data")
    stars = [Scene("star", "yellow", b) for b in ("gray", "white")]
    return {
        "instance": render_folder(root / "instance", stars, 4, seed=0, caption=INSTANCE_PROMPT),
        "class": render_folder(root / "class", [Scene("triangle", c, "gray") for c in ("red", "blue")], 6, seed=1),
        "squares": render_folder(root / "squares", [Scene("square", "green", "black")], 4, seed=2),
    }


def _setup(method, config) -> tuple[Trainer, list[tuple[list[Path], list[str]]]]:
    """sdtune's trainer after setup, and the (image paths, captions) of its first STEPS batches."""
    trainer = Trainer(config, method)
    trainer.setup()
    dataset, order = trainer.dataloader.dataset, iter(trainer.sampler)
    batches = []
    for _ in range(STEPS):
        items = next(order)
        batches.append(([dataset.samples[i].record.path for i, _ in items], [dataset[item]["caption"] for item in items]))
    return trainer, batches


class DiffusersReference:
    """The scripts' models and their per-step math."""

    def __init__(self, base: Path = BASE_DIR):
        # train_dreambooth.py: AutoTokenizer(use_fast=False), the model classes, DDPMScheduler from the scheduler folder
        self.tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", use_fast=False)
        self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")

    @staticmethod
    def pixels(path: Path, size: int) -> torch.Tensor:
        """transforms.Resize(size) + RandomCrop(size) + ToTensor() + Normalize([0.5], [0.5]) on a size x size image:
        only the scaling to [-1, 1] acts (the toy images already have the training size). [3, H, W]"""
        image = Image.open(path).convert("RGB")
        assert image.size == (size, size)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).sub(0.5).div(0.5)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        # tokenize_prompt(): padding="max_length", max_length=tokenizer.model_max_length, truncation
        return torch.cat([self.tokenizer(c, padding="max_length", max_length=self.tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids for c in captions])

    def loss(self, paths: list[Path], captions: list[str], generator: torch.Generator, *, size: int,
             prior_loss_weight: float | None = None) -> torch.Tensor:
        """The training step's loss (the loop body of train_dreambooth.py / textual_inversion.py)."""
        pixel_values = torch.stack([self.pixels(p, size) for p in paths])  # collate_fn: instance images, then class images
        model_input = self.vae.encode(pixel_values).latent_dist.sample(generator) * self.vae.config.scaling_factor
        noise = torch.randn(model_input.shape, generator=generator)  # the scripts: torch.randn_like(model_input)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(paths),), generator=generator)
        noisy_model_input = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = self.text_encoder(self.token_ids(captions))[0]  # encode_prompt(), no attention mask
        model_pred = self.unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(model_input, noise, timesteps)
        if prior_loss_weight is None:
            return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        # with_prior_preservation: chunk the batch, MSE of each half, add the weighted prior loss
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean") + prior_loss_weight * prior_loss


def _run_reference(reference, batches, optimizer, params_to_clip, *, config, prior_loss_weight=None, after_step=None):
    losses = []
    for step, (paths, captions) in enumerate(batches):
        generator = torch.Generator().manual_seed(_step_seed(config.seed, step))
        loss = reference.loss(paths, captions, generator, size=config.resolution, prior_loss_weight=prior_loss_weight)
        loss.backward()
        if params_to_clip is not None:
            torch.nn.utils.clip_grad_norm_(params_to_clip(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses


def _adamw(params, config):
    # the scripts' optimizer: torch.optim.AdamW with --adam_beta1/2, --adam_weight_decay 1e-2, --adam_epsilon
    return torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def _db_config(toy_data, tmp_path, **overrides):
    fields = dict(
        pretrained_model_name_or_path=str(BASE_DIR), instance_data_dir=str(toy_data["instance"]),
        output_dir=str(tmp_path / "out"), resolution=32, train_batch_size=2, max_train_steps=STEPS, seed=SEED,
        learning_rate=2e-4, lr_scheduler="constant", train_text_encoder=True, with_prior_preservation=True,
        class_data_dir=str(toy_data["class"]), class_prompt=CLASS_PROMPT, num_class_images=6, prior_loss_weight=0.7,
        checkpointing_steps=0, report_to="none", mixed_precision="no", save_precision="fp32",
    )
    return DreamBoothConfig(**(fields | overrides))


def _assert_same_update(ours: dict, theirs: dict, initial: dict):
    """Both runs moved the weights, and by the same amount: the difference of the two updates is under
    1e-3 of their size. (Elementwise equality is not the measure: Adam divides each gradient by its own
    running size, so a gradient near zero turns a few ulps of float noise into a visible step.)"""
    assert set(ours) == set(theirs)
    ours_update = torch.cat([(ours[k].detach().float() - initial[k].float()).flatten() for k in sorted(ours)])
    theirs_update = torch.cat([(theirs[k].detach().float() - initial[k].float()).flatten() for k in sorted(ours)])
    assert theirs_update.norm() > 0
    assert (ours_update - theirs_update).norm() / theirs_update.norm() < 1e-3


def _pretrained(cls, subfolder: str) -> dict:
    return {k: v.clone() for k, v in cls.from_pretrained(BASE_DIR, subfolder=subfolder).state_dict().items()}


def test_dreambooth_steps_with_text_encoder_and_prior_equal_train_dreambooth_py(toy_data, tmp_path):
    config = _db_config(toy_data, tmp_path)
    trainer, batches = _setup(DreamBoothMethod(config), config)
    assert all(len(paths) == 4 and captions == [INSTANCE_PROMPT] * 2 + [CLASS_PROMPT] * 2 for paths, captions in batches)
    result = trainer.train()

    reference = DiffusersReference()
    reference.unet.train(), reference.text_encoder.train()
    params = lambda: itertools.chain(reference.unet.parameters(), reference.text_encoder.parameters())  # noqa: E731
    losses = _run_reference(reference, batches, _adamw(params(), config), params, config=config,
                            prior_loss_weight=config.prior_loss_weight)

    torch.testing.assert_close(result.loss_history, losses, rtol=1e-5, atol=0)
    _assert_same_update(unwrap_model(trainer.components.unet).state_dict(), reference.unet.state_dict(),
                        _pretrained(UNet2DConditionModel, "unet"))
    _assert_same_update(unwrap_model(trainer.components.text_encoder).state_dict(), reference.text_encoder.state_dict(),
                        _pretrained(CLIPTextModel, "text_encoder"))


def test_dreambooth_steps_without_prior_equal_train_dreambooth_py(toy_data, tmp_path):
    config = _db_config(toy_data, tmp_path, with_prior_preservation=False, class_data_dir=None, class_prompt=None)
    trainer, batches = _setup(DreamBoothMethod(config), config)
    result = trainer.train()

    reference = DiffusersReference()
    reference.unet.train(), reference.text_encoder.train()
    params = lambda: itertools.chain(reference.unet.parameters(), reference.text_encoder.parameters())  # noqa: E731
    losses = _run_reference(reference, batches, _adamw(params(), config), params, config=config)

    torch.testing.assert_close(result.loss_history, losses, rtol=1e-5, atol=0)
    _assert_same_update(unwrap_model(trainer.components.unet).state_dict(), reference.unet.state_dict(),
                        _pretrained(UNet2DConditionModel, "unet"))


def test_dreambooth_lora_steps_equal_train_dreambooth_lora_py(toy_data, tmp_path):
    config = _db_config(toy_data, tmp_path, use_lora=True, rank=4, learning_rate=1e-3)
    method = LoRAMethod(config)
    trainer, batches = _setup(method, config)
    unet, text_encoder = unwrap_model(trainer.components.unet), unwrap_model(trainer.components.text_encoder)
    initial = {"unet": get_peft_model_state_dict(unet), "text_encoder": get_peft_model_state_dict(text_encoder)}
    initial = {part: {k: v.clone() for k, v in state.items()} for part, state in initial.items()}
    result = trainer.train()

    reference = DiffusersReference()
    # train_dreambooth_lora.py: these adapters, alpha = rank, gaussian init
    reference.unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                          target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    reference.text_encoder.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for part in ("unet", "text_encoder"):
        model = getattr(reference, part)
        assert set(get_peft_model_state_dict(model)) == set(initial[part])  # the same modules carry a LoRA
        set_peft_model_state_dict(model, initial[part])
    reference.unet.train(), reference.text_encoder.train()
    trained = [p for p in itertools.chain(reference.unet.parameters(), reference.text_encoder.parameters()) if p.requires_grad]
    losses = _run_reference(reference, batches, _adamw(trained, config), lambda: trained, config=config,
                            prior_loss_weight=config.prior_loss_weight)

    torch.testing.assert_close(result.loss_history, losses, rtol=1e-5, atol=0)
    for part, model in (("unet", unet), ("text_encoder", text_encoder)):
        _assert_same_update(get_peft_model_state_dict(model), get_peft_model_state_dict(getattr(reference, part)),
                            initial[part])


def test_textual_inversion_steps_equal_textual_inversion_py(toy_data, tmp_path):
    config = TextualInversionConfig(
        pretrained_model_name_or_path=str(BASE_DIR), train_data_dir=str(toy_data["squares"]), output_dir=str(tmp_path / "ti"),
        placeholder_token="<gsq>", initializer_token="square", num_vectors=2, resolution=32, train_batch_size=2,
        max_train_steps=STEPS, seed=SEED, learning_rate=1e-2, lr_scheduler="constant", max_grad_norm=0,
        checkpointing_steps=0, report_to="none", mixed_precision="no",
    )
    trainer, batches = _setup(TextualInversionMethod(config), config)
    assert all("<gsq> <gsq>_1" in caption for _, captions in batches for caption in captions)  # the scripts' placeholder string
    result = trainer.train()

    reference = DiffusersReference()
    tokens = ["<gsq>", "<gsq>_1"]  # textual_inversion.py: the token, then "<token>_i" for every extra vector
    reference.tokenizer.add_tokens(tokens)
    token_ids = reference.tokenizer.convert_tokens_to_ids(tokens)
    initializer_id = reference.tokenizer.encode("square", add_special_tokens=False)[0]
    reference.text_encoder.resize_token_embeddings(len(reference.tokenizer))
    embeddings = reference.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[token_ids] = embeddings[initializer_id].clone()
    reference.unet.requires_grad_(False)
    text_model = getattr(reference.text_encoder, "text_model", reference.text_encoder)  # transformers 5 dropped the level
    for frozen in (text_model.encoder, text_model.final_layer_norm, text_model.embeddings.position_embedding):
        frozen.requires_grad_(False)
    reference.text_encoder.train()
    original = embeddings.detach().clone()
    keep = torch.ones(len(reference.tokenizer), dtype=torch.bool)
    keep[min(token_ids): max(token_ids) + 1] = False

    def restore_other_rows():  # after every step: every row but the new tokens' back to its original value
        with torch.no_grad():
            embeddings[keep] = original[keep]

    optimizer = _adamw(reference.text_encoder.get_input_embeddings().parameters(), config)
    losses = _run_reference(reference, batches, optimizer, None, config=config, after_step=restore_other_rows)  # no clipping

    torch.testing.assert_close(result.loss_history, losses, rtol=1e-5, atol=0)
    ours = unwrap_model(trainer.components.text_encoder).get_input_embeddings().weight
    _assert_same_update({"new rows": ours[token_ids]}, {"new rows": embeddings[token_ids]}, {"new rows": original[token_ids]})
    torch.testing.assert_close(ours[keep].detach(), original[keep])  # and no other row moved
