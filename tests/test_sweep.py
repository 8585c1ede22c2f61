"""`sdtune sweep`: the search space, constraint-aware choice of the best trial, resuming a killed sweep, pruning, and
(slow) the toy sweep end to end with its best recipe trained unchanged."""

import json
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from sdtune.cli import main
from sdtune.errors import ConfigError
from sdtune.sweep import SweepConfig, TrialRunner, _report_progress, run_sweep
from sdtune.sweep_space import suggest
from sdtune.sweep_report import best_trial

TOY_SWEEP = Path(__file__).resolve().parents[1] / "examples" / "toy_sweep.yaml"


def toy_sweep_file() -> dict:
    return yaml.safe_load(TOY_SWEEP.read_text())


def test_conditional_space_and_named_choices():
    space = toy_sweep_file()["space"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize"])
    methods = set()
    for _ in range(24):
        chosen, options = suggest(study.ask(), space)
        methods.add(chosen["method"])
        if chosen["method"] == "lora":
            assert options["use_lora"] is True and options["rank"] in (4, 8, 16)
            assert 1e-3 <= options["learning_rate"] <= 1e-2 and options["max_train_steps"] in range(200, 601, 100)
            assert "full_learning_rate" not in chosen
        else:
            assert options["use_lora"] is False and "rank" not in options and "lora_learning_rate" not in chosen
            assert 5e-5 <= options["learning_rate"] <= 5e-4 and options["max_train_steps"] in range(150, 401, 50)
        assert options["instance_data_dir"] in ("{toy_data}/concept_a", "{toy_data}/concept_a_backgrounds")
        assert "method" not in options and "captions" not in options  # named choices set options, not themselves
    assert methods == {"lora", "full"}


def test_a_condition_is_judged_after_the_parameter_it_names_whatever_the_file_order():
    # yaml.safe_dump sorts keys: full_learning_rate and lora_steps then come before method
    space = yaml.safe_load(yaml.safe_dump(toy_sweep_file()["space"]))
    assert list(space).index("lora_steps") < list(space).index("method")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize"])
    for _ in range(8):
        chosen, options = suggest(study.ask(), space)
        assert {"learning_rate", "max_train_steps"} <= set(options), chosen


def _study_with(results: list[tuple[float, float]]):
    study = optuna.create_study(directions=["maximize", "maximize"])
    for subject, prior in results:
        trial = study.ask()
        trial.set_user_attr("subject_fidelity", subject)
        trial.set_user_attr("prior_preservation", prior)
        study.tell(trial, [subject, prior])
    return study


def test_best_trial_meets_the_constraints_then_balances_the_objectives():
    config = SweepConfig(space={"x": {"low": 0.0, "high": 1.0}},
                         objectives={"subject_fidelity": "maximize", "prior_preservation": "maximize"},
                         constraints={"prior_preservation": ">= 0.9"})
    study = _study_with([(0.95, 0.80), (0.60, 0.95), (0.50, 0.99)])
    assert best_trial(study, config).number == 1  # 0 misses the constraint; 1 has the best mean of the others
    nothing_feasible = _study_with([(0.95, 0.70), (0.40, 0.88)])
    assert best_trial(nothing_feasible, config).number == 1  # the one that misses it least


def fake_sweep(tmp_path, n_trials: int) -> SweepConfig:
    return SweepConfig(
        command="train-lora", recipe={"pretrained_model_name_or_path": "base", "resolution": 32},
        space={"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "rank": {"choices": [4, 8]}},
        eval={"metrics": "clip_t", "prompt": "a photo"}, objectives={"clip_t": "maximize"},
        n_trials=n_trials, startup_trials=2, output_dir=str(tmp_path / "sweep"))


def test_a_killed_sweep_continues_without_redoing_finished_trials(tmp_path, monkeypatch):
    calls = []

    def fake_run(self, number, options, trial=None):  # a trial's score, without training
        calls.append((number, dict(options)))
        return {"clip_t": options["learning_rate"] * 10 + options["rank"] / 100}

    monkeypatch.setattr(TrialRunner, "run", fake_run)
    first = run_sweep(fake_sweep(tmp_path, 3))
    assert len(calls) == 3
    out = tmp_path / "sweep"
    rows_before = (out / "results.csv").read_text().splitlines()[1:]

    # a sweep killed mid-trial leaves that trial RUNNING in the study
    study = optuna.load_study(study_name="sdtune-sweep", storage=f"sqlite:///{out / 'study.db'}")
    cut = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "rank": optuna.distributions.CategoricalDistribution([4, 8])})
    del study

    calls.clear()
    run_sweep(fake_sweep(tmp_path, 4))
    assert [options for _, options in calls] == [cut.params]  # only the cut-off trial ran again, same parameters
    rows_after = (out / "results.csv").read_text().splitlines()[1:]
    assert rows_after[:3] == rows_before  # finished trials untouched
    states = [row.split(",")[1] for row in rows_after]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["rank"] in (4, 8) and best["resolution"] == 32 and best["pretrained_model_name_or_path"] == "base"
    assert first["recipe"] == str(out / "best_recipe.yaml") and (out / "objective.png").stat().st_size > 1000


class FakeTrial:
    def __init__(self, prune_after: int):
        self.reports, self.prune_after = [], prune_after

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return len(self.reports) >= self.prune_after


