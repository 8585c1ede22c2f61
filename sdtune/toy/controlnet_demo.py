"""`sdtune demo --controlnet`: teach the toy base to put its shape where a mask says, and measure it.

Data: rendered pretraining scenes (every shape but the star, random position and size), each with its
silhouette mask (white shape on black) as the control map and its full caption. A ControlNet is
trained on them with the base frozen. Measured on fresh scenes (positions never trained on), with the
same seeds with and without the ControlNet:

- position: IoU between the generated shape (pixels that differ from the background the judge sees)
  and the mask it was given; without the ControlNet this is chance;
- the prompt still rules what the mask does not fix: colour and background, by the judge;
- a shape the base never learned: star masks with "star" prompts; does the judge see a star?
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdtune.evaluation import SamplingSettings
from sdtune.sampling import generate, make_grid
from sdtune.toy.base_model import BASE_DIR
from sdtune.toy.judge import load_judge
from sdtune.toy.world import BACKGROUNDS, COLORS, HELD_OUT_SHAPE, Scene, draw, pretraining_scenes

_DIFFERS = 60  # summed |RGB difference| above which a pixel is not background (anti-aliased edges are half-way)


@dataclass(frozen=True)
class ControlNetDemoSettings:
    train_images: int = 512
    steps: int = 600
    learning_rate: float = 3e-4  # 2e-4 at 200 steps: IoU 0.70; 3e-4 at 600: 0.86
    batch_size: int = 8
    eval_scenes: int = 96
    star_scenes: int = 48


def shape_mask(image: Image.Image, background: str) -> np.ndarray:
    """Where ``image`` is not its ``background`` colour: the shape's silhouette. [H, W] bool"""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    return np.abs(pixels - np.array(BACKGROUNDS[background])).sum(axis=-1) > _DIFFERS


def mask_image(mask: np.ndarray) -> Image.Image:
    """A mask as a control map: white silhouette on black, three channels."""
    return Image.fromarray(np.stack([mask.astype(np.uint8) * 255] * 3, axis=-1))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def render_pairs(scenes: list[Scene], count: int, seed: int) -> list[tuple[Scene, Image.Image, Image.Image]]:
    """``count`` random (scene, image, mask map) triples; positions and sizes drawn from ``seed``."""
    rng = random.Random(seed)
    triples = []
    for _ in range(count):
        scene = rng.choice(scenes)
        image = draw(scene, rng)
        triples.append((scene, image, mask_image(shape_mask(image, scene.background))))
    return triples


def write_training_data(folder: Path, count: int, seed: int) -> tuple[Path, Path]:
    """Images with caption files, and their masks under the same names (sdtune's --conditioning_data_dir layout)."""
    images, masks = folder / "images", folder / "masks"
    if (folder / "done").is_file():
        return images, masks
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i, (scene, image, mask) in enumerate(render_pairs(pretraining_scenes(), count, seed)):
        image.save(images / f"{i:04d}.png")
        (images / f"{i:04d}.txt").write_text(scene.caption())
        mask.save(masks / f"{i:04d}.png")
    (folder / "done").write_text("")
    return images, masks


def score(pipe, judge, triples, sampling: SamplingSettings, controlled: bool) -> tuple[dict, list[Image.Image]]:
    """Position IoU and the judge's shape / colour / background accuracy of one image per triple."""
    prompts = [scene.caption() for scene, _, _ in triples]
    images = []
    for begin in range(0, len(triples), sampling.batch_size):
        chunk = slice(begin, begin + sampling.batch_size)
        generators = [torch.Generator().manual_seed(sampling.seed + i)
                      for i in range(begin, min(begin + sampling.batch_size, len(triples)))]
        extra = {"image": [mask for _, _, mask in triples[chunk]]} if controlled else {}
        images += generate(pipe, prompts[chunk], generators, size=(32, 32), num_inference_steps=sampling.num_inference_steps,
                           guidance_scale=sampling.guidance_scale, **extra)
    verdicts = judge.classify(images)
    ious = [iou(shape_mask(image, verdict.background), np.asarray(mask)[..., 0] > 127)
            for image, verdict, (_, _, mask) in zip(images, verdicts, triples)]
    figures = {"position_iou": float(np.mean(ious))}
    for attribute in ("shape", "color", "background"):
        figures[attribute] = float(np.mean([getattr(v, attribute) == getattr(s, attribute)
                                            for v, (s, _, _) in zip(verdicts, triples)]))
    return {k: round(v, 3) for k, v in figures.items()}, images


