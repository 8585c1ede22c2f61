"""What a finished (or continued) sweep writes: results.csv, the printed table, the plot and best_recipe.yaml."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from sdtune.eval_report import pyplot, write_csv
from sdtune.sweep import SweepConfig, TrialRunner, reported_figures
from sdtune.sweep_space import constraint_bound, feasible, suggest, violations

logger = logging.getLogger(__name__)


def report(study, config: SweepConfig, runner: TrialRunner, out: Path) -> dict:
    rows = [_row(t) for t in study.trials]
    write_csv(rows, out / "results.csv")
    best = best_trial(study, config)
    plot_sweep(study, config, best, out / ("pareto.png" if len(config.objectives) > 1 else "objective.png"))
    _print_results(rows, config, best)
    if best is None:
        logger.warning("no trial finished; see the trials' train.log and eval.log in %s", out)
        return {}
    _, options = suggest(_FixedTrial(best.params), config.space)
    recipe = runner.recipe(options, out / "best")  # trains into OUTPUT_DIR/best/model unless --output_dir says otherwise
    (out / "best_recipe.yaml").write_text(
        f"# sdtune {config.command} --config best_recipe.yaml  (sweep trial {best.number}: "
        + ", ".join(f"{m} {best.user_attrs.get(m, float('nan')):.3f}" for m in reported_figures(config))
        + ")\n" + yaml.safe_dump(recipe, sort_keys=False))
    return {"trial": best.number, "params": best.params, "metrics": dict(best.user_attrs),
            "recipe": str(out / "best_recipe.yaml")}


class _FixedTrial:
    """Replays chosen parameters through :func:`suggest` (so named choices become their options again)."""

    def __init__(self, params: dict):
        self.params = params

    def suggest_categorical(self, name, choices):
        return self.params[name]

    def suggest_int(self, name, *args, **kwargs):
        return self.params[name]

    def suggest_float(self, name, *args, **kwargs):
        return self.params[name]


def best_trial(study, config: SweepConfig):
    """The finished trial that meets every constraint (or violates them least) with the best objectives.

    With several objectives: among the Pareto-optimal feasible trials, the one with the best mean of the
    objectives (each signed by its direction), the balanced recipe a user would pick from the plot.
    """
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not finished:
        return None
    meeting = [t for t in finished if feasible(t, config.constraints)]
    pool = meeting or sorted(finished, key=lambda t: sum(max(v, 0) for v in violations(t.user_attrs, config.constraints).values()))[:1]
    signs = [1 if d == "maximize" else -1 for d in config.objectives.values()]
    return max(pool, key=lambda t: sum(s * t.user_attrs[m] for s, m in zip(signs, config.objectives)) / len(signs))


def _row(trial) -> dict:
    return {"trial": trial.number, "state": trial.state.name, **trial.params, **trial.user_attrs}


def _print_results(rows: list[dict], config: SweepConfig, best) -> None:
    figures = reported_figures(config)
    params = list(config.space)
    print("trial  state     " + "".join(f"{m[:18]:>19}" for m in figures) + "  " + "  ".join(params))
    for row in rows:
        marker = "*" if best is not None and row["trial"] == best.number else " "
        values = "".join(f"{row[m]:>19.3f}" if isinstance(row.get(m), (int, float)) else f"{'-':>19}" for m in figures)
        chosen = "  ".join(_short(row.get(p, "-")) for p in params)
        print(f"{row['trial']:>4}{marker} {row['state']:<9}{values}  {chosen}")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_sweep(study, config: SweepConfig, best, path: Path) -> Path | None:
    """Two objectives: every trial, the Pareto front and the chosen one; one: the objective against the trials."""
    plt = pyplot(path)
    if plt is None:
        return None
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        return None
    names = list(config.objectives)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    met = [feasible(t, config.constraints) for t in done]
    edges = ["tab:blue" if m else "tab:red" for m in met]
    if len(names) >= 2:
        xs, ys = [[t.user_attrs[n] for t in done] for n in names[:2]]
        colour = [t.user_attrs[names[2]] for t in done] if len(names) > 2 else "white"
        points = axis.scatter(xs, ys, c=colour, cmap="viridis", vmin=0, vmax=1, edgecolors=edges, s=60, linewidths=1.5,
                              label="trials (red edge: misses a constraint)")
        if len(names) > 2:
            figure.colorbar(points, ax=axis, label=names[2])
        front = [t for t in study.best_trials if t.state.name == "COMPLETE"]
        if front:  # marked, not joined: with a third objective the front is not a line in this plane
            axis.scatter([t.user_attrs[names[0]] for t in front], [t.user_attrs[names[1]] for t in front], marker="x",
                         color="tab:orange", s=30, label="Pareto-optimal (all objectives)")
        axis.set_xlabel(names[0])
        axis.set_ylabel(names[1])
        for metric, rule in config.constraints.items():
            if metric in names[:2]:
                bound = constraint_bound(rule)[1]
                line = axis.axhline if metric == names[1] else axis.axvline
                line(bound, color="tab:red", ls="--", lw=1, label=f"{metric} {rule.strip()}")
        if best is not None:
            axis.scatter([best.user_attrs[names[0]]], [best.user_attrs[names[1]]], s=220, facecolors="none",
                         edgecolors="black", label=f"chosen: trial {best.number}")
    else:
        axis.scatter([t.number for t in done], [t.user_attrs[names[0]] for t in done], edgecolors=edges, label="trials")
        axis.set_xlabel("trial")
        axis.set_ylabel(names[0])
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(f"sdtune sweep: {len(done)} trials")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
