"""ControlNet at generation time: control maps (made from an image, or given ready), the ControlNets, their scales.

Canny edges come from OpenCV (``cv2.Canny``), the detector the public canny ControlNets were
trained with (lllyasviel's annotators, diffusers' docs), so the usual thresholds (100, 200) mean
the same here. OpenCV is an optional dependency: ``pip install 'sdtune[controlnet]'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtune.errors import ConfigError

CONTROL_TYPES = ("canny", "none")  # "none": the image is a ready-made control map


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges of ``image``: white (255) edges on black, as three channels (what ControlNets read)."""
    try:
        import cv2
    except ImportError:
        raise ConfigError("--control_type canny needs OpenCV: pip install 'sdtune[controlnet]' "
                          "(or pass a ready-made map with --control_type none)") from None
    edges = cv2.Canny(np.asarray(image.convert("L")), low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def read_control_images(spec: str, option: str, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """The images of a comma-separated list of files, as RGB, resized to ``size`` (width, height) if given.

    Raises:
        ConfigError: a file is missing or not an image; one line naming it and ``option``.
    """
    from sdtune.data.images import open_option_image

    images = [open_option_image(item, option) for item in split_list(spec)]
    return [image.resize(size, Image.Resampling.BILINEAR) if size and image.size != size else image for image in images]


def split_list(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",") if item.strip()]


@dataclass
class Controls:
    """The ControlNets of one `generate` run, each with its control map and strength."""

    models: list  # ControlNetModel, one per --controlnet
    images: list[Image.Image]  # the control maps, at the output size
    scales: list[float]

    @property
    def pipeline_model(self):
        """What a diffusers ControlNet pipeline takes: one model, or a list (it makes a MultiControlNetModel)."""
        return self.models[0] if len(self.models) == 1 else self.models

    def call_kwargs(self, img2img: bool) -> dict:
        """The pipeline call's arguments: img2img pipelines take the maps as ``control_image``."""
        images = self.images[0] if len(self.images) == 1 else self.images
        scales = self.scales[0] if len(self.scales) == 1 else self.scales
        return {"control_image" if img2img else "image": images, "controlnet_conditioning_scale": scales}


def load_controls(config, size: tuple[int, int], dtype, device) -> Controls:
    """The --controlnet models and their --control_image maps (preprocessed by --control_type), for ``size``.

    Raises:
        ConfigError: the lists differ in length, a type is unknown, or a file is missing.
    """
    from sdtune.methods.controlnet import load_controlnet

    if not config.control_image:
        raise ConfigError("--controlnet needs --control_image FILE (one per ControlNet, comma-separated)")
    sources, _, types, scales = _settings(config)
    images = read_control_images(config.control_image, "--control_image")
    if len(images) != len(sources):
        raise ConfigError(f"--control_image gives {len(images)} image(s) for {len(sources)} ControlNet(s); pass one per --controlnet")
    maps = []
    for image, kind in zip(images, types):
        if kind not in CONTROL_TYPES:
            raise ConfigError(f"--control_type {kind}: unknown; use one of {', '.join(CONTROL_TYPES)}")
        if kind == "canny":
            image = canny(image, config.canny_low_threshold, config.canny_high_threshold)
        maps.append(image.resize(size, Image.Resampling.BILINEAR) if image.size != size else image)
    try:
        strengths = [float(s) for s in scales]
    except ValueError:
        raise ConfigError(f"--controlnet_conditioning_scale {config.controlnet_conditioning_scale}: expected numbers, "
                          "e.g. 0.8 or 0.8,0.5") from None
    models = [load_controlnet(source, "--controlnet", dtype).to(device) for source in sources]
    return Controls(models, maps, strengths)


def _settings(config) -> tuple[list[str], list[str], list[str], list[str]]:
    """--controlnet, --control_image, --control_type and --controlnet_conditioning_scale as lists, one item per
    ControlNet (a single type or scale applies to all)."""
    sources = split_list(config.controlnet)
    types = _per_controlnet(split_list(config.control_type), len(sources), "--control_type")
    scales = _per_controlnet(split_list(config.controlnet_conditioning_scale), len(sources), "--controlnet_conditioning_scale")
    return sources, split_list(config.control_image or ""), types, scales


def _per_controlnet(values: list[str], count: int, option: str) -> list[str]:
    """One value per ControlNet: a single value applies to all."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ConfigError(f"{option} gives {len(values)} values for {count} ControlNet(s); give one, or one per --controlnet")
    return values


def png_fields(config) -> list[str]:
    """The control settings in the PNG's parameters text, in sd-webui-controlnet's infotext form."""
    sources, images, types, scales = _settings(config)
    return [f'ControlNet {i}: "Module: {kind}, Model: {source}, Weight: {scale}, Image: {image}"'
            for i, (source, image, kind, scale) in enumerate(zip(sources, images, types, scales))]
