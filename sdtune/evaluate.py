"""`sdtune eval`: sample a fine-tune on fixed seeds and measure what it learned and what it kept.

Metrics (``--metrics``):
- ``clip_t``: prompt-image cosine of CLIP's embeddings, averaged over the samples;
- ``clip_i`` and ``dino``: mean cosine between the samples and the training images (CLIP, DINO features);
- ``fid`` and ``kid``: distance of the samples from a reference image set (torchmetrics), on Inception
  features by default, or CLIP/DINO/the toy judge's (which are not comparable with published FIDs);
- ``prior_drift``: 1 - mean cosine between the fine-tune's and the reference model's images of the class
  prompt with the same seeds (0: the class is drawn as before);
- ``toy``: the toy world's judge figures (``sdtune.evaluation``), for fine-tunes of the toy base.

The reference model (the base without the LoRA or embeddings, or ``--reference_model``) is sampled
once; its samples' features are cached, so evaluating every checkpoint of a run samples it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdtune.command_configs import EvalConfig
from sdtune.errors import ConfigError
from sdtune.sampling import generate

logger = logging.getLogger(__name__)

_PROMPT_METRICS = ("clip_t", "clip_i", "dino", "fid", "kid")
_FIGURE_COLUMNS = ("clip_t", "clip_i", "dino", *(f"{m}{space}" for m in ("fid", "kid") for space in ("", "_dino", "_clip", "_judge")),
                   "prior_drift", "subject_fidelity", "context_fidelity",
                   "prior_preservation", "toy_prior_drift")


@dataclass
class Measurement:
    """The figures of one model, and the samples they came from (for the grid)."""

    metrics: dict[str, float]
    samples: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)
    labels: dict[str, list[str]] = field(default_factory=dict, repr=False)  # the judge's verdict per toy sample


@dataclass
class Reference:
    """What the reference model drew: its class samples' features and its toy prior score."""

    class_features: torch.Tensor | None = None
    toy_prior_correct: float | None = None


