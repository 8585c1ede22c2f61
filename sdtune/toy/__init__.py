"""The offline toy world: a tiny Stable Diffusion model and procedurally drawn training images."""

from sdtune.toy.shapes import render_shape_dataset
from sdtune.toy.tiny_model import build_tiny_model, build_tiny_sdxl_model

__all__ = ["build_tiny_model", "build_tiny_sdxl_model", "render_shape_dataset"]
