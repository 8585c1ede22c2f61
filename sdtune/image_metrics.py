"""Image-feature metrics for ``sdtune eval``: CLIP-T, CLIP-I, DINO, FID and KID on generated samples.

Each metric compares *features* of images, so the feature model is chosen apart from the metric:

- ``clip``: CLIP's projected image (and text) embeddings, the space of CLIP-T (prompt vs image)
  and CLIP-I (generated vs instance images);
- ``dino``: the CLS token of a self-supervised DINO ViT; DreamBooth's subject-fidelity metric,
  because unlike CLIP it tells apart two objects of the same class;
- ``inception``: the 2048-d pool features of the FID Inception v3 (torch-fidelity's weights), the
  features FID and KID are usually quoted on;
- ``judge``: the toy world's judge (``sdtune.toy.judge``), trained on toy-world renders, so FID
  and KID on the toy world need no download and mean something there.

FID and KID are torchmetrics' own implementations, fed precomputed features through a
pass-through module: one feature pass per image set serves every metric, and the numbers match
what torchmetrics reports on the same features.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Protocol

import torch
from PIL import Image
from torch import nn

from sdtune.errors import ConfigError

DEFAULT_MODELS = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dino-vits16"}
KINDS = ("clip", "dino", "inception", "judge")
INCEPTION_NEEDS_FIDELITY = (
    "FID/KID on Inception features need torch-fidelity: pip install 'sdtune[fid]' (it needs a torchvision that "
    "matches your torch); or pass --fid_features clip, dino or judge"
)
_BATCH = 32  # images per forward pass: bounds activation memory for large sample sets
_REASON_CHARS = 150  # an error's reason is cut to this, so the CLI's message stays one readable line


class ImageFeatures(Protocol):
    """A feature model: images in, one float32 row per image out (on the CPU, ready for the metrics)."""

    name: str

    def images(self, images: list[Image.Image]) -> torch.Tensor: ...


def _batches(images: list[Image.Image]):
    for start in range(0, len(images), _BATCH):
        yield [image.convert("RGB") for image in images[start:start + _BATCH]]


def _tensor(output) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: transformers 5 wraps it (pooler_output), 4.x returns it bare."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipFeatures:
    """CLIP image and text embeddings (the projected ones, as CLIP-T and CLIP-I use; not normalised)."""

    name = "clip"

    def __init__(self, model_name_or_path: str, device: str = "cpu"):
        from transformers import AutoConfig, AutoProcessor, CLIPModel

        # CLIPModel.from_pretrained on another architecture's folder only warns and returns random
        # weights; check the config first so a wrong folder is an error, not a meaningless score.
        config = AutoConfig.from_pretrained(model_name_or_path)
        if config.model_type != "clip":
            raise ValueError(f"a {config.model_type!r} model, not CLIP")
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_name_or_path)
        self.device = device
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        rows = [torch.empty(0, self.dim)]
        for batch in _batches(images):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            rows.append(_tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings; prompts longer than the text encoder's positions are cut, as in training."""
        rows = [torch.empty(0, self.dim)]
        for start in range(0, len(prompts), _BATCH):
            # max_length from the model, not the tokenizer: a tokenizer saved without
            # model_max_length would otherwise not truncate, and the position embeddings overflow.
            tokens = self.processor(text=list(prompts[start:start + _BATCH]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
            rows.append(_tensor(features).float().cpu())
        return torch.cat(rows)


class DinoFeatures:
    """The CLS token of a DINO ViT (``facebook/dino-vits16``) or DINOv2 (``facebook/dinov2-small``)."""

    name = "dino"

    def __init__(self, model_name_or_path: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(model_name_or_path).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        rows = [torch.empty(0, self.dim)]
        for batch in _batches(images):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            rows.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(rows)


class InceptionFeatures:
    """The 2048-d pool features of the FID Inception v3, through torchmetrics (needs torch-fidelity).

    ``weights_path`` is a local copy of torch-fidelity's ``pt_inception-2015-12-05`` weights, for
    machines that cannot download them on first use.
    """

    name = "inception"
    dim = 2048

    def __init__(self, weights_path: str | None = None, device: str = "cpu"):
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.dim)],
                                        feature_extractor_weights_path=weights_path).to(device)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        import numpy as np

        rows = [torch.empty(0, self.dim)]
        for batch in _batches(images):
            if len({image.size for image in batch}) > 1:  # one tensor needs one size; the network resizes to 299 anyway
                batch = [image.resize((299, 299), Image.Resampling.BICUBIC) for image in batch]
            pixels = torch.from_numpy(np.stack([np.asarray(image) for image in batch])).permute(0, 3, 1, 2)
            rows.append(self.model(pixels.to(self.device)).float().cpu())  # uint8 in [0, 255], as torch-fidelity expects
        return torch.cat(rows)


class JudgeFeatures:
    """The toy judge's 128-d penultimate features: FID/KID for the toy world, offline and meaningful there."""

    name = "judge"
    dim = 128

    def __init__(self, path: str | None = None, device: str = "cpu"):
        from sdtune.toy.judge import JUDGE_FILE, load_judge

        self.judge = load_judge(path or JUDGE_FILE).to(device)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        from sdtune.toy.world import to_pixels

        rows = [torch.empty(0, self.dim)]
        for batch in _batches(images):
            rows.append(self.judge.features(to_pixels(batch).to(self.device)).float().cpu())
        return torch.cat(rows)


