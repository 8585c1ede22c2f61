"""`sdtune demo`: teach the toy world's held-out concepts to the shipped base model with four methods,
load each result back through diffusers' own loaders, and measure what was learned and what was kept.

Concept A (a star, never seen in pretraining) is taught as "xon triangle" by DreamBooth-LoRA and by
full DreamBooth with and without prior preservation; concept B (a green square, a pairing never seen)
is taught to a new token by textual inversion. The judge scores fixed-seed samples of every model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from sdtune.evaluation import ConceptReport, ConceptSpec, Probe, SamplingSettings, attribute_accuracy, evaluate_concept
from sdtune.export import DIFFUSERS_LORA_FILE
from sdtune.sampling import make_grid
from sdtune.toy.base_model import BASE_DIR
from sdtune.toy.judge import load_judge
from sdtune.toy.world import BACKGROUNDS, COLORS, HELD_OUT_PAIR, HELD_OUT_SHAPE, Scene, pretraining_scenes, render_folder

logger = logging.getLogger(__name__)

# Concept A's instance images: one yellow star, shown on two backgrounds so that the caption's
# background words carry meaning; the third background is the new context it is asked in.
SUBJECT_COLOR = "yellow"
SUBJECT_BACKGROUNDS = ("gray", "white")
# DreamBooth's rare identifier + class noun. The identifier must be one token: with two (e.g. "sks"
# is "s" + "ks"), the background words move to positions the toy text encoder never saw in
# pretraining and even the base ignores them (background right 40% instead of 100%).
SUBJECT_WORDS = "xon triangle"
CLASS_SHAPE = "triangle"
TI_TOKEN = "<gsq>"
TI_COLOR, TI_SHAPE = HELD_OUT_PAIR


def concept_a_spec() -> ConceptSpec:
    """The star, asked as "xon triangle"; contexts are the backgrounds its training images never show."""
    new_backgrounds = [b for b in BACKGROUNDS if b not in SUBJECT_BACKGROUNDS]
    return ConceptSpec(
        subject=[Probe(f"a {SUBJECT_WORDS}", lambda v: v.shape == HELD_OUT_SHAPE)],
        context=[Probe(f"a {SUBJECT_WORDS} on a {b} background", lambda v, b=b: v.shape == HELD_OUT_SHAPE and v.background == b)
                 for b in new_backgrounds],
        prior=_class_probes(CLASS_SHAPE),
        is_concept=lambda v: v.shape == HELD_OUT_SHAPE,
    )


def concept_b_spec() -> ConceptSpec:
    """The green square, asked through the learned token alone and on each background."""
    def is_b(v):
        return v.shape == TI_SHAPE and v.color == TI_COLOR

    return ConceptSpec(
        subject=[Probe(f"a {TI_TOKEN}", is_b)],
        context=[Probe(f"a {TI_TOKEN} on a {b} background", lambda v, b=b: is_b(v) and v.background == b) for b in BACKGROUNDS],
        prior=_class_probes(TI_SHAPE, exclude_color=TI_COLOR),
        is_concept=is_b,
    )


def concept_spec(concept: str) -> ConceptSpec:
    """Concept ``a`` (DreamBooth's star) or ``b`` (textual inversion's green square)."""
    return {"a": concept_a_spec, "b": concept_b_spec}[concept]()


def _class_probes(shape: str, exclude_color: str | None = None) -> list[Probe]:
    """Class prompts over every colour and background ("a red triangle on a white background")."""
    scenes = [Scene(shape, c, b) for c in COLORS for b in BACKGROUNDS if c != exclude_color]
    return [Probe(s.caption(), lambda v, s=s: v == s) for s in scenes]


@dataclass(frozen=True)
class ConceptARecipe:
    """How one DreamBooth variant learns concept A: the options `sdtune sweep` (examples/toy_sweep.yaml) varies."""

    learning_rate: float
    max_train_steps: int
    text_encoder_lr: float | None  # None: the UNet's rate
    rank: int | None = None  # LoRA only
    prior_loss_weight: float = 1.0
    num_class_images: int = 60
    snr_gamma: float | None = None
    captions: str = "plain"  # plain ("a xon triangle") or background ("a xon triangle on a gray background")

    def options(self, data: dict[str, Path]) -> dict:
        """DreamBoothConfig options (the instance folder chosen by ``captions``)."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("rank", "captions")}
        if self.rank is not None:
            options.update(use_lora=True, rank=self.rank, lora_targets="attn_ff")
        return {**options, "instance_data_dir": str(data["a_backgrounds" if self.captions == "background" else "a"])}