def test_training_figures_reach_the_pruner_once_each(tmp_path):
    (tmp_path / "eval").mkdir()
    history = tmp_path / "eval" / "history.jsonl"
    history.write_text(json.dumps({"step": 2, "clip_t": 0.1}) + "\n")
    trial, reported = FakeTrial(prune_after=2), set()
    _report_progress(trial, tmp_path, "clip_t", reported)
    _report_progress(trial, tmp_path, "clip_t", reported)
    assert trial.reports == [(2, 0.1)]
    history.write_text(history.read_text() + json.dumps({"step": 4, "clip_t": 0.3}) + "\n" + '{"step": 6, "cl')
    with pytest.raises(optuna.TrialPruned):
        _report_progress(trial, tmp_path, "clip_t", reported)
    assert trial.reports == [(2, 0.1), (4, 0.3)]  # the half-written line is not read


def test_a_pruned_trial_stops_its_training_process(tmp_path):
    runner = TrialRunner(fake_sweep(tmp_path, 1), {})

    def prune():
        raise optuna.TrialPruned("behind the median")

    start = time.monotonic()
    with pytest.raises(optuna.TrialPruned):  # the "training" would sleep 10 minutes
        runner._sdtune([sys.executable, "-c", "import time; time.sleep(600)"], ["train-lora"], tmp_path / "log", prune)
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("change, message", [
    (dict(space={}), "'space' is empty"),
    (dict(objectives={}), "'objectives' is empty"),
    (dict(objectives={"clip_t": "up"}), "'up' is not maximize or minimize"),
    (dict(constraints={"clip_t": "at least 0.3"}), "write '>= 0.9'"),
    (dict(space={"lr": {"low": 1}}), "space.lr: give"),
    (dict(prune_eval_steps=10, objectives={"a": "maximize", "b": "maximize"}), "needs one objective"),
    (dict(space={"lr": {"low": 1, "high": 2, "when": {"method": "lora"}}}), "'method', which is not a parameter"),
    (dict(space={"a": {"choices": [1], "when": {"b": 1}}, "b": {"choices": [1], "when": {"a": 1}}}), "depend on each other"),
])
def test_bad_sweep_files_are_one_line(change, message):
    values = dict(space={"lr": {"low": 1e-4, "high": 1e-3}}, objectives={"clip_t": "maximize"})
    with pytest.raises(ConfigError, match=message) as err:
        SweepConfig(**{**values, **change})
    assert "\n" not in str(err.value)


def test_cli_sweep_file_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("command: train-lora\nspace: {lr: {low: 1.0e-4, high: 1.0e-3}}\nobjectives: {clip_t: maximise}\n")
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'maximise' is not maximize or minimize" in err


@pytest.mark.slow
def test_toy_sweep_runs_two_trials_and_its_best_recipe_trains_unchanged(tmp_path):
    sweep = toy_sweep_file()
    sweep.update(n_trials=2, startup_trials=2, output_dir=str(tmp_path / "toy-sweep"))
    sweep["eval"]["toy_samples"] = 8
    sweep["space"].update(lora_steps={"option": "max_train_steps", "low": 20, "high": 40, "step": 20, "when": {"method": "lora"}},
                          full_steps={"option": "max_train_steps", "low": 20, "high": 40, "step": 20, "when": {"method": "full"}},
                          num_class_images={"choices": [8]})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(path)]) == 0
    out = tmp_path / "toy-sweep"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",COMPLETE," in row for row in rows[1:])
    assert (out / "pareto.png").stat().st_size > 1000
    for trial in ("trial-000", "trial-001"):
        figures = json.loads((out / trial / "eval" / "metrics.json").read_text())
        assert set(figures) >= {"subject_fidelity", "context_fidelity", "prior_preservation"}
        recipe = yaml.safe_load((out / trial / "recipe.yaml").read_text())  # the space's steps, not the default 1000
        assert recipe["max_train_steps"] in (20, 40) and "learning_rate" in recipe
    best = out / "best_recipe.yaml"
    assert main(["train-dreambooth", "--config", str(best)]) == 0
    trained = Path(yaml.safe_load(best.read_text())["output_dir"])
    assert (trained / "pytorch_lora_weights.safetensors").is_file() or (trained / "model_index.json").is_file()


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from sdtune.sweep import TrialFailed

    def flaky_run(self, number, options, trial=None):
        if number == 0:
            raise TrialFailed("train-lora exited with 1: CUDA out of memory (see trial-000/train.log)")
        return {"clip_t": options["learning_rate"]}

    monkeypatch.setattr(TrialRunner, "run", flaky_run)
    best = run_sweep(fake_sweep(tmp_path, 2))
    states = [row.split(",")[1] for row in (tmp_path / "sweep" / "results.csv").read_text().splitlines()[1:]]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"] and best["trial"] in (1, 2)


def test_a_sweep_whose_every_trial_fails_stops(tmp_path, monkeypatch):
    from sdtune.sweep import TrialFailed

    def broken_run(self, number, options, trial=None):
        raise TrialFailed("train-lora exited with 2: sdtune: error: --instance_data_dir typo/: no such folder")

    monkeypatch.setattr(TrialRunner, "run", broken_run)
    assert run_sweep(fake_sweep(tmp_path, 3)) == {}  # no best recipe, and no endless retrying
    states = [row.split(",")[1] for row in (tmp_path / "sweep" / "results.csv").read_text().splitlines()[1:]]
    assert states == ["FAIL"] * 3
