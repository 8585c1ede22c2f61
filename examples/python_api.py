"""Train a LoRA from Python on the offline toy data, then load it in diffusers.

    python examples/python_api.py                                         # one process
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/python_api.py
"""

import os
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from sdtune import LoRAConfig, train_lora
from sdtune.toy import build_tiny_model, render_shape_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
work = Path(os.environ.get("SDTUNE_EXAMPLE_DIR", Path(tempfile.gettempdir()) / "sdtune-example"))
base = work / "base-model"
if not (base / "model_index.json").exists():
    build_tiny_model(base)  # stands in for e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5"
data = render_shape_dataset(work / "data", num_images=8, caption="a sks shape")

result = train_lora(LoRAConfig(
    pretrained_model_name_or_path=str(base), instance_data_dir=str(data), output_dir=str(work / "lora"),
    resolution=64, rank=8, learning_rate=1e-3, max_train_steps=50, report_to="none",
))
print(f"trained {result.global_step} steps, loss {result.loss_history[0]:.3f} -> {result.final_loss:.3f}")

if int(os.environ.get("RANK", "0")) == 0:
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(result.output_dir)
    image = pipe("a sks shape", height=64, width=64, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(work / "sample.png")
    print(f"wrote {work / 'sample.png'}")