@dataclass(frozen=True)
class DemoSettings:
    """The demo's recipes and sample counts; ``quick`` samples less."""

    num_samples: int = 96  # per figure (subject, context, prior)
    held_in_samples: int = 300
    instance_images: int = 8
    concept_b_images: int = 12
    # DreamBooth-LoRA: rank 8 on attention and feed-forward layers, with a text-encoder LoRA (lets the identifier
    # mean something apart from the class noun). Chosen by `sdtune sweep --config examples/toy_sweep.yaml` (trial 9 of
    # 24: subject 0.98, context 0.19, prior 0.98 on 48 samples); the hand-tuned recipe before it (lr 3e-3, 400 steps,
    # text-encoder lr 5e-4, prior weight 1, 60 class images, no min-SNR) kept 0.73 of the prior.
    lora: ConceptARecipe = ConceptARecipe(learning_rate=6.37e-3, max_train_steps=600, text_encoder_lr=3.13e-5, rank=8,
                                          prior_loss_weight=1.66, num_class_images=120, snr_gamma=5.0)
    # Full DreamBooth: chosen by `sdtune sweep --config examples/toy_sweep_full_dreambooth.yaml` (trial 0 of 12: subject
    # 0.83, context 0.00, prior 0.98 on 48 samples); before it, by hand, lr 2e-4 for 250 steps with the text encoder at
    # the UNet's rate, as diffusers' train_dreambooth.py, kept 0.73 of the prior. The no-prior row trains the same.
    dreambooth: ConceptARecipe = ConceptARecipe(learning_rate=4.48e-4, max_train_steps=150, text_encoder_lr=3.93e-4,
                                                prior_loss_weight=1.18)
    textual_inversion_steps: int = 400
    textual_inversion_learning_rate: float = 1e-2

    @classmethod
    def quick(cls) -> "DemoSettings":
        """The same training, judged on fewer samples (noisier figures, half the time)."""
        return cls(num_samples=32, held_in_samples=60)


def render_concept_data(folder: str | Path, settings: DemoSettings | None = None, seed: int = 0) -> dict[str, Path]:
    """The demo's training images: ``a`` (the star as "xon triangle"), ``a_backgrounds`` (the same images, captions
    naming their background: a lever the sweep tries for context fidelity) and ``b`` (the green square)."""
    settings, folder = settings or DemoSettings(), Path(folder)
    star = [Scene(HELD_OUT_SHAPE, SUBJECT_COLOR, b) for b in SUBJECT_BACKGROUNDS]
    return {
        "a": render_folder(folder / "concept_a", star, settings.instance_images, seed=seed, caption=f"a {SUBJECT_WORDS}"),
        "a_backgrounds": render_folder(folder / "concept_a_backgrounds", star, settings.instance_images, seed=seed,
                                       caption=f"a {SUBJECT_WORDS} on a {{background}} background"),
        "b": render_folder(folder / "concept_b", [Scene(TI_SHAPE, TI_COLOR, b) for b in BACKGROUNDS],
                           settings.concept_b_images, seed=seed + 1, caption=f"a {TI_TOKEN} on a {{background}} background"),
    }


METHODS = ("lora", "dreambooth", "dreambooth_no_prior", "textual_inversion")
CONCEPT_OF = {"lora": "a", "dreambooth": "a", "dreambooth_no_prior": "a", "textual_inversion": "b"}


