"""Class images for prior preservation: use the user's, generate the missing ones with the base model.

Generation is split across processes, writes one file at a time atomically, and is resumable:
generated image ``i`` is always ``class-<prompt hash>-<i>.png`` with seed (seed, prompt, i), so a
killed run regenerates only what is missing, with the same pixels an uninterrupted run makes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdtune.data.images import IMAGE_EXTENSIONS
from sdtune.data.sources import ImageRecord
from sdtune.models import Components
from sdtune.sampling import generate

logger = logging.getLogger(__name__)


def generated_prefix(class_prompt: str) -> str:
    """File-name prefix of the images generated for ``class_prompt``."""
    return f"class-{hashlib.sha256(class_prompt.encode()).hexdigest()[:8]}-"


def class_image_name(class_prompt: str, index: int) -> str:
    return f"{generated_prefix(class_prompt)}{index:05d}.png"


def ensure_class_images(
    components: Components,
    accelerator,
    *,
    class_data_dir: str,
    class_prompt: str,
    num_class_images: int,
    resolution: int,
    sample_batch_size: int = 4,
    num_inference_steps: int = 25,
    seed: int = 0,
) -> int:
    """Generate class images until ``class_data_dir`` holds ``num_class_images``; return how many this process made."""
    folder = Path(class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = max(0, num_class_images - len(_user_images(folder)))
    # Shard all indices, then skip existing files: other processes may be writing already.
    share = range(wanted)[accelerator.process_index :: accelerator.num_processes]
    mine = [i for i in share if not (folder / class_image_name(class_prompt, i)).exists()]
    if mine:
        logger.info("generating %d class images of '%s' in %s", len(mine), class_prompt, folder)
    progress = tqdm(total=len(mine), desc="Class images", disable=not accelerator.is_local_main_process or not mine)
    pipe = components.pipeline() if mine else None
    for begin in range(0, len(mine), sample_batch_size):
        chunk = mine[begin : begin + sample_batch_size]
        generators = [torch.Generator().manual_seed(_image_seed(seed, class_prompt, i)) for i in chunk]
        images = generate(pipe, [class_prompt] * len(chunk), generators, size=(resolution, resolution),
                          num_inference_steps=num_inference_steps, autocast=accelerator.autocast)
        for index, image in zip(chunk, images):
            path = folder / class_image_name(class_prompt, index)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)  # a killed run never leaves a half-written image
        progress.update(len(chunk))
    progress.close()
    accelerator.wait_for_everyone()
    return len(mine)


def class_records(class_data_dir: str, class_prompt: str, num_class_images: int, loss_weight: float) -> list[ImageRecord]:
    """The class images to train on (at most ``num_class_images``), captioned with the class prompt.

    The user's own images and those generated for *this* prompt; images generated for another
    --class_prompt in the same folder are left out, so they never get this prompt as caption.
    """
    folder = Path(class_data_dir)
    generated = sorted(p for p in _images(folder) if p.name.startswith(generated_prefix(class_prompt)))
    paths = (sorted(_user_images(folder)) + generated)[:num_class_images]
    return [ImageRecord(name=str(p), caption=class_prompt, loss_weight=loss_weight, path=p) for p in paths]


def _user_images(folder: Path) -> list[Path]:
    """Class images the user supplied (anything not named like a generated one)."""
    return [p for p in _images(folder) if not p.name.startswith("class-")]


def _images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def _image_seed(seed: int, prompt: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt}:{index}".encode()).digest()[:8], "little") % (2**63)
