"""The toy world's base model: an SD-shaped pipeline (KL VAE, UNet with cross-attention, CLIP text
encoder with the real CLIP BPE tokenizer) pretrained from random initialisation on the world.

Three steps, reproduced by ``tools/pretrain_toy_base.py``:

1. :func:`train_vae` trains the autoencoder alone (32 px images to an 8x8x4 latent).
2. :func:`build_random_base` writes a diffusers folder with that VAE and a randomly initialised
   UNet and text encoder, with a zero-terminal-SNR v-prediction schedule.
3. :func:`pretrain` trains the UNet and text encoder through sdtune's own full fine-tune path
   (``train_dreambooth`` with ``train_text_encoder``) on rendered world images.

The shipped result lives in ``sdtune/toy/assets/base`` (:data:`BASE_DIR`).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.export import add_text_model_level_to_saved_text_encoder
from sdtune.toy.tiny_model import tiny_tokenizer
from sdtune.toy.world import IMAGE_SIZE, Scene, all_scenes, draw, pretraining_scenes, render_folder, to_pixels

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"
BASE_DIR = ASSETS_DIR / "base"
LATENT_SIZE = IMAGE_SIZE // 4  # two VAE downsamplings: 32 px -> 8x8x4 latents
TEXT_HIDDEN = 64


def scene_batch(scenes: list[Scene], batch_size: int, rng: random.Random) -> torch.Tensor:
    """Fresh renders of random scenes as a [B, 3, 32, 32] tensor in [-1, 1]."""
    return to_pixels([draw(rng.choice(scenes), rng) for _ in range(batch_size)])


def new_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
    )


def train_vae(steps: int = 2000, batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-6,
              seed: int = 0) -> AutoencoderKL:
    """Train the autoencoder on fresh renders of every scene of the world.

    The autoencoder is the world's image codec, as SD's VAE is a general one trained on all kinds of
    images: the held-out concepts are held out of what the text-to-image model (UNet and text
    encoder) learns, not of what pixels can be encoded. An autoencoder that never saw a star
    turns small stars into blobs, which no fine-tune of the UNet could fix. The loss is L1 + MSE on pixels plus a small KL term (SD's VAE is a near-deterministic codec too).
    The latent scaling factor is set so that latents have unit standard deviation, as SD's 0.18215 does.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    scenes = all_scenes()
    vae = new_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(steps):
        pixels = scene_batch(scenes, batch_size, rng)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - start)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(scene_batch(scenes, 256, rng)).latent_dist.mean for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def build_random_base(output_dir: str | Path, vae: AutoencoderKL, seed: int = 0) -> Path:
    """Save a diffusers folder: the trained ``vae``, a random UNet and text encoder, the CLIP tokenizer.

    The schedule is SD's scaled-linear betas rescaled to zero terminal SNR, with v-prediction and
    trailing timesteps (Lin et al. 2023): with SD's own schedule the last step still carries the
    image mean, here the background colour, so samples from pure noise would get it wrong.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    add_text_model_level_to_saved_text_encoder(Path(output_dir) / "text_encoder")  # loadable by transformers 4 too
    return Path(output_dir)


def render_pretraining_data(output_dir: str | Path, num_images: int, seed: int = 0) -> Path:
    """The pretraining set: every pretraining scene in turn, with varied captions."""
    return render_folder(output_dir, pretraining_scenes(), num_images, seed=seed, vary_captions=True)


def pretrain(base_dir: str | Path, data_dir: str | Path, output_dir: str | Path, *, max_train_steps: int = 4000,
             train_batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0, **overrides):
    """Train the random base's UNet and text encoder on the world through sdtune's full fine-tune path.

    Captions are dropped 10% of the time so that classifier-free guidance works, as in SD's own training.
    """
    from sdtune.api import train_dreambooth
    from sdtune.config import DreamBoothConfig

    config = DreamBoothConfig(**{
        **dict(
            pretrained_model_name_or_path=str(base_dir), instance_data_dir=str(data_dir), output_dir=str(output_dir),
            resolution=IMAGE_SIZE, train_batch_size=train_batch_size, max_train_steps=max_train_steps,
            learning_rate=learning_rate, lr_scheduler="cosine", lr_warmup_steps=200, train_text_encoder=True,
            caption_dropout_rate=0.1, use_ema=True, ema_decay=0.999, mixed_precision="no", save_precision="fp32",
            checkpointing_steps=500, checkpoints_total_limit=2, vae_batch_size=256, report_to="none", seed=seed,
        ),
        **overrides,
    })
    return train_dreambooth(config)
