"""sdtune: fine-tune Stable Diffusion with LoRA, DreamBooth and textual inversion.

    from sdtune import LoRAConfig, train_lora
    result = train_lora(LoRAConfig(pretrained_model_name_or_path="...", instance_data_dir="dog/",
                                   instance_prompt="a photo of sks dog", output_dir="out"))
"""

from sdtune.config import LoRAConfig, TrainConfig
from sdtune.errors import SdtuneError
from sdtune.loop import TrainResult, train
from sdtune.methods.lora import LoRAMethod
from sdtune.models import Components, load_components

__version__ = "0.1.0"


def train_lora(config: LoRAConfig) -> TrainResult:
    """Train a LoRA as configured; works in a notebook (one process) and under ``accelerate launch``.

    Returns:
        TrainResult with the exported files (``diffusers``: pytorch_lora_weights.safetensors,
        ``kohya``: kohya_lora.safetensors), the step count and the per-step loss history.
    """
    return train(config, LoRAMethod(config))


__all__ = [
    "Components",
    "LoRAConfig",
    "LoRAMethod",
    "SdtuneError",
    "TrainConfig",
    "TrainResult",
    "load_components",
    "train",
    "train_lora",
]
