"""Shared fixtures: tiny offline models (built with save_pretrained, loaded with from_pretrained) and toy data."""

import os

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
