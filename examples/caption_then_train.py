"""Caption an uncaptioned folder with BLIP-2, then train a LoRA on the captions, offline.

    python examples/caption_then_train.py

With a real model the same two steps are:
    sdtune caption data/dog/ --model Salesforce/blip2-opt-2.7b --prefix "a photo of sks dog,"
    sdtune train-lora --config recipes/sd15/lora.yaml --instance_data_dir data/dog/ --output_dir out/
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdtune import LoRAConfig, train_lora  # noqa: E402
from sdtune.captioning import caption_missing_images  # noqa: E402
from sdtune.toy import build_tiny_model, render_shape_dataset  # noqa: E402
from sdtune.toy.tiny_captioner import build_tiny_blip2  # noqa: E402

work = Path(os.environ.get("SDTUNE_EXAMPLE_DIR", Path(tempfile.gettempdir()) / "sdtune-caption-example"))
images = render_shape_dataset(work / "images", num_images=6)
for caption in images.glob("*.txt"):
    caption.unlink()  # start from images only
captioner = build_tiny_blip2(work / "tiny-blip2")  # stands in for e.g. "Salesforce/blip2-opt-2.7b"
summary = caption_missing_images(str(images), str(captioner), prefix="a sks shape,", max_new_tokens=6)
print(f"captioned {summary.captioned} images, e.g. {sorted(images.glob('*.txt'))[0].read_text()!r}")

base = build_tiny_model(work / "base-model")
result = train_lora(LoRAConfig(
    pretrained_model_name_or_path=str(base), instance_data_dir=str(images), output_dir=str(work / "lora"),
    resolution=64, rank=4, learning_rate=1e-3, max_train_steps=20, report_to="none",
))
print(f"trained {result.global_step} steps on the captions; LoRA at {result.outputs['diffusers']}")
