"""Procedural training images: coloured shapes on plain backgrounds, with captions."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, color: str, background: str, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """One RGB image of ``shape`` in ``color`` on ``background``; ``rng`` jitters position and scale."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.34)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLORS[color])
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return image


def render_shape_dataset(
    output_dir: str | Path,
    num_images: int = 8,
    *,
    shape: str = "triangle",
    color: str = "purple",
    caption: str = "a sks shape",
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``num_images`` images of one concept with ``.txt`` captions (kohya layout) and return the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    backgrounds = [c for c in COLORS if c != color]
    for i in range(num_images):
        image = draw_shape(shape, color, backgrounds[i % len(backgrounds)], size=size, rng=rng)
        image.save(output_dir / f"{i:04d}.png")
        (output_dir / f"{i:04d}.txt").write_text(caption)
    return output_dir
