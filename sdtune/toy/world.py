"""The toy world: flat shapes of a few colours on plain backgrounds, each with its caption.

Everything is drawn procedurally and deterministically from a seed, so the world needs no
download and a judge (sdtune.toy.judge) can score any generated image against its prompt.

Two concepts are held out of the base model's pretraining:

- concept A, the shape ``star``: never drawn in pretraining; the DreamBooth/LoRA subject;
- concept B, the pairing ``green square``: green things and squares appear, never together;
  the textual-inversion concept (something the base can express but has no word for).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 205, 30),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (20, 20, 20), "white": (240, 240, 240), "gray": (128, 128, 128)}

HELD_OUT_SHAPE = "star"  # concept A
HELD_OUT_PAIR = ("green", "square")  # concept B
PRETRAIN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT_SHAPE)

_SUPERSAMPLE = 4  # draw 4x larger, then downsample: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """What one image shows; the judge predicts exactly these three attributes."""

    shape: str
    color: str
    background: str

    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def draw(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` with a random position and size drawn from ``rng``."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    radius = big * rng.uniform(0.24, 0.36)
    margin = radius * 0.95
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    fill = COLORS[scene.color]
    pen = ImageDraw.Draw(image)
    if scene.shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif scene.shape == "square":
        r = radius * 0.85
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=fill)
    elif scene.shape == "diamond":
        pen.polygon([(cx, cy - radius), (cx + radius * 0.75, cy), (cx, cy + radius), (cx - radius * 0.75, cy)], fill=fill)
    elif scene.shape == "cross":
        arm = radius * 0.33
        pen.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        pen.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    elif scene.shape == "star":
        points = []
        for k in range(10):  # five points, alternating outer and inner radius
            r = radius if k % 2 == 0 else radius * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        pen.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; expected one of {SHAPES}")
    return image.resize((size, size), Image.Resampling.BOX)


def to_pixels(images: list[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images as a [B, 3, size, size] tensor in [-1, 1], the range the VAE and the judge read (resized if needed)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BOX)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pretraining_scenes() -> list[Scene]:
    """Every scene the base model is pretrained on: no star, no green square."""
    return [
        Scene(shape, color, background)
        for shape in PRETRAIN_SHAPES
        for color in COLORS
        for background in BACKGROUNDS
        if (color, shape) != HELD_OUT_PAIR
    ]


def all_scenes() -> list[Scene]:
    """Every scene of the world, held-out concepts included (the judge's training set)."""
    return [Scene(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]


def varied_caption(scene: Scene, rng: random.Random) -> str:
    """The full caption most of the time, sometimes without colour or background.

    The partial forms teach the base prompts such as "a triangle" (the DreamBooth class prompt)
    and "a red triangle", so they describe something the model has seen.
    """
    r = rng.random()
    if r < 0.7:
        return scene.caption()
    if r < 0.8:
        return f"a {scene.color} {scene.shape}"
    if r < 0.9:
        return f"a {scene.shape} on a {scene.background} background"
    return f"a {scene.shape}"


def render_folder(
    output_dir: str | Path,
    scenes: list[Scene],
    num_images: int,
    *,
    seed: int = 0,
    caption: str | None = None,
    vary_captions: bool = False,
    size: int = IMAGE_SIZE,
) -> Path:
    """Write ``num_images`` PNGs cycling through ``scenes``, each with a ``.txt`` caption (kohya layout).

    Args:
        output_dir: Folder to write (created if missing).
        scenes: Scenes to draw, in turn.
        num_images: How many images.
        seed: Seed of positions, sizes and caption variation; the same seed writes the same bytes.
        caption: One caption for every image (e.g. "a xon triangle on a gray background");
            ``{background}`` in it is filled with the scene's background. Default: the scene's own.
        vary_captions: Use :func:`varied_caption` (pretraining data).
        size: Image side in pixels.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_images):
        scene = scenes[i % len(scenes)]
        image = draw(scene, rng, size)
        if caption is not None:
            text = caption.format(background=scene.background)
        else:
            text = varied_caption(scene, rng) if vary_captions else scene.caption()
        image.save(output_dir / f"{i:05d}.png")
        (output_dir / f"{i:05d}.txt").write_text(text)
    return output_dir
