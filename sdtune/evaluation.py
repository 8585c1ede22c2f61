"""What a fine-tune did to a model, measured on generated samples with fixed seeds.

A *judge* names what an image shows (for the toy world, ``sdtune.toy.judge``: shape, colour and
background). The metrics compare its verdicts with what each prompt asked for:

- subject fidelity: the share of subject prompts ("a xon triangle") that show the concept;
- context fidelity: the share of subject-in-context prompts ("a xon triangle on a black
  background") that show the concept *and* the asked context: the subject in new scenes, not a
  memorised training image;
- prior: the share of class prompts ("a red triangle on a white background") still drawn right.
  Reported as ``prior_preservation``, a ratio to the base model's own score on the same prompts
  and seeds, so an imperfect base still gives an honest figure;
- prior drift: the share of class samples that turned into the concept.

Every figure uses the same seeds for every model, so differences come from the weights alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from sdtune.sampling import generate

Verdict = object  # whatever the judge returns for one image (the toy judge: a Scene)


@dataclass(frozen=True)
class Probe:
    """A prompt and what a correct image of it must satisfy."""

    prompt: str
    check: Callable[[Verdict], bool]


@dataclass(frozen=True)
class ConceptSpec:
    """How to test one learned concept.

    Attributes:
        subject: prompts that name the concept alone; correct means "is the concept".
        context: prompts that put the concept in a scene; correct means concept and scene.
        prior: class prompts without the concept; correct means the scene asked for.
        is_concept: whether a verdict shows the concept (for prior drift).
    """

    subject: list[Probe]
    context: list[Probe]
    prior: list[Probe]
    is_concept: Callable[[Verdict], bool]


@dataclass
class SamplingSettings:
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    batch_size: int = 64
    seed: int = 0


def sample_probes(pipe, probes: Sequence[Probe], num_samples: int, settings: SamplingSettings,
                  progress: tqdm | None = None) -> list[tuple[Probe, object]]:
    """``num_samples`` images cycling through ``probes``; sample ``i`` uses seed ``settings.seed + i``.

    ``progress`` (a tqdm bar) advances by the images of each batch.
    """
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    chosen = [probes[i % len(probes)] for i in range(num_samples)]
    images = []
    for begin in range(0, num_samples, settings.batch_size):
        end = min(begin + settings.batch_size, num_samples)
        generators = [torch.Generator().manual_seed(settings.seed + i) for i in range(begin, end)]
        images += generate(pipe, [p.prompt for p in chosen[begin:end]], generators, size=(size, size),
                           num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale)
        if progress is not None:
            progress.update(end - begin)
    return list(zip(chosen, images))


def share(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class ConceptReport:
    subject_fidelity: float
    context_fidelity: float
    prior_correct: float
    prior_drift: float
    seconds: float
    samples: dict[str, list] = field(default_factory=dict, repr=False)  # kind -> images, for grids
    verdicts: dict[str, list] = field(default_factory=dict, repr=False)  # kind -> the judge's verdict per image

    def as_dict(self, base: "ConceptReport | None" = None) -> dict[str, float]:
        """The figures, with ``prior_preservation`` relative to ``base`` (1.0 for the base itself)."""
        reference = base.prior_correct if base is not None else self.prior_correct
        return {
            "subject_fidelity": round(self.subject_fidelity, 4),
            "context_fidelity": round(self.context_fidelity, 4),
            "prior_correct": round(self.prior_correct, 4),
            "prior_preservation": round(self.prior_correct / reference, 4) if reference else float("nan"),
            "prior_drift": round(self.prior_drift, 4),
        }


def evaluate_concept(pipe, judge: Callable[[list], list[Verdict]], spec: ConceptSpec, *, num_samples: int = 64,
                     settings: SamplingSettings | None = None, desc: str = "Judging") -> ConceptReport:
    """Score ``pipe`` on ``spec`` with ``num_samples`` images per figure.

    Args:
        pipe: A diffusers text-to-image pipeline (adapters or embeddings already loaded).
        judge: Images in, one verdict per image out.
        spec: The prompts and checks.
        num_samples: Images per figure (subject, context, prior); 64 or more for figures worth comparing.
        settings: Sampler settings, identical across the models compared.
        desc: The progress bar's label (minutes of sampling on a CPU: the user sees it move).
    """
    settings = settings or SamplingSettings()
    start = time.perf_counter()
    figures, samples, verdicts_of = {}, {}, {}
    progress = tqdm(total=3 * num_samples, desc=desc, unit="image", leave=False)
    for kind, probes in (("subject", spec.subject), ("context", spec.context), ("prior", spec.prior)):
        pairs = sample_probes(pipe, probes, num_samples, settings, progress)
        verdicts = judge([image for _, image in pairs])
        figures[kind] = share([probe.check(v) for (probe, _), v in zip(pairs, verdicts)])
        samples[kind] = [image for _, image in pairs]
        verdicts_of[kind] = verdicts
        if kind == "prior":
            figures["drift"] = share([spec.is_concept(v) for v in verdicts])
    progress.close()
    return ConceptReport(figures["subject"], figures["context"], figures["prior"], figures["drift"],
                         time.perf_counter() - start, samples, verdicts_of)


def attribute_accuracy(pipe, judge: Callable[[list], list], expected: Sequence, prompts: Sequence[str], *,
                       attributes: Sequence[str], settings: SamplingSettings | None = None,
                       desc: str = "Judging") -> dict[str, float]:
    """Share of samples whose verdict matches ``expected[i]`` on each attribute, and on all at once.

    ``prompts[i]`` is sampled with seed ``settings.seed + i``; verdicts and expectations are objects
    with the named ``attributes`` (the toy judge's Scene).
    """
    settings = settings or SamplingSettings()
    probes = [Probe(p, lambda v: True) for p in prompts]
    with tqdm(total=len(probes), desc=desc, unit="image", leave=False) as progress:
        images = [image for _, image in sample_probes(pipe, probes, len(probes), settings, progress)]
    verdicts = judge(images)
    rates = {a: share([getattr(v, a) == getattr(e, a) for v, e in zip(verdicts, expected)]) for a in attributes}
    rates["all"] = share([all(getattr(v, a) == getattr(e, a) for a in attributes) for v, e in zip(verdicts, expected)])
    return rates
