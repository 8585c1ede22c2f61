"""The toy world: a deterministic renderer, a judge that reads it, and a base model that draws it."""

import random

import pytest
from diffusers import StableDiffusionPipeline

from sdtune.evaluation import SamplingSettings, attribute_accuracy, sample_probes, Probe
from sdtune.toy.base_model import BASE_DIR
from sdtune.toy.judge import judge_accuracy, load_judge
from sdtune.toy.world import (
    BACKGROUNDS, COLORS, HELD_OUT_PAIR, HELD_OUT_SHAPE, PRETRAIN_SHAPES, Scene, all_scenes, pretraining_scenes,
    render_folder, varied_caption,
)


def test_renderer_writes_the_same_bytes_for_the_same_seed(tmp_path):
    scenes = all_scenes()[:5]
    first = render_folder(tmp_path / "a", scenes, 10, seed=3)
    again = render_folder(tmp_path / "b", scenes, 10, seed=3)
    other = render_folder(tmp_path / "c", scenes, 10, seed=4)
    png = sorted(p.name for p in first.glob("*.png"))
    assert len(png) == 10 and sorted(p.name for p in first.glob("*.txt")) == [n.replace(".png", ".txt") for n in png]
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in png)
    assert any((first / n).read_bytes() != (other / n).read_bytes() for n in png)  # positions and sizes move
    assert (first / "00000.txt").read_text() == scenes[0].caption()


def test_pretraining_holds_out_the_star_and_the_green_square_but_keeps_their_parts():
    scenes = pretraining_scenes()
    assert not any(s.shape == HELD_OUT_SHAPE for s in scenes)
    assert not any((s.color, s.shape) == HELD_OUT_PAIR for s in scenes)
    color, shape = HELD_OUT_PAIR
    assert any(s.color == color for s in scenes) and any(s.shape == shape for s in scenes)
    assert len(scenes) == len(PRETRAIN_SHAPES) * len(COLORS) * len(BACKGROUNDS) - len(BACKGROUNDS)


def test_varied_captions_include_the_class_prompt_forms():
    rng, scene = random.Random(0), Scene("triangle", "red", "white")
    forms = {varied_caption(scene, rng) for _ in range(200)}
    assert forms == {"a red triangle on a white background", "a red triangle", "a triangle on a white background",
                     "a triangle"}


def test_judge_reads_fresh_renders_of_every_scene():
    accuracy = judge_accuracy(load_judge(), num_images=900, seed=2024)  # a seed its training never drew
    assert min(accuracy["shape"], accuracy["color"], accuracy["background"]) >= 0.98, accuracy


@pytest.fixture(scope="module")
def base_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(BASE_DIR)  # the plain diffusers call, no dtype argument
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_base_loads_in_diffusers_and_draws_held_in_prompts(base_pipe):
    scenes = pretraining_scenes()
    expected = [scenes[(7 * i) % len(scenes)] for i in range(36)]
    rates = attribute_accuracy(base_pipe, load_judge().classify, expected, [s.caption() for s in expected],
                               attributes=("shape", "color", "background"), settings=SamplingSettings(seed=100))
    assert rates["all"] >= 0.6, rates  # chance is 1/75; the 300-sample figure is in sdtune/toy/README.md


def test_shipped_base_cannot_draw_the_held_out_star(base_pipe):
    probes = [Probe("a xon triangle", lambda v: True), Probe("a star", lambda v: True)]
    verdicts = load_judge().classify([image for _, image in sample_probes(base_pipe, probes, 32, SamplingSettings())])
    assert sum(v.shape == HELD_OUT_SHAPE for v in verdicts) <= 3


def test_shipped_base_text_encoder_has_the_layout_every_transformers_reads():
    """transformers 5 saves CLIPTextModel without the `text_model.` level; transformers 4 (the lower bound) then loads
    a random text encoder with only a warning, and the demo learns nothing. The shipped file keeps the level."""
    from safetensors import safe_open

    from sdtune.toy.base_model import BASE_DIR

    with safe_open(str(BASE_DIR / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(key.startswith("text_model.") for key in keys)
