"""Image-feature metrics: FID/KID against closed forms, cosines on known vectors, feature models built tiny and offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the feature models below are saved to tmp_path and loaded back; nothing reaches the Hub

import random  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sdtune.errors import ConfigError  # noqa: E402
from sdtune.image_metrics import (  # noqa: E402
    INCEPTION_NEEDS_FIDELITY, ClipFeatures, DinoFeatures, JudgeFeatures, frechet_distance, kernel_inception_distance,
    load_features, mean_cross_cosine, mean_paired_cosine,
)
from sdtune.toy.world import Scene, draw  # noqa: E402


def gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.from_numpy(cov))
    return torch.randn(n, len(mean), generator=gen, dtype=torch.float64) @ chol.T + torch.from_numpy(mean)


def fid_closed_form(mu1, s1, mu2, s2) -> float:
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_fid_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8)) * 0.5
    s1 = a @ a.T + 0.5 * np.eye(8)  # a full covariance
    s2 = np.diag(np.linspace(0.5, 2.0, 8))
    mu1, mu2 = np.zeros(8), np.full(8, 0.5)
    expected = fid_closed_form(mu1, s1, mu2, s2)  # ~5.4
    real, fake = gaussian(20000, mu1, s1, seed=1), gaussian(20000, mu2, s2, seed=2)
    # sampling spread at 20k samples x 8 dims is ~0.07 (measured over seeds); 0.35 is ~5 sigma, far below
    # any formula slip (a dropped cross term or mean term moves it by > 2)
    assert frechet_distance(real.float(), fake.float()) == pytest.approx(expected, abs=0.35)
    # and on the samples' own statistics it is the closed form to rounding: the features reach
    # torchmetrics unchanged (no resize, no uint8 conversion, no float32 round trip)
    sample = fid_closed_form(real.mean(0).numpy(), np.cov(real.numpy().T), fake.mean(0).numpy(), np.cov(fake.numpy().T))
    assert frechet_distance(real, fake) == pytest.approx(sample, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_needs_two_samples():
    features = gaussian(500, np.full(16, 3.0), np.eye(16), seed=3)
    assert abs(frechet_distance(features, features)) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(features[:1], features)
    with pytest.raises(ValueError):
        frechet_distance(features, features[:, :8])


def unbiased_poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """KID's estimator on full sets: cubic kernel (x.y / d + 1)^3, diagonal left out of the within-set terms."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_separates_distributions_and_is_reproducible():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 8, generator=gen), torch.randn(600, 8, generator=gen)
    shifted = torch.randn(600, 8, generator=gen) + 0.5
    same_mean, same_std = kernel_inception_distance(x, y, subset_size=200, subsets=20)
    shift_mean, _ = kernel_inception_distance(x, shifted, subset_size=200, subsets=20)
    assert abs(same_mean) < 0.05 and same_std > 0  # unbiased: ~0, either sign
    assert shift_mean > 0.5  # measured ~1.0 over seeds
    assert kernel_inception_distance(x, y, subset_size=200, subsets=20) == (same_mean, same_std)
    # the caller's RNG stream is untouched
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    kernel_inception_distance(x, y, subset_size=200, subsets=3)
    assert torch.equal(torch.rand(1), expected_next)


def test_kid_on_whole_sets_is_the_unbiased_mmd():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(50, 4, generator=gen, dtype=torch.float64) + 0.3
    mean, std = kernel_inception_distance(x, y, subsets=3)  # default subset size: all 50, every subset the whole set
    assert mean == pytest.approx(unbiased_poly_mmd(x.numpy(), y.numpy()), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        kernel_inception_distance(x, y, subset_size=51)


def test_cosines_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 5.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])  # orthogonal, parallel, opposite, 45 degrees
    assert mean_paired_cosine(a, b) == pytest.approx((0.0 + 1.0 - 1.0 + 2 ** -0.5) / 4)
    assert mean_paired_cosine(a, a * 7) == pytest.approx(1.0)
    # all pairs: x vs (x, diagonal) = 1, 1/sqrt2; y vs (x, diagonal) = 0, 1/sqrt2
    assert mean_cross_cosine(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])) == (
        pytest.approx((1 + 2 * 2 ** -0.5) / 4))
    assert mean_cross_cosine(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError):
        mean_paired_cosine(a, b[:2])
    with pytest.raises(ValueError):
        mean_cross_cosine(a, torch.ones(2, 3))