class Evaluator:
    """Samples a pipeline on fixed seeds and scores the samples; feature models and image sets load once."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.metrics = config.metric_names()
        _check_inputs(config, self.metrics)
        self.prompts = _read_prompts(config) if any(m in self.metrics for m in _PROMPT_METRICS) else []
        self._features: dict[str, object] = {}
        self._image_sets: dict[str, torch.Tensor] = {}
        self._judge = None  # the toy judge, for the toy metric

    # --- feature models --------------------------------------------------------------------------------------------
    def features(self, kind: str):
        from sdtune.image_metrics import load_features

        if kind not in self._features:
            model = {"clip": self.config.clip_model, "dino": self.config.dino_model}.get(kind)
            self._features[kind] = load_features(kind, model)
        return self._features[kind]

    def _folder_features(self, kind: str, folder: str, option: str) -> torch.Tensor:
        key = f"{kind}:{folder}"
        if key not in self._image_sets:
            self._image_sets[key] = self.features(kind).images(read_folder_images(folder, option))
        return self._image_sets[key]

    # --- sampling --------------------------------------------------------------------------------------------------
    def sample(self, pipe, prompts: list[str]) -> list[Image.Image]:
        """``num_images`` per prompt; image ``i`` of every prompt uses seed ``seed + i`` (the same for every model)."""
        config, size = self.config, _pipeline_size(pipe)
        jobs = [(prompt, config.seed + i) for prompt in prompts for i in range(config.num_images)]
        images: list[Image.Image] = []
        for begin in range(0, len(jobs), config.batch_size):
            batch = jobs[begin:begin + config.batch_size]
            generators = [torch.Generator().manual_seed(seed) for _, seed in batch]
            images += generate(pipe, [prompt for prompt, _ in batch], generators, size=size,
                               num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                               negative_prompt=config.negative_prompt)
        return images

    # --- the reference model ---------------------------------------------------------------------------------------
    def reference(self, load_reference: Callable[[], object], identity: str) -> Reference:
        """The reference model's class features and toy prior score, from the cache when this setting was seen."""
        needs_class = "prior_drift" in self.metrics
        needs_toy = "toy" in self.metrics
        if not (needs_class or needs_toy):
            return Reference()
        cache = Path(self.config.cache_dir or Path(self.config.output_dir) / "reference-cache") / self._reference_key(identity)
        if (cache / "reference.json").is_file():
            saved = json.loads((cache / "reference.json").read_text())
            tensors = load_file(str(cache / "features.safetensors")) if (cache / "features.safetensors").is_file() else {}
            logger.info("reference model's figures from %s", cache)
            return Reference(tensors.get("class_features"), saved.get("toy_prior_correct"))
        logger.info("sampling the reference model %s", identity)
        pipe = load_reference()
        reference = Reference()
        if needs_class:
            reference.class_features = self.features(self.config.drift_features).images(
                self.sample(pipe, [self.config.class_prompt]))
        if needs_toy:
            reference.toy_prior_correct = self._toy_report(pipe).prior_correct
        cache.mkdir(parents=True, exist_ok=True)
        if reference.class_features is not None:
            save_file({"class_features": reference.class_features.contiguous()}, str(cache / "features.safetensors"))
        (cache / "reference.json").write_text(json.dumps({"identity": identity, "toy_prior_correct": reference.toy_prior_correct}))
        return reference

    def _reference_key(self, identity: str) -> str:
        """What the reference's figures depend on: the model and the sampling and feature settings."""
        c = self.config
        settings = [identity, c.class_prompt, c.num_images, c.seed, c.scheduler, c.num_inference_steps, c.guidance_scale,
                    c.negative_prompt, c.drift_features, c.dino_model, c.clip_model, c.toy_concept, c.toy_samples,
                    "prior_drift" in self.metrics, "toy" in self.metrics]
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]

    # --- measuring -------------------------------------------------------------------------------------------------
    def measure(self, pipe, reference: Reference) -> Measurement:
        config, figures = self.config, {}
        out = Measurement(figures)
        if self.prompts:
            images = self.sample(pipe, self.prompts)
            out.samples["prompts"] = images
            figures.update(self._prompt_figures(images))
        if "prior_drift" in self.metrics:
            from sdtune.image_metrics import mean_paired_cosine

            images = self.sample(pipe, [config.class_prompt])
            out.samples["class"] = images
            features = self.features(config.drift_features).images(images)
            figures["prior_drift"] = 1.0 - mean_paired_cosine(features, reference.class_features)
        if "toy" in self.metrics:
            report = self._toy_report(pipe)
            figures.update({f"toy_{k}" if k == "prior_drift" else k: v for k, v in _toy_figures(report, reference).items()})
            for kind in ("subject", "context", "prior"):
                out.samples[f"toy {kind}"] = report.samples[kind]
                out.labels[f"toy {kind}"] = [_verdict_text(v) for v in report.verdicts[kind]]
        out.metrics = {k: round(float(v), 6) for k, v in figures.items()}
        return out

    def _prompt_figures(self, images: list[Image.Image]) -> dict[str, float]:
        from sdtune.image_metrics import frechet_distance, kernel_inception_distance, mean_cross_cosine, mean_paired_cosine

        config, figures = self.config, {}
        if "clip_t" in self.metrics or "clip_i" in self.metrics:
            clip = self.features("clip")
            image_features = clip.images(images)
            if "clip_t" in self.metrics:
                texts = [prompt for prompt in self.prompts for _ in range(config.num_images)]
                figures["clip_t"] = mean_paired_cosine(image_features, clip.texts(texts))
            if "clip_i" in self.metrics:
                figures["clip_i"] = mean_cross_cosine(
                    image_features, self._folder_features("clip", config.instance_data_dir, "--instance_data_dir"))
        if "dino" in self.metrics:
            figures["dino"] = mean_cross_cosine(
                self.features("dino").images(images), self._folder_features("dino", config.instance_data_dir,
                                                                             "--instance_data_dir"))
        if "fid" in self.metrics or "kid" in self.metrics:
            folder = config.reference_dir or config.instance_data_dir
            option = "--reference_dir" if config.reference_dir else "--instance_data_dir"
            real = self._folder_features(config.fid_features, folder, option)
            fake = self.features(config.fid_features).images(images)
            # named by their feature space unless it is the standard one: a DINO FID is not comparable with an Inception FID
            space = "" if config.fid_features == "inception" else f"_{config.fid_features}"
            if "fid" in self.metrics:
                figures[f"fid{space}"] = frechet_distance(real, fake)
            if "kid" in self.metrics:
                figures[f"kid{space}"], figures[f"kid{space}_std"] = kernel_inception_distance(real, fake)
        return figures

    def _toy_report(self, pipe):
        from sdtune.evaluation import SamplingSettings, evaluate_concept
        from sdtune.toy.demo import concept_spec
        from sdtune.toy.judge import load_judge

        settings = SamplingSettings(num_inference_steps=self.config.num_inference_steps,
                                    guidance_scale=self.config.guidance_scale, batch_size=self.config.batch_size,
                                    seed=self.config.seed)
        if self._judge is None:
            self._judge = load_judge()
        return evaluate_concept(pipe, self._judge.classify,
                                concept_spec(self.config.toy_concept), num_samples=self.config.toy_samples,
                                settings=settings, desc=f"Judging concept {self.config.toy_concept.upper()}")