class Demo:
    """The toy world's data, judge and base scores, and one fine-tune per method on top of them."""

    def __init__(self, output_dir: str | Path, *, base: str | Path = BASE_DIR, settings: DemoSettings | None = None,
                 seed: int = 0):
        self.output_dir = Path(output_dir)
        self.base = Path(base)
        self.settings = settings or DemoSettings()
        self.seed = seed
        self.judge = load_judge()
        self.sampling = SamplingSettings(seed=seed)
        self.specs = {c: concept_spec(c) for c in ("a", "b")}
        self.data = render_concept_data(self.output_dir / "data", self.settings, seed)
        self._base_reports: dict[str, ConceptReport] = {}

    @functools.cached_property
    def base_pipe(self) -> StableDiffusionPipeline:
        """The untouched base, loaded once for every base figure (fine-tunes load their own copy)."""
        return _pipeline(self.base)

    def evaluate(self, pipe, concept: str, who: str = "fine-tuned model") -> ConceptReport:
        return evaluate_concept(pipe, self.judge.classify, self.specs[concept], num_samples=self.settings.num_samples,
                                settings=self.sampling, desc=f"Judging the {who} on concept {concept.upper()}")

    def base_report(self, concept: str) -> ConceptReport:
        if concept not in self._base_reports:
            self._base_reports[concept] = self.evaluate(self.base_pipe, concept, who="base")
        return self._base_reports[concept]

    def held_in_accuracy(self) -> dict[str, float]:
        """The base's per-attribute accuracy on full captions of the pretraining scenes."""
        scenes = pretraining_scenes()
        expected = [scenes[i % len(scenes)] for i in range(self.settings.held_in_samples)]
        rates = attribute_accuracy(self.base_pipe, self.judge.classify, expected, [s.caption() for s in expected],
                                   attributes=("shape", "color", "background"), settings=self.sampling,
                                   desc="Judging the base on pretraining prompts")
        return {k: round(v, 4) for k, v in rates.items()}

    def train(self, name: str):
        """Fine-tune the base with method ``name``; returns sdtune's TrainResult."""
        from sdtune.api import train_dreambooth, train_textual_inversion
        from sdtune.config import DreamBoothConfig, TextualInversionConfig

        s, out = self.settings, str(self.output_dir / name)
        common = dict(pretrained_model_name_or_path=str(self.base), resolution=32, train_batch_size=4, seed=self.seed,
                      checkpointing_steps=0, report_to="none", mixed_precision="no", output_dir=out)
        concept_a = dict(common, train_text_encoder=True, save_precision="fp32")
        prior = dict(with_prior_preservation=True, class_data_dir=str(self.output_dir / "data" / "class_triangle"),
                     class_prompt=f"a {CLASS_SHAPE}")
        if name == "lora":
            return train_dreambooth(DreamBoothConfig(**concept_a, **prior, **s.lora.options(self.data)))
        if name == "dreambooth":
            return train_dreambooth(DreamBoothConfig(**concept_a, **prior, **s.dreambooth.options(self.data)))
        if name == "dreambooth_no_prior":
            options = {k: v for k, v in s.dreambooth.options(self.data).items() if k not in ("prior_loss_weight", "num_class_images")}
            return train_dreambooth(DreamBoothConfig(**concept_a, **options))
        if name == "textual_inversion":
            return train_textual_inversion(TextualInversionConfig(
                **common, instance_data_dir=str(self.data["b"]), placeholder_token=TI_TOKEN, initializer_token=TI_SHAPE,
                num_vectors=2, learning_rate=s.textual_inversion_learning_rate, max_train_steps=s.textual_inversion_steps))
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")

    def run_method(self, name: str) -> dict:
        """Train, load the result through diffusers, score it against the base, and draw its grid."""
        concept = CONCEPT_OF[name]
        _say(f"{name}: training on concept {concept.upper()} ...")
        start = time.perf_counter()
        result = self.train(name)
        seconds = time.perf_counter() - start
        base = self.base_report(concept)
        report = self.evaluate(_load_result(name, self.base, result.output_dir), concept)
        metrics = {"concept": concept, **report.as_dict(base=base), "steps": result.global_step,
                   "train_seconds": round(seconds, 1), "eval_seconds": round(report.seconds, 1)}
        _before_after(base, report, name, self.output_dir / f"{name}.png")
        _say(f"{name}: {result.global_step} steps in {seconds:.0f} s; {_summary(metrics, base.as_dict())}")
        return metrics


