"""The training math against hand-computed values and against the diffusers example scripts' formulas."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdtune import diffusion


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 10, 500, 999])
    model_pred = torch.randn(4, 4, 8, 8, generator=g)
    return latents, noise, timesteps, model_pred


def test_min_snr_weights_match_hand_computed_values():
    alphas_cumprod = torch.tensor([0.5, 0.8, 0.2])  # snr = 1, 4, 0.25
    t = torch.tensor([0, 1, 2])
    eps = diffusion.min_snr_weights(t, alphas_cumprod, snr_gamma=2.0, prediction_type="epsilon")
    v = diffusion.min_snr_weights(t, alphas_cumprod, snr_gamma=2.0, prediction_type="v_prediction")
    torch.testing.assert_close(eps, torch.tensor([1.0, 0.5, 1.0]))  # min(snr, 2) / snr
    torch.testing.assert_close(v, torch.tensor([0.5, 0.4, 0.2]))  # min(snr, 2) / (snr + 1), not /snr + 1


def test_add_noise_and_velocity_equal_the_scheduler(scheduler, batch):
    latents, noise, timesteps, _ = batch
    ac = scheduler.alphas_cumprod
    torch.testing.assert_close(diffusion.add_noise(latents, noise, timesteps, ac), scheduler.add_noise(latents, noise, timesteps))
    torch.testing.assert_close(
        diffusion.training_target(latents, noise, timesteps, ac, "v_prediction"), scheduler.get_velocity(latents, noise, timesteps)
    )
    assert diffusion.training_target(latents, noise, timesteps, ac, "epsilon") is noise


def _diffusers_example_loss(scheduler, model_pred, target, timesteps, snr_gamma, prediction_type):
    """The loss of diffusers' train_text_to_image_lora.py, written out as the script has it."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    else:
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_equals_diffusers_example_formula(scheduler, batch, prediction_type, snr_gamma):
    latents, noise, timesteps, model_pred = batch
    ac = scheduler.alphas_cumprod
    target = diffusion.training_target(latents, noise, timesteps, ac, prediction_type)
    weights = None if snr_gamma is None else diffusion.min_snr_weights(timesteps, ac, snr_gamma, prediction_type)
    ours = diffusion.diffusion_loss(model_pred, target, weights)
    reference = _diffusers_example_loss(scheduler, model_pred, target, timesteps, snr_gamma, prediction_type)
    torch.testing.assert_close(ours, reference)


def test_sample_weights_scale_each_samples_loss(batch):
    _, noise, _, model_pred = batch
    per_sample = ((model_pred - noise) ** 2).mean(dim=(1, 2, 3))
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    torch.testing.assert_close(diffusion.diffusion_loss(model_pred, noise, weights), (per_sample * weights).mean())


def test_noise_offset_is_a_strength_added_per_channel():
    plain = diffusion.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(0))
    offset = diffusion.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(0), noise_offset=0.05)
    shift = offset - plain
    assert shift.abs().max() > 0
    # constant over H, W for each (sample, channel), and scaled by the strength
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))
    expected = 0.05 * torch.randn((2, 4, 1, 1), generator=_after_plain_draw())
    torch.testing.assert_close(shift[..., :1, :1], expected)


def _after_plain_draw():
    g = torch.Generator().manual_seed(0)
    torch.randn((2, 4, 8, 8), generator=g)
    return g


def test_timesteps_cover_the_schedule():
    t = diffusion.sample_timesteps(10_000, 1000, torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999 and t.dtype == torch.long