# --- running `sdtune eval` ---------------------------------------------------------------------------------------------

def run_eval(config: EvalConfig) -> dict:
    """Measure the model (or every checkpoint of ``--checkpoints``); write metrics, images, grid (and plot)."""
    from sdtune.eval_report import print_table, write_measurement
    from sdtune.threads import set_torch_threads

    set_torch_threads()
    evaluator = Evaluator(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = evaluator.reference(lambda: reference_pipeline(config), reference_identity(config))
    if config.checkpoints:
        return _eval_checkpoints(config, evaluator, reference, out)
    measurement = evaluator.measure(_pipeline(config), reference)
    write_measurement(measurement, out, "model")
    (out / "metrics.json").write_text(json.dumps(measurement.metrics, indent=2))
    print_table([("model", measurement.metrics)])
    return measurement.metrics


def _eval_checkpoints(config: EvalConfig, evaluator: Evaluator, reference: Reference, out: Path) -> dict:
    from sdtune.eval_report import plot_by_step, print_table, write_csv, write_measurement
    from sdtune.run_identity import CHECKPOINT_PATTERN, list_checkpoints

    run = Path(config.checkpoints)
    if not run.is_dir():
        raise ConfigError(f"--checkpoints {run}: no such folder (pass a training run's --output_dir)")
    targets = [(int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)), p) for p in list_checkpoints(run)]
    final_step = _final_step(run)
    if final_step is not None and all(step != final_step for step, _ in targets):
        targets.append((final_step, run))
    if not targets:
        raise ConfigError(f"--checkpoints {run}: no checkpoint-N folder and no finished output in it")
    rows = []
    for step, folder in targets:
        logger.info("evaluating step %d (%s)", step, folder)
        measurement = evaluator.measure(_trained_pipeline(config, folder), reference)
        write_measurement(measurement, out / f"step-{step}", f"step {step}")
        rows.append({"step": step, **measurement.metrics})
    (out / "metrics_by_step.json").write_text(json.dumps(rows, indent=2))
    write_csv(rows, out / "metrics_by_step.csv")
    plot_by_step(rows, out / "metrics_by_step.png")
    print_table([(f"step {row['step']}", row) for row in rows])
    return {"steps": rows}


def _pipeline(config: EvalConfig):
    from sdtune.sampling import load_pipeline

    pipe = load_pipeline(config).pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_pipeline(config: EvalConfig):
    base = config.reference_model or config.pretrained_model_name_or_path
    return _pipeline(dataclasses.replace(config, pretrained_model_name_or_path=base, lora=None, embedding=None,
                                         single_file_config=None if config.reference_model else config.single_file_config))


def reference_identity(config: EvalConfig) -> str:
    path = config.reference_model or config.pretrained_model_name_or_path
    resolved = Path(path).resolve() if path and Path(path).exists() else path
    return f"{resolved}@{config.revision or ''}"


def trained_model_options(folder: Path, base: str) -> dict:
    """The eval options that load a training output folder on its base: a LoRA, embeddings or a whole pipeline."""
    from sdtune.export import DIFFUSERS_LORA_FILE, LEARNED_EMBEDS_FILE

    if (folder / DIFFUSERS_LORA_FILE).is_file():
        return {"lora": str(folder)}
    if (folder / LEARNED_EMBEDS_FILE).is_file():
        return {"embedding": str(folder)}
    if (folder / "model_index.json").is_file():  # a DreamBooth output: a whole pipeline; the base is the reference
        return {"pretrained_model_name_or_path": str(folder), "reference_model": base, "single_file_config": None}
    raise ConfigError(f"{folder} holds no LoRA, embeddings or pipeline to evaluate "
                      "(ControlNet outputs are not evaluated yet)")


