"""The diffusion-training math, as pure functions shared by every method.

Shapes: latents, noise and model predictions are [B, C, H, W]; timesteps are [B] (long).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(
    shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise, optionally with a per-channel offset (lets the model learn very dark/bright images).

    The offset follows crosslabs' "diffusion with offset noise": ``noise + offset * N(0, 1)[B, C, 1, 1]``.
    """
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps in [0, num_train_timesteps), as in DDPM training."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


def training_target(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity v = a*noise - s*x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, latents)
        return alpha * noise - sigma * latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, latents)
    return alpha * latents + sigma * noise


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) for each timestep. [B]"""
    alphas = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1.0 - alphas)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, snr_gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023). [B]

    epsilon: min(snr, γ) / snr.  v-prediction: min(snr, γ) / (snr + 1), because the v loss
    already carries a factor (snr + 1) relative to the x0 loss.
    """
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.minimum(s, torch.full_like(s, snr_gamma))
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    num_primary: int | None = None,
) -> torch.Tensor:
    """Weighted MSE: the sum of each sample's weighted loss over the number of primary samples.

    ``sample_weights`` [B] multiplies each sample's loss: min-SNR weights times the sample's own
    loss weight (the prior-preservation weight of a class image), so a batch is never split.
    ``num_primary`` defaults to B (a plain mean). A DreamBooth batch holds n instance images and
    n class images; with ``num_primary=n`` the result is the diffusers formula
    ``mean(instance) + prior_loss_weight * mean(class)``.
    """
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, model_pred.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device)
    return per_sample.sum() / (num_primary if num_primary is not None else per_sample.shape[0])


def _alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    a = alphas_cumprod.to(device=like.device)[timesteps.to(like.device)].to(like.dtype)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)