def _short_reason(error: BaseException) -> str:
    """The first line of an error, cut to ~150 characters: Hub errors run to paragraphs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = " ".join(lines[0].split()) if lines else type(error).__name__
    return reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS - 1] + "…"


def _looks_local(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.altsep is not None and os.altsep in name)


def _fidelity_importable() -> bool:
    try:
        importlib.import_module("torch_fidelity")
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails with all sorts of errors
        return False
    return True


def load_features(kind: str, model_name_or_path: str | None = None, device: str = "cpu") -> ImageFeatures:
    """The feature model ``kind`` (clip, dino, inception, judge); any failure to load is one ConfigError line."""
    if kind not in KINDS:
        raise ConfigError(f"unknown image features {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "inception" and not _fidelity_importable():
        raise ConfigError(INCEPTION_NEEDS_FIDELITY)
    name = model_name_or_path or DEFAULT_MODELS.get(kind)
    classes = {"clip": ClipFeatures, "dino": DinoFeatures, "inception": InceptionFeatures, "judge": JudgeFeatures}
    if name is not None and _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        # from_pretrained would take a missing folder for a Hub id and answer with a repo-id error
        raise ConfigError(f"--{kind}_model {name}: no such file or folder")
    try:
        return classes[kind](os.path.expanduser(name) if name else None, device=device)
    except Exception as error:  # noqa: BLE001 - offline, missing, corrupt or wrong files: all one answer
        hint = {"judge": "pass a file written by sdtune.toy.judge.save_judge",
                "inception": "offline? torch-fidelity downloads its weights on first use; pass a local weights file"}
        label = f"--{kind}_model {name}" if name else f"{kind} features"
        raise ConfigError(f"{label}: cannot load ({hint.get(kind, 'offline? pass a local folder')}): "
                          f"{_short_reason(error)}") from error


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what} needs two [N, D] feature tensors of the same D; "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def mean_paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over i of cos(a[i], b[i]): CLIP-T, each image against its own prompt."""
    if a.shape != b.shape or a.dim() != 2 or len(a) == 0:
        raise ValueError(f"paired cosine needs two non-empty [N, D] tensors of one shape; "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean().item()


def mean_cross_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over all (i, j) of cos(a[i], b[j]): CLIP-I and DINO, every generated image against every instance image."""
    _check_pair(a, b, "cross cosine")
    if len(a) == 0 or len(b) == 0:
        raise ValueError("cross cosine needs at least one row on each side")
    unit_a = torch.nn.functional.normalize(a.double(), dim=1)
    unit_b = torch.nn.functional.normalize(b.double(), dim=1)
    return (unit_a @ unit_b.T).mean().item()


class _Precomputed(nn.Module):
    """A torchmetrics ``feature`` module that returns its input: the features are computed already.

    ``num_features`` is set so that FrechetInceptionDistance reads the width from it instead of
    pushing a random 299 px image through the module to find it. With a custom module, neither
    FID nor KID resizes, converts (``normalize`` only applies to the built-in Inception) or checks
    the shape of what ``update`` gets, so [N, D] features go straight into their statistics.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _torchmetrics_image(module: str):
    try:
        return importlib.import_module(f"torchmetrics.image.{module}")
    except Exception as error:  # noqa: BLE001 - torchmetrics imports torch-fidelity at import time when it is installed
        raise ConfigError(f"torchmetrics' {module.upper()} does not import ({_short_reason(error)}); a torch-fidelity "
                          "whose torchvision does not match your torch? pip uninstall torch-fidelity, or fix torchvision"
                          ) from error


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets, by torchmetrics (in float64: the covariance terms cancel heavily)."""
    _check_pair(real, fake, "FID")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 samples on each side; got {len(real)} real and {len(fake)} fake")
    fid = _torchmetrics_image("fid").FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    # float64 features: torchmetrics accumulates in float64 anyway, but casts the result back to the features' dtype
    fid.update(real.detach().cpu().double(), real=True)
    fid.update(fake.detach().cpu().double(), real=False)
    return fid.compute().item()


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int | None = None,
                              subsets: int = 100) -> tuple[float, float]:
    """KID (mean, std over random subsets) by torchmetrics; unbiased, so it can dip just below 0.

    The subsets are drawn from torch's RNG, seeded 0 inside a fork so two calls agree and the
    caller's RNG stream is untouched.
    """
    _check_pair(real, fake, "KID")
    size = subset_size if subset_size is not None else min(1000, len(real), len(fake))
    if size < 2 or size > min(len(real), len(fake)):
        raise ValueError(f"KID needs a subset size between 2 and the smaller set "
                         f"({len(real)} real, {len(fake)} fake); got {size}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = _torchmetrics_image("kid").KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets,
                                                                 subset_size=size)
    kid.update(real.detach().cpu().double(), real=True)
    kid.update(fake.detach().cpu().double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = kid.compute()
    return mean.item(), std.item()
