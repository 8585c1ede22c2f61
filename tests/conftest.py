"""Shared fixtures: tiny offline models (built with save_pretrained, loaded with from_pretrained) and toy data."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from sdtune.config import LoRAConfig  # noqa: E402
from sdtune.toy import build_tiny_model, build_tiny_sdxl_model, render_shape_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny epsilon-prediction SD model folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-eps"), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    """A tiny v-prediction SD model folder (SD 2.x style)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    """A tiny SDXL model folder (two text encoders, text_time added conditioning)."""
    return build_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """Eight 64 px images with .txt captions (kohya layout)."""
    return render_shape_dataset(tmp_path_factory.mktemp("shapes"), num_images=8)


@pytest.fixture
def lora_config(tiny_model, shapes_dir, tmp_path):
    """A fast LoRA config on the tiny model; override fields with dataclasses.replace."""
    return LoRAConfig(
        pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(shapes_dir), output_dir=str(tmp_path / "out"),
        resolution=64, rank=4, learning_rate=1e-3, max_train_steps=4, train_batch_size=2, checkpointing_steps=0,
        report_to="none", seed=0,
    )


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny CLIP (text 24 wide, vision 32, projection 16) with its processor: for eval's clip metrics."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "sdtune" / "toy" / "clip_tokenizer"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    """A tiny ViT standing in for DINO (CLS features 32 wide) with its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("tiny-dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
