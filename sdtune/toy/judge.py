"""The judge: a small CNN that names the shape, colour and background of a toy-world image.

It is trained on fresh renders of every scene, held-out concepts included, with light blur and
noise so that it reads generated images as well as clean renders. The metrics in
``sdtune.evaluation`` score generated samples with it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from sdtune.toy.world import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, Scene, all_scenes, draw, to_pixels

logger = logging.getLogger(__name__)

JUDGE_FILE = Path(__file__).parent / "assets" / "judge.safetensors"
ATTRIBUTES = {"shape": list(SHAPES), "color": list(COLORS), "background": list(BACKGROUNDS)}


class Judge(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px), then one linear head per attribute."""

    def __init__(self, labels: dict[str, list[str]] = ATTRIBUTES):
        super().__init__()
        self.labels = {name: list(values) for name, values in labels.items()}
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (IMAGE_SIZE // 8) ** 2, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in self.labels.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for [B, 3, 32, 32] pixels in [-1, 1]."""
        hidden = self.features(pixels)
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images: list[Image.Image]) -> list[Scene]:
        """What each image shows, by the judge (images of any size are resized to 32 px)."""
        pixels = to_pixels(images)
        logits = self(pixels)
        picks = {name: logits[name].argmax(dim=1).tolist() for name in self.labels}
        return [Scene(**{name: self.labels[name][picks[name][i]] for name in self.labels}) for i in range(len(images))]


def load_judge(path: str | Path = JUDGE_FILE) -> Judge:
    """Load the shipped judge (or one saved by :func:`save_judge`), in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        labels = json.loads(f.metadata()["labels"])
    judge = Judge(labels)
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


def save_judge(judge: Judge, path: str | Path = JUDGE_FILE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(path), metadata={"labels": json.dumps(judge.labels)})
    return path


def _render(scenes: list[Scene], rng: random.Random) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = to_pixels([draw(scene, rng) for scene in scenes])
    targets = {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in ATTRIBUTES.items()}
    return pixels, targets


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half the batch a little and add noise: generated samples are softer and grainier than renders."""
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(pixels.shape[0], 1, 1, 1, generator=generator)
    pixels = torch.where(mix < 0.5, pixels, 0.5 * pixels + 0.5 * blurred)
    noise_level = 0.1 * torch.rand(pixels.shape[0], 1, 1, 1, generator=generator)
    return pixels + noise_level * torch.randn(pixels.shape, generator=generator)


def train_judge(steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> Judge:
    """Train on fresh renders of every scene (both held-out concepts included)."""
    torch.manual_seed(seed)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    judge = Judge().train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for step in range(steps):
        pixels, targets = _render([rng.choice(scenes) for _ in range(batch_size)], rng)
        logits = judge(_augment(pixels, generator))
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 100 == 0:
            logger.info("judge step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - start)
    return judge.eval()


@torch.no_grad()
def judge_accuracy(judge: Judge, num_images: int = 3000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on fresh clean renders of every scene (a seed the training never used)."""
    rng = random.Random(seed)
    scenes = [rng.choice(all_scenes()) for _ in range(num_images)]
    pixels, targets = _render(scenes, rng)
    logits = judge(pixels)
    accuracy = {name: float((logits[name].argmax(1) == targets[name]).float().mean()) for name in ATTRIBUTES}
    correct = torch.stack([logits[n].argmax(1) == targets[n] for n in ATTRIBUTES]).all(0)
    accuracy["all"] = float(correct.float().mean())
    return accuracy
