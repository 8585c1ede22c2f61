"""Build a tiny, randomly initialised Stable Diffusion model and save it as a diffusers folder.

It has the architecture of SD 1.x/2.x (UNet with cross-attention, KL VAE, CLIP text encoder
and CLIP BPE tokenizer) at a few hundred thousand parameters, so every real code path
(`save_pretrained`/`from_pretrained`, LoRA injection, exports) runs on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"


def tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE tokenizer restricted to the first 8,000 merges (8,514 tokens); see tools/make_clip_tokenizer.py."""
    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77
    )


def build_tiny_model(
    output_dir: str | Path,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    sample_size: int = 8,
    hidden_size: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (8, 16, 16, 16),
    text_layers: int = 2,
) -> Path:
    """Save a tiny SD pipeline folder to ``output_dir`` and return its path.

    Args:
        output_dir: Folder to write (``model_index.json``, ``unet/``, ``vae/``, ...).
        prediction_type: ``epsilon`` (SD 1.x style) or ``v_prediction`` (SD 2.x 768 style).
        seed: Seed of the random initialisation.
        sample_size: Latent side the UNet is configured for (images are 8x larger).
        hidden_size: Text-encoder width, also the UNet's cross-attention width.
        unet_channels: UNet block widths, one per resolution level.
        vae_channels: VAE block widths (four blocks: 8x downsampling).
        text_layers: Text-encoder transformer layers.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        # SD's shape: cross-attention in every block but the deepest
        down_block_types=("CrossAttnDownBlock2D",) * (len(unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1),
        block_out_channels=unet_channels,
        layers_per_block=1,
        cross_attention_dim=hidden_size,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_attention_heads=4,
            num_hidden_layers=text_layers,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    output_dir = Path(output_dir)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def build_tiny_sdxl_model(output_dir: str | Path, *, seed: int = 0, sample_size: int = 8) -> Path:
    """Save a tiny SDXL pipeline folder (``StableDiffusionXLPipeline.from_pretrained`` loads it).

    The shape of diffusers' own SDXL test components, at SDXL's three levels: a UNet whose first
    level has no attention and whose deeper levels stack transformer blocks, ``text_time``
    added conditioning (pooled text embedding + six size/crop numbers), a CLIP ViT-L-like first
    text encoder (``quick_gelu``) and an OpenCLIP-bigG-like second one (``gelu``, with the
    projection that gives the pooled embedding), the second tokenizer padding with "!" as SDXL's
    does, SDXL's VAE scaling factor and Euler sampler.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # the second encoder wider than the first, as in SDXL (768 and 1280): diffusers' single-file loader
    # tells the two apart by their widths
    width_1, width_2, time_embed_dim = 32, 64, 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=width_1 + width_2,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + width_2,  # 6 time ids + the pooled embedding
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), latent_channels=4,
        norm_num_groups=8, sample_size=sample_size * 8, scaling_factor=0.13025, force_upcast=True,
    )
    tokenizer = tiny_tokenizer()
    tokenizer_2 = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                                model_max_length=77, pad_token="!")

    def text_config(width: int, hidden_act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2, num_attention_heads=4,
            num_hidden_layers=3, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )

    text_encoder = CLIPTextModel(text_config(width_1, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(width_2, "gelu"))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    output_dir = Path(output_dir)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir
