"""Captioning throughput: batched generation against one image at a time, same model, same invocation.

    python benchmarks/caption_speed.py                      # tiny offline BLIP-2 (OPT), 64 images
    python benchmarks/caption_speed.py --model Salesforce/blip2-opt-2.7b --images 256   # a real model (GPU)

Each run captions a fresh copy of the image folder with `caption_images` (the code behind
`sdtune caption`); the time includes loading the model, the same for every batch size.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sdtune.captioning import CaptionConfig, caption_images
from sdtune.toy import render_shape_dataset
from sdtune.toy.tiny_captioner import build_tiny_blip2


def run(model: str, images: Path, batch_size: int, max_new_tokens: int) -> float:
    """images/s of one `caption_images` pass (model loading included) over a fresh copy of ``images``."""
    folder = Path(tempfile.mkdtemp()) / "images"
    shutil.copytree(images, folder)
    config = CaptionConfig(data_dir=str(folder), model=model, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           min_length=max_new_tokens)  # a fixed caption length: both modes generate the same tokens
    start = time.perf_counter()
    summary = caption_images(config)
    return summary.captioned / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Captioning model (default: a tiny offline BLIP-2).")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max_new_tokens", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="sdtune-caption-bench-"))
    model = args.model or str(build_tiny_blip2(work / "tiny-blip2"))
    images = render_shape_dataset(work / "images", num_images=args.images)
    for caption in images.glob("*.txt"):
        caption.unlink()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"model: {args.model or 'tiny BLIP-2 (OPT)'}; {device}; python {platform.python_version()}; torch {torch.__version__}; "
          f"{args.images} images, {args.max_new_tokens} new tokens each\n")
    print("| batch size | images/s | speed-up |\n|---|---|---|")
    baseline = None
    for batch_size in args.batch_sizes:
        rate = run(model, images, batch_size, args.max_new_tokens)
        baseline = baseline or rate
        print(f"| {batch_size} | {rate:.1f} | {rate / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
