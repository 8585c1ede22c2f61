"""The fine-tuning metrics, on a stand-in sampler whose images say which prompt made them."""

import pytest

from sdtune import evaluation
from sdtune.evaluation import ConceptSpec, Probe, SamplingSettings, evaluate_concept


class Drawn:
    """An 'image' that remembers its prompt and seed; the stand-in judge reads it back."""

    def __init__(self, prompt, seed):
        self.prompt, self.seed = prompt, seed


@pytest.fixture
def fake_sampler(monkeypatch):
    calls = []

    def generate(pipe, prompts, generators, **kwargs):
        seeds = [g.initial_seed() for g in generators]
        calls.append((prompts, seeds))
        return [Drawn(p, s) for p, s in zip(prompts, seeds)]

    monkeypatch.setattr(evaluation, "generate", generate)
    return calls


class Pipe:
    class unet:
        class config:
            sample_size = 8

    vae_scale_factor = 4


def judge(images):
    """Odd seeds draw the concept (a star) instead of the asked shape; seeds 3 mod 4 also miss the background."""
    verdicts = []
    for image in images:
        words = image.prompt.split()
        asked_background = words[words.index("on") + 2] if "on" in words else "gray"
        shape = "star" if image.seed % 2 else words[2]
        verdicts.append((shape, "gray" if image.seed % 4 == 3 else asked_background))
    return verdicts


SPEC = ConceptSpec(
    subject=[Probe("a sks triangle", lambda v: v[0] == "star")],
    context=[Probe("a sks triangle on a black background", lambda v: v == ("star", "black")),
             Probe("a sks triangle on a white background", lambda v: v == ("star", "white"))],
    prior=[Probe("a red triangle on a white background", lambda v: v == ("triangle", "white"))],
    is_concept=lambda v: v[0] == "star",
)


def test_metrics_count_each_figure_from_the_judges_verdicts(fake_sampler):
    report = evaluate_concept(Pipe, judge, SPEC, num_samples=8, settings=SamplingSettings(batch_size=3, seed=10))
    # seeds 10..17: the odd ones (11, 13, 15, 17) draw a star; 11 and 15 put it on the wrong background
    assert report.subject_fidelity == 0.5
    assert report.context_fidelity == 2 / 8
    assert report.prior_correct == 0.5 and report.prior_drift == 0.5
    # every figure samples seeds seed..seed+n-1, in batches of batch_size
    assert [s for _, seeds in fake_sampler[:3] for s in seeds] == list(range(10, 18))


def test_prior_preservation_is_relative_to_the_base_on_the_same_seeds(fake_sampler):
    base = evaluate_concept(Pipe, judge, SPEC, num_samples=4)
    tuned = evaluation.ConceptReport(1.0, 1.0, prior_correct=0.25, prior_drift=0.75, seconds=0.0)
    assert base.as_dict()["prior_preservation"] == 1.0
    assert tuned.as_dict(base=base)["prior_preservation"] == 0.5  # 0.25 right vs the base's 0.5


def test_judging_shows_its_progress_by_images(fake_sampler, capsys):
    """Minutes of sampling on a CPU: the demo's evaluations were silent for 16 minutes on a busy machine."""
    evaluate_concept(Pipe, judge, SPEC, num_samples=8, settings=SamplingSettings(batch_size=3), desc="Judging the base")
    err = capsys.readouterr().err
    assert "Judging the base:" in err and "0/24 " in err  # counted in images: 3 figures x 8 samples
