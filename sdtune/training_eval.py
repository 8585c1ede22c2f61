"""`--eval_steps N`: measure the model being trained as `sdtune eval` does, every N steps.

The figures go to the tracker (``eval/<metric>``) and to ``OUTPUT_DIR/eval/history.jsonl``, one line
per evaluation, so a user (or `sdtune sweep`, to prune a trial) sees fidelity climb and drift begin.
The reference model's samples are taken before the first step, when the model still is the base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdtune.config import TrainConfig

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"


def eval_config_for(config: TrainConfig):
    """The EvalConfig of a training run: its base, prompts, images and class prompt, then --eval_config's keys."""
    from sdtune.command_configs import EvalConfig
    from sdtune.options import build_config, load_recipe

    values = {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "revision": config.revision, "variant": config.variant, "seed": config.seed,
        "metrics": config.eval_metrics, "output_dir": str(Path(config.output_dir) / "eval"),
        "prompt": config.validation_prompt, "instance_data_dir": config.instance_data_dir or config.train_data_dir,
        "class_prompt": getattr(config, "class_prompt", None),
        "num_inference_steps": config.validation_inference_steps,
    }
    if config.eval_config:
        extra = load_recipe(config.eval_config)
        if "prompts" in extra:
            values["prompt"] = None  # a prompts file replaces the validation prompt
        values.update(extra)
    return build_config(EvalConfig, values, source=f"key in --eval_config {config.eval_config}" if config.eval_config
                        else "option")


class TrainingEvaluator:
    """Scores the training pipeline; the first call (before training) samples the reference."""

    def __init__(self, config: TrainConfig):
        from sdtune.evaluate import Evaluator

        self.eval_config = eval_config_for(config)
        self.evaluator = Evaluator(self.eval_config)
        self.folder = Path(self.eval_config.output_dir)
        self.reference = None

    def set_reference(self, pipe_now) -> None:
        """Before the first step the model is the base: sample the reference from it (or read the cache)."""
        from sdtune.evaluate import reference_identity, reference_pipeline

        load = pipe_now if pipe_now is not None else (lambda: reference_pipeline(self.eval_config))
        self.reference = self.evaluator.reference(load, reference_identity(self.eval_config))

    def measure(self, pipe, step: int) -> dict[str, float]:
        from sdtune.eval_report import write_measurement

        if self.reference is None:  # resumed without a cached reference: load the base for it
            self.set_reference(None)
        measurement = self.evaluator.measure(pipe, self.reference)
        write_measurement(measurement, self.folder / f"step-{step}", f"step {step}", images=False)
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / HISTORY_FILE).open("a") as f:
            f.write(json.dumps({"step": step, **measurement.metrics}) + "\n")
        logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in measurement.metrics.items()))
        return measurement.metrics


def read_history(output_dir: str | Path) -> list[dict]:
    """The evaluations a run has logged so far (complete lines only: the file may be being written)."""
    path = Path(output_dir) / "eval" / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
