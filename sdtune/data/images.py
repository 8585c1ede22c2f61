"""Reading images safely and fitting them to a training size (square crop or aspect bucket)."""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

_WARNED_TRUNCATED: set[tuple[str, int]] = set()
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImage(Exception):
    """An image that cannot be used; the message says why. Callers log it and skip the image."""


def open_rgb(data: bytes, name: str = "image") -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image.

    Handles what real folders contain: EXIF rotation, CMYK, 16-bit grey, palette and alpha
    (composited on white, which is what a viewer shows). Truncated files are decoded as far
    as they go if Pillow can (with a warning naming the file), otherwise rejected.

    Raises:
        BadImage: the bytes are not a readable image.
    """
    try:
        image = Image.open(io.BytesIO(data))
        try:
            image.load()
        except OSError:  # truncated: take what decodes rather than drop a mostly-good image
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            if (name, len(data)) not in _WARNED_TRUNCATED:  # once per file, not once per epoch
                _WARNED_TRUNCATED.add((name, len(data)))
                logger.warning("%s is truncated; training on the part that decodes", name)
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"not a readable image ({err})") from None
    return _to_rgb(image)


def open_option_image(path: str | Path, option: str) -> Image.Image:
    """The image file an option names (``--init_image``, ``--control_image``), as RGB.

    Raises:
        ConfigError: the file is missing or not an image; one line naming the option and the file.
    """
    from sdtune.errors import ConfigError

    path = Path(path)
    try:
        return open_rgb(path.read_bytes(), str(path))
    except (OSError, BadImage) as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else str(err)
        raise ConfigError(f"{option} {path}: {reason}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


@dataclass(frozen=True)
class Placement:
    """How an image maps to its training tensor: resize to ``resized`` then crop ``crop`` (left, top, w, h).

    ``original`` is the image's own (w, h), which SDXL is conditioned on.
    """

    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    original: tuple[int, int] = (0, 0)

    @property
    def size(self) -> tuple[int, int]:
        return self.crop[2], self.crop[3]


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): multiples of ``step`` with area at most resolution², sides within [min, max]."""
    max_area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def choose_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], *, no_upscale: bool = False, step: int = 64
) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: larger area).

    With ``no_upscale`` an image smaller than the bucket area gets its own size, scaled to keep
    the aspect and rounded down to ``step``, so it is never enlarged.
    """
    width, height = size
    aspect = width / height
    if no_upscale:
        max_area = max(w * h for w, h in buckets)
        if width * height <= max_area:
            w = max(step, width // step * step)
            h = max(step, height // step * step)
            return w, h
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(aspect)), -b[0] * b[1]))


def place(size: tuple[int, int], target: tuple[int, int], *, center_crop: bool, rng: random.Random) -> Placement:
    """Scale ``size`` to cover ``target`` keeping the aspect, then crop ``target`` (centre or random)."""
    width, height = size
    target_w, target_h = target
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    if center_crop:
        left, top = (resized[0] - target_w) // 2, (resized[1] - target_h) // 2
    else:
        left, top = rng.randint(0, resized[0] - target_w), rng.randint(0, resized[1] - target_h)
    return Placement(resized=resized, crop=(left, top, target_w, target_h), original=(width, height))


def placed(image: Image.Image, placement: Placement, flip: bool,
           resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """``image`` resized, cropped and optionally flipped as ``placement`` says."""
    left, top, w, h = placement.crop
    image = image.resize(placement.resized, resample=resample).crop((left, top, left + w, top + h))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def to_tensor(image: Image.Image, placement: Placement, flip: bool) -> torch.Tensor:
    """Resize, crop, optionally flip, and scale to [-1, 1]. Returns [3, H, W] float32."""
    array = np.asarray(placed(image, placement, flip), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
