"""`sdtune sweep --config sweep.yaml`: let measured figures choose the recipe (Optuna).

A trial is one training run and one `sdtune eval` of its result, each in its own process (so a trial
can be an ``accelerate launch``, and a crash loses one trial, not the sweep). Optuna's study lives
in ``OUTPUT_DIR/study.db``: a killed sweep started again keeps its finished trials and reruns the
ones that were cut off. The sweep writes ``results.csv``, a plot (the Pareto front of two
objectives, or the objective against the trials) and ``best_recipe.yaml``, a recipe that
``--config`` of the trial's command accepts unchanged.

The sweep file::

    command: train-dreambooth             # the sdtune command each trial runs
    recipe: {...}                         # its options, shared by every trial
    space:                                # what varies: any option of the command
      learning_rate: {low: 1e-4, high: 1e-2, log: true}
      rank: {choices: [4, 8, 16]}
      captions:                           # a named choice that sets several options
        choices: {plain: {instance_data_dir: a/}, background: {instance_data_dir: b/}}
      method: {choices: {lora: {use_lora: true}, full: {use_lora: false}}}
      lora_lr: {option: learning_rate, low: 1e-3, high: 1e-2, log: true, when: {method: lora}}
    eval: {...}                           # `sdtune eval` options (the model is the trial's output)
    objectives: {subject_fidelity: maximize, prior_preservation: maximize}
    constraints: {prior_preservation: ">= 0.9"}

``{toy_base}`` and ``{toy_data}`` in string values name the shipped toy base and the demo's training
images (rendered into ``OUTPUT_DIR/data``), so the toy sweep runs offline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdtune.errors import ConfigError
from sdtune.options import check_type, option
from sdtune.sweep_space import check_constraints, check_space, suggest, violations

logger = logging.getLogger(__name__)

TRAIN_COMMANDS = ("train-lora", "train-dreambooth", "train-textual-inversion", "train-controlnet")
_FINISHED = ("COMPLETE", "PRUNED")
_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class SweepConfig:
    """`sdtune sweep`: Optuna over any training option, scored by `sdtune eval`."""

    command: str = option("train-lora", "The training command each trial runs.", choices=TRAIN_COMMANDS)
    recipe: dict = option({}, "The command's options every trial shares (YAML only).", yaml_only=True)
    space: dict = option({}, "What each trial varies: option -> {low, high[, log, step]} or {choices} (YAML only).",
                         yaml_only=True)
    eval: dict = option({}, "`sdtune eval` options that score each trial (YAML only).", yaml_only=True)
    objectives: dict = option({}, "metric -> maximize|minimize; two give a Pareto front (YAML only).", yaml_only=True)
    constraints: dict = option({}, "metric -> '>= value' or '<= value' a good recipe must meet (YAML only).",
                               yaml_only=True)
    n_trials: int = option(24, "Finished trials the sweep runs to (a restarted sweep counts the earlier ones).")
    parallel: int = option(1, "Trials at once; each gets an equal share of the CPU cores as threads.")
    launcher: str = option("", "How a trial's training starts, e.g. 'accelerate launch --num_processes 2' "
                               "(default: this Python, one process).")
    sampler: str = option("tpe", "Optuna sampler: tpe (one or several objectives, constraints) or random.",
                          choices=("tpe", "random"))
    startup_trials: int = option(8, "Random trials before TPE models the results (and before the pruner prunes).")
    prune_eval_steps: int = option(0, "Evaluate each trial every N training steps and stop the ones the median pruner "
                                      "finds behind (one objective only; 0: no pruning).")
    seed: int = option(0, "Seed of the sampler (the trials' own seed is the recipe's).")
    output_dir: str = option("sweep", "Where study.db, the trials, results.csv, the plot and best_recipe.yaml go.")

    method: typing.ClassVar[str] = "sweep"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_type(f, getattr(self, f.name))
        if not self.space:
            raise ConfigError("sweep: 'space' is empty; name the options to vary, e.g. learning_rate: {low: 1e-4, high: 1e-2}")
        if not self.objectives:
            raise ConfigError("sweep: 'objectives' is empty; e.g. objectives: {subject_fidelity: maximize}")
        for metric, direction in self.objectives.items():
            if direction not in ("maximize", "minimize"):
                raise ConfigError(f"sweep: objective {metric}: '{direction}' is not maximize or minimize")
        check_constraints(self.constraints)
        if self.prune_eval_steps and len(self.objectives) > 1:
            raise ConfigError("sweep: prune_eval_steps needs one objective (Optuna prunes single-objective studies only)")
        if self.n_trials <= 0 or self.parallel <= 0 or self.prune_eval_steps < 0:
            raise ConfigError("sweep: n_trials and parallel must be positive")
        check_space(self.space)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


# --- one trial ---------------------------------------------------------------------------------------------------------

class TrialRunner:
    """Runs a trial's training and evaluation as subprocesses and reads its figures."""

    def __init__(self, config: SweepConfig, placeholders: dict[str, str]):
        self.config = config
        self.out = Path(config.output_dir).resolve()
        self.placeholders = placeholders
        self.threads = max(1, _usable_cores() // config.parallel)

    def recipe(self, options: dict, trial_dir: Path) -> dict:
        recipe = {**self.config.recipe, **options, "output_dir": str(trial_dir / "model")}
        return fill(recipe, {**self.placeholders, "trial_dir": str(trial_dir)})

    def eval_options(self) -> dict:
        """The sweep's eval section, with one reference cache that every trial (and the first sampling) shares."""
        return {**fill(self.config.eval, self.placeholders), "cache_dir": str(self.out / "reference-cache")}

    def run(self, number: int, options: dict, trial=None) -> dict[str, float]:
        """Train and evaluate one trial; with ``prune_eval_steps``, ``trial`` hears the figures as training goes
        and may stop it (optuna.TrialPruned)."""
        from sdtune.evaluate import trained_model_options

        trial_dir = self.out / f"trial-{number:03d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        recipe = self.recipe(options, trial_dir)
        eval_options = self.eval_options()
        if self.config.prune_eval_steps:
            (trial_dir / "eval-during-training.yaml").write_text(yaml.safe_dump(eval_options, sort_keys=False))
            recipe.update(eval_steps=self.config.prune_eval_steps, eval_config=str(trial_dir / "eval-during-training.yaml"))
        (trial_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        start = time.perf_counter()
        launcher = shlex.split(self.config.launcher) if self.config.launcher else None
        reported: set[int] = set()
        watch = (lambda: _report_progress(trial, Path(recipe["output_dir"]), next(iter(self.config.objectives)), reported)) \
            if trial is not None and self.config.prune_eval_steps else None
        self._sdtune(launcher, [self.config.command, "--config", str(trial_dir / "recipe.yaml"),
                                "--overwrite_output_dir", "true"], trial_dir / "train.log", watch)
        train_seconds = time.perf_counter() - start
        eval_config = {"pretrained_model_name_or_path": recipe["pretrained_model_name_or_path"], **eval_options,
                       **trained_model_options(Path(recipe["output_dir"]), recipe["pretrained_model_name_or_path"]),
                       "output_dir": str(trial_dir / "eval")}
        (trial_dir / "eval.yaml").write_text(yaml.safe_dump(eval_config, sort_keys=False))
        self._sdtune(None, ["eval", "--config", str(trial_dir / "eval.yaml")], trial_dir / "eval.log")
        metrics = json.loads((trial_dir / "eval" / "metrics.json").read_text())
        return {**metrics, "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(time.perf_counter() - start - train_seconds, 1)}

    def _sdtune(self, launcher: list[str] | None, args: list[str], log: Path, watch=None) -> None:
        """Run an sdtune command to its end; ``watch()`` is called every few seconds meanwhile and may raise to stop it."""
        command = [*launcher, "-m", "sdtune", *args] if launcher else [sys.executable, "-m", "sdtune", *args]
        env = dict(os.environ)
        if not launcher:  # a launched group of processes divides the cores itself (sdtune.threads)
            env["OMP_NUM_THREADS"] = str(self.threads)
        with log.open("w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
            try:
                while process.poll() is None:
                    time.sleep(_POLL_SECONDS)
                    if watch is not None:
                        watch()
            except BaseException:
                process.terminate()
                process.wait()
                raise
        if process.returncode != 0:
            last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["(no output)"]
            raise TrialFailed(f"{args[0]} exited with {process.returncode}: {last[0][:200]} (see {log})")


def _report_progress(trial, model_dir: Path, metric: str, reported: set[int]) -> None:
    """Report the training run's new --eval_steps figures to Optuna; stop the trial if the pruner says so."""
    import optuna

    from sdtune.training_eval import read_history

    for row in read_history(model_dir):
        if row["step"] in reported or metric not in row:
            continue
        trial.report(row[metric], row["step"])
        reported.add(row["step"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {row[metric]:.3f} at step {row['step']}")


class TrialFailed(Exception):
    """A trial's training or evaluation process failed; the sweep records it and goes on."""


def fill(value: Any, placeholders: dict[str, str]) -> Any:
    """``{toy_base}``-style placeholders replaced in every string of a nested value."""
    if isinstance(value, str):
        for key, text in placeholders.items():
            value = value.replace("{" + key + "}", text)
        return value
    if isinstance(value, dict):
        return {k: fill(v, placeholders) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, placeholders) for v in value]
    return value


def _usable_cores() -> int:
    from sdtune.threads import usable_cores

    return usable_cores()


# --- the study ---------------------------------------------------------------------------------------------------------

def run_sweep(config: SweepConfig) -> dict:
    """Run (or continue) the sweep; returns the best trial's parameters, figures and recipe path."""
    optuna = _import_optuna()
    out = Path(config.output_dir).resolve()  # trial recipes and best_recipe.yaml hold absolute paths: they run from anywhere
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    runner = TrialRunner(config, placeholders(config, out))
    _prepare_reference(config, runner)
    study = _study(optuna, config, out)
    _rerun_interrupted(optuna, study)
    remaining = config.n_trials - sum(t.state.name in _FINISHED for t in study.trials)
    objectives = list(config.objectives)
    figures = reported_figures(config)

    def objective(trial):
        _, options = suggest(trial, config.space)
        try:
            metrics = runner.run(trial.number, options, trial)
        except TrialFailed as err:
            logger.warning("trial %d failed: %s", trial.number, err)
            raise
        for name, value in metrics.items():
            trial.set_user_attr(name, value)
        missing = [m for m in figures if m not in metrics]
        if missing:
            raise TrialFailed(f"the evaluation gave no {', '.join(missing)}; add the metric to eval.metrics")
        for metric, violation in violations(metrics, config.constraints).items():
            trial.set_constraint(metric, violation)  # the sampler steers towards recipes that meet them
        logger.info("trial %d: %s", trial.number, ", ".join(f"{m} {metrics[m]:.3f}" for m in figures))
        values = [metrics[m] for m in objectives]
        return values[0] if len(values) == 1 else values

    while remaining > 0:  # failed trials do not count: run until n_trials finished, or a round finishes none
        logger.info("sweep: %d trial(s) to run, %d at once, %d thread(s) each; study in %s", remaining, config.parallel,
                    runner.threads, out / "study.db")
        study.optimize(objective, n_trials=remaining, n_jobs=config.parallel, catch=(TrialFailed,))
        left = config.n_trials - sum(t.state.name in _FINISHED for t in study.trials)
        if left == remaining:
            logger.warning("sweep: all %d trial(s) of this round failed; stopping (see their train.log and eval.log)", remaining)
            break
        remaining = left
    from sdtune.sweep_report import report

    return report(study, config, runner, out)


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("sdtune sweep needs Optuna: pip install 'sdtune[eval]'") from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE's `group` (needed for a conditional space) is marked experimental; the notice is not the user's to act on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _study(optuna, config: SweepConfig, out: Path):
    directions = list(config.objectives.values())
    if config.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=config.seed)
    else:  # group: the space is conditional (LoRA's parameters only where the method is LoRA)
        sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.startup_trials,
                                             multivariate=True, group=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    pruner = optuna.pruners.MedianPruner(n_startup_trials=config.startup_trials) if config.prune_eval_steps else None
    return optuna.create_study(study_name="sdtune-sweep", storage=storage, sampler=sampler, pruner=pruner,
                               load_if_exists=True, directions=directions)


def _rerun_interrupted(optuna, study) -> None:
    """Trials a killed sweep left RUNNING are marked failed and queued again with the same parameters."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        logger.info("trial %d was cut off; queued again with the same parameters", trial.number)


def _prepare_reference(config: SweepConfig, runner: TrialRunner) -> None:
    """Sample the reference model once, before the trials that share its cached figures start side by side."""
    from sdtune.command_configs import EvalConfig
    from sdtune.evaluate import Evaluator, reference_identity, reference_pipeline
    from sdtune.options import build_config

    options = {"pretrained_model_name_or_path": runner.recipe({}, runner.out / "reference")["pretrained_model_name_or_path"],
               **runner.eval_options(),
               "output_dir": str(runner.out / "reference")}
    eval_config = build_config(EvalConfig, options, source="key in the sweep's eval section")
    Evaluator(eval_config).reference(lambda: reference_pipeline(eval_config), reference_identity(eval_config))


def placeholders(config: SweepConfig, out: Path) -> dict[str, str]:
    """``{toy_base}`` and ``{toy_data}``, rendered only when the sweep file uses them."""
    text = json.dumps([config.recipe, config.space, config.eval])
    values = {"output_dir": str(out)}
    if "{toy_base}" in text:
        from sdtune.toy.base_model import BASE_DIR

        values["toy_base"] = str(BASE_DIR)
    if "{toy_data}" in text:
        from sdtune.toy.demo import render_concept_data

        values["toy_data"] = str(render_concept_data(out / "data")["a"].parent)
    return values


def reported_figures(config: SweepConfig) -> list[str]:
    """The objectives, then the constrained metrics that are not objectives."""
    return [*config.objectives, *(m for m in config.constraints if m not in config.objectives)]