def run_controlnet_demo(output_dir: str | Path = "sdtune-demo-controlnet", *, seed: int = 0, base: str | Path = BASE_DIR,
                        settings: ControlNetDemoSettings | None = None) -> dict:
    """Train the ControlNet, score the base with and without it, write ``metrics.json`` and ``controlnet.png``."""
    from diffusers import ControlNetModel

    from sdtune.api import train_controlnet
    from sdtune.config import ControlNetConfig
    from sdtune.models import load_components
    from sdtune.threads import set_torch_threads

    set_torch_threads()
    settings = settings or ControlNetDemoSettings()
    output_dir = Path(output_dir)
    start = time.perf_counter()
    images, masks = write_training_data(output_dir / "data", settings.train_images, seed)
    _say(f"training a ControlNet on {settings.train_images} masks of pretraining scenes ({settings.steps} steps) ...")
    result = train_controlnet(ControlNetConfig(
        pretrained_model_name_or_path=str(base), instance_data_dir=str(images), conditioning_data_dir=str(masks),
        output_dir=str(output_dir / "controlnet"), resolution=32, train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, max_train_steps=settings.steps, checkpointing_steps=0, report_to="none",
        mixed_precision="no", seed=seed, overwrite_output_dir=True))
    train_seconds = time.perf_counter() - start
    components = load_components(str(base))
    controlnet = ControlNetModel.from_pretrained(result.output_dir)  # the export, through diffusers' loader
    plain, controlled = components.pipeline(), components.pipeline(controlnet=controlnet)
    judge, sampling = load_judge(), SamplingSettings(seed=seed)
    # fresh scenes: another seed than the training data's, so positions and sizes are new
    held_out = render_pairs(pretraining_scenes(), settings.eval_scenes, seed + 10_000)
    stars = render_pairs([Scene(HELD_OUT_SHAPE, c, b) for c in COLORS for b in BACKGROUNDS], settings.star_scenes, seed + 20_000)
    metrics = {"train_seconds": round(train_seconds, 1), "steps": result.global_step}
    grids = {}
    for name, triples in (("held_out", held_out), ("star", stars)):
        without, base_images = score(plain, judge, triples, sampling, controlled=False)
        with_cn, cn_images = score(controlled, judge, triples, sampling, controlled=True)
        metrics[name] = {"without_controlnet": without, "with_controlnet": with_cn}
        grids[name] = (triples, base_images, cn_images)
        _say(f"{name}: position IoU {without['position_iou']:.2f} -> {with_cn['position_iou']:.2f}, shape "
             f"{without['shape']:.2f} -> {with_cn['shape']:.2f}, colour {with_cn['color']:.2f}, background {with_cn['background']:.2f}")
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _grid(grids, output_dir / "controlnet.png")
    _say(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'controlnet.png'} in {metrics['seconds']:.0f} s")
    return metrics


def _grid(grids: dict, path: Path, per_row: int = 8) -> None:
    """Per scene set, three rows: the control mask, the base alone, the base with the ControlNet (same seeds)."""
    tiles = []
    for triples, base_images, cn_images in grids.values():
        tiles += [mask for _, _, mask in triples[:per_row]] + base_images[:per_row] + cn_images[:per_row]
    grid = make_grid([tile.resize((96, 96), Image.Resampling.NEAREST) for tile in tiles], columns=per_row)
    canvas = Image.new("RGB", (grid.width, grid.height + 20), "white")
    canvas.paste(grid, (0, 20))
    ImageDraw.Draw(canvas).text((4, 4), "rows: mask / base / base + ControlNet; pretraining shapes, then stars", fill="black")
    canvas.save(path)


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)