def _trained_pipeline(config: EvalConfig, folder: Path):
    """The pipeline of one checkpoint (or the run's final output): LoRA, embeddings, or a UNet/text encoder swap."""
    if (folder / "unet").is_dir() and not (folder / "model_index.json").is_file():  # a DreamBooth checkpoint's parts
        pipe = _pipeline(config)
        pipe.unet = type(pipe.unet).from_pretrained(folder / "unet").to(pipe.device)
        for name in ("text_encoder", "text_encoder_2"):
            if (folder / name).is_dir():
                setattr(pipe, name, type(getattr(pipe, name)).from_pretrained(folder / name).to(pipe.device))
        return pipe
    options = trained_model_options(folder, config.pretrained_model_name_or_path)
    options.pop("reference_model", None)
    return _pipeline(dataclasses.replace(config, **options))


def _final_step(run: Path) -> int | None:
    """The step of the run's finished output (its recorded max_train_steps), None when the run has none."""
    import yaml

    from sdtune.export import DIFFUSERS_LORA_FILE, LEARNED_EMBEDS_FILE
    from sdtune.loop import CONFIG_FILE

    record = run / CONFIG_FILE
    finished = any((run / name).is_file() for name in (DIFFUSERS_LORA_FILE, LEARNED_EMBEDS_FILE, "model_index.json"))
    if not (finished and record.is_file()):
        return None
    return (yaml.safe_load(record.read_text()) or {}).get("max_train_steps")


# --- reading inputs ----------------------------------------------------------------------------------------------------

def _check_inputs(config: EvalConfig, metrics: list[str]) -> None:
    if not metrics:
        raise ConfigError("nothing to measure: pass --prompts (clip_t), --instance_data_dir (clip_i, dino), "
                          "--reference_dir (fid, kid), --class_prompt (prior_drift) or --toy_concept (toy)")
    if not config.pretrained_model_name_or_path:
        raise ConfigError("--pretrained_model_name_or_path is required (the base model, or the fine-tuned folder)")
    needs = {
        "clip_t": (config.prompts or config.prompt, "--prompts FILE or --prompt"),
        "clip_i": (config.instance_data_dir, "--instance_data_dir"),
        "dino": (config.instance_data_dir, "--instance_data_dir"),
        "fid": (config.reference_dir or config.instance_data_dir, "--reference_dir"),
        "kid": (config.reference_dir or config.instance_data_dir, "--reference_dir"),
        "prior_drift": (config.class_prompt, "--class_prompt"),
        "toy": (config.toy_concept, "--toy_concept a|b"),
    }
    for metric in metrics:
        given, option = needs[metric]
        if not given:
            raise ConfigError(f"--metrics {metric} needs {option}")
    if any(m in metrics for m in ("clip_i", "dino", "fid", "kid")) and not (config.prompts or config.prompt):
        raise ConfigError("--metrics clip_i, dino, fid and kid score samples of --prompts FILE (or --prompt); pass one")


def _read_prompts(config: EvalConfig) -> list[str]:
    from sdtune.sampling import read_prompts_file

    return [config.prompt] if config.prompt else read_prompts_file(config.prompts, "--prompts")


def read_folder_images(folder: str, option: str) -> list[Image.Image]:
    """Every readable image under ``folder`` (unreadable ones are logged and skipped)."""
    from sdtune.data.images import IMAGE_EXTENSIONS, BadImage, open_rgb

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{option} {path}: no such folder")
    images = []
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            images.append(open_rgb(file.read_bytes(), str(file)))
        except BadImage as err:
            logger.warning("skipping %s: %s", file, err)
    if not images:
        raise ConfigError(f"{option} {path} holds no image ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    return images


def _pipeline_size(pipe) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


# --- figures out -------------------------------------------------------------------------------------------------------

def _toy_figures(report, reference: Reference) -> dict[str, float]:
    base = reference.toy_prior_correct
    return {"subject_fidelity": report.subject_fidelity, "context_fidelity": report.context_fidelity,
            "prior_preservation": report.prior_correct / base if base else float("nan"),
            "prior_drift": report.prior_drift}


def _verdict_text(verdict) -> str:
    return " ".join(str(getattr(verdict, name)) for name in ("color", "shape", "background") if hasattr(verdict, name))