def run_demo(output_dir: str | Path = "sdtune-demo", *, quick: bool = False, seed: int = 0,
             base: str | Path = BASE_DIR, settings: DemoSettings | None = None) -> dict:
    """Run the four methods and write grids and ``metrics.json`` to ``output_dir``; return the metrics."""
    from sdtune.threads import set_torch_threads

    set_torch_threads()  # the judge's sampling runs before the first training sets them
    start = time.perf_counter()
    demo = Demo(output_dir, base=base, settings=settings or (DemoSettings.quick() if quick else DemoSettings()), seed=seed)
    _say(f"base model: {demo.base}; writing to {demo.output_dir.resolve()}")
    held_in = demo.held_in_accuracy()
    metrics: dict = {"base": {"held_in": held_in, **{f"concept_{c}": demo.base_report(c).as_dict() for c in ("a", "b")}}}
    _say(f"base: held-in prompts fully right {held_in['all']:.0%} (shape {held_in['shape']:.0%}, colour "
         f"{held_in['color']:.0%}, background {held_in['background']:.0%}); subject fidelity concept A "
         f"{metrics['base']['concept_a']['subject_fidelity']:.0%}, concept B {metrics['base']['concept_b']['subject_fidelity']:.0%}")
    for name in METHODS:
        metrics[name] = demo.run_method(name)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    (demo.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _print_table(metrics)
    _say(f"wrote {demo.output_dir / 'metrics.json'} and the grids {', '.join(f'{n}.png' for n in METHODS)} "
         f"in {metrics['seconds']:.0f} s")
    return metrics


def _print_table(metrics: dict) -> None:
    columns = ("subject_fidelity", "context_fidelity", "prior_preservation", "prior_drift")
    print(f"{'':22}{'concept':>8}" + "".join(f"{c:>20}" for c in columns))
    for name in ("base",) + METHODS:
        rows = [("a", metrics["base"]["concept_a"]), ("b", metrics["base"]["concept_b"])] if name == "base" else \
            [(metrics[name]["concept"], metrics[name])]
        for concept, row in rows:
            print(f"{name:22}{concept.upper():>8}" + "".join(f"{row[c]:>20.2f}" for c in columns))


def _pipeline(path: str | Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_result(name: str, base: str | Path, output: Path) -> StableDiffusionPipeline:
    """Each result through the loader its users call: load_lora_weights, from_pretrained, load_textual_inversion."""
    if name.startswith("dreambooth"):
        return _pipeline(output)
    pipe = _pipeline(base)
    if name == "lora":  # the file named: diffusers 0.34-0.36 cannot search a local folder offline
        pipe.load_lora_weights(output, weight_name=DIFFUSERS_LORA_FILE)
    else:
        pipe.load_textual_inversion(output)
    return pipe


def _summary(figures: dict, base: dict) -> str:
    return (f"subject fidelity {figures['subject_fidelity']:.0%} (base {base['subject_fidelity']:.0%}), "
            f"context fidelity {figures['context_fidelity']:.0%} (base {base['context_fidelity']:.0%}), "
            f"prior preservation {figures['prior_preservation']:.2f}, prior drift {figures['prior_drift']:.0%} "
            f"(base {base['prior_drift']:.0%})")


def _before_after(base: ConceptReport, tuned: ConceptReport, name: str, path: Path, per_row: int = 8) -> None:
    """Rows: subject, context, class prompts; the base's samples left, the fine-tuned model's right (same seeds)."""
    rows = []
    for kind in ("subject", "context", "prior"):
        rows += base.samples[kind][:per_row] + tuned.samples[kind][:per_row]
    grid = make_grid([im.resize((96, 96), Image.Resampling.NEAREST) for im in rows], columns=2 * per_row)
    canvas = Image.new("RGB", (grid.width, grid.height + 20), "white")
    canvas.paste(grid, (0, 20))
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 4), "base (same seeds)", fill="black")
    pen.text((grid.width // 2 + 4, 4), f"{name}   rows: subject / new context / class prompts", fill="black")
    canvas.save(path)


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)