def images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_tiny_clip_gives_projected_image_and_text_features(tiny_clip):
    clip = load_features("clip", str(tiny_clip))
    assert isinstance(clip, ClipFeatures) and clip.name == "clip"
    pictures = images(3) + images(2, size=64)  # mixed sizes: the processor resizes
    first = clip.images(pictures)
    assert first.shape == (5, 16) and first.dtype == torch.float32  # projection_dim, not the vision width 32
    assert torch.equal(clip.images(pictures), first)
    assert not torch.allclose(first.norm(dim=1), torch.ones(5))  # raw embeddings, not normalised
    long_prompt = " ".join(["a red circle on a black background"] * 6)  # > 16 positions: must be truncated
    texts = clip.texts(["a red circle", "a blue star on a white background", long_prompt])
    assert texts.shape == (3, 16) and texts.dtype == torch.float32
    assert torch.equal(clip.texts(["a red circle", "a blue star on a white background", long_prompt]), texts)
    # loading the folder again gives the same features: the weights come from disk, not a fresh init
    assert torch.equal(load_features("clip", str(tiny_clip)).images(pictures), first)
    assert clip.images([]).shape == (0, 16)


def test_tiny_dino_gives_the_cls_token(tiny_dino):
    from transformers import ViTModel

    dino = load_features("dino", str(tiny_dino))
    assert isinstance(dino, DinoFeatures) and dino.name == "dino"
    pictures = images(3)
    features = dino.images(pictures)
    assert features.shape == (3, 32) and features.dtype == torch.float32
    pixels = dino.processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = ViTModel.from_pretrained(tiny_dino).eval()(pixel_values=pixels).last_hidden_state
    assert torch.allclose(features, hidden[:, 0], atol=1e-6)  # the CLS token, not the patch mean
    assert not torch.allclose(features, hidden[:, 1:].mean(1), atol=1e-3)


def test_tiny_dinov2_loads_too(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2, image_size=32,
                          patch_size=8)
    Dinov2Model(config).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    assert load_features("dino", str(tmp_path)).images(images(2)).shape == (2, 32)


def test_judge_features_group_renders_of_one_scene():
    judge = load_features("judge")
    assert isinstance(judge, JudgeFeatures) and judge.name == "judge"
    scenes = [Scene("circle", "red", "black"), Scene("star", "blue", "white"), Scene("square", "green", "gray"),
              Scene("triangle", "yellow", "black"), Scene("circle", "blue", "black"), Scene("cross", "red", "black")]
    rng = random.Random(0)
    per_scene = 4
    features = judge.images([draw(scene, rng) for scene in scenes for _ in range(per_scene)])  # new position and size each
    assert features.shape == (len(scenes) * per_scene, 128) and features.dtype == torch.float32
    unit = torch.nn.functional.normalize(features, dim=1)
    cos = (unit @ unit.T).view(len(scenes), per_scene, len(scenes), per_scene)
    off_diagonal = ~torch.eye(per_scene, dtype=torch.bool)
    for i in range(len(scenes)):
        within = cos[i, :, i][off_diagonal].mean()
        between = max(cos[i, :, j].mean() for j in range(len(scenes)) if j != i)
        assert within > between, scenes[i]
    # larger images are resized to the judge's 32 px
    big = judge.images([draw(scenes[0], random.Random(1), size=64)])
    assert big.shape == (1, 128)


def test_missing_folder_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(ConfigError) as raised:
        load_features("clip", str(missing))
    message = str(raised.value)
    assert "\n" not in message and str(missing) in message and "--clip_model" in message


def test_unloadable_folder_is_one_short_line(tmp_path, tiny_dino):
    (tmp_path / "empty").mkdir()
    for kind, path in [("dino", tmp_path / "empty"), ("clip", tiny_dino)]:  # not a model; a ViT is not CLIP
        with pytest.raises(ConfigError) as raised:
            load_features(kind, str(path))
        message = str(raised.value)
        assert "\n" not in message and str(path) in message and "cannot load" in message
        assert len(message) < len(str(path)) + 250
    with pytest.raises(ConfigError, match="not CLIP"):
        load_features("clip", str(tiny_dino))
    with pytest.raises(ConfigError, match="judge"):
        load_features("judge", str(tmp_path / "empty"))


def test_inception_without_torch_fidelity_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity` fail even where it is installed
    with pytest.raises(ConfigError) as raised:
        load_features("inception")
    assert str(raised.value) == INCEPTION_NEEDS_FIDELITY
    assert "pip install 'sdtune[fid]'" in str(raised.value) and "--fid_features clip, dino or judge" in str(raised.value)


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="clip, dino, inception, judge"):
        load_features("lpips")
