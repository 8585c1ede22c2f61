"""A sweep's search space and constraints: checked when the sweep file is read, sampled per trial, judged per result."""

from __future__ import annotations

import re
from typing import Any

from sdtune.errors import ConfigError

_CONSTRAINT = re.compile(r"\s*(>=|<=)\s*(-?[\d.]+(?:e-?\d+)?)\s*")


def check_space(space: dict) -> None:
    """One-line errors for a parameter that is neither a range nor choices, or a ``when`` that cannot be judged."""
    for name, spec in space.items():
        _check_param(name, spec)
        for other in spec.get("when", {}):
            if other not in space:
                raise ConfigError(f"sweep: space.{name}: 'when' names {other!r}, which is not a parameter of the space")
    in_dependency_order(space)  # raises on a cycle


def check_constraints(constraints: dict) -> None:
    for metric, rule in constraints.items():
        if not isinstance(rule, str) or not _CONSTRAINT.fullmatch(rule):
            raise ConfigError(f"sweep: constraint {metric}: write '>= 0.9' or '<= 0.1', got {rule!r}")


def _check_param(name: str, spec: Any) -> None:
    if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
        raise ConfigError(f"sweep: space.{name}: give {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
    if "choices" in spec and not spec["choices"]:
        raise ConfigError(f"sweep: space.{name}: choices is empty")
    if "when" in spec and not isinstance(spec["when"], dict):
        raise ConfigError(f"sweep: space.{name}: 'when' maps another parameter to the value it must have")


def in_dependency_order(space: dict) -> list[tuple[str, dict]]:
    """The space's parameters, each after the ones its ``when`` names (otherwise in the file's order).

    A ``when`` can only be judged once the parameter it names is chosen; the file's order must not decide it (a YAML
    writer that sorts keys would put ``full_lr`` before ``method`` and silently drop it).
    """
    ordered: list[tuple[str, dict]] = []
    waiting = dict(space)
    while waiting:
        ready = [(n, s) for n, s in waiting.items() if all(o not in waiting for o in s.get("when", {}))]
        if not ready:
            raise ConfigError(f"sweep: the 'when' conditions of {', '.join(f'space.{n}' for n in waiting)} depend on each other")
        ordered += ready
        for name, _ in ready:
            del waiting[name]
    return ordered


def suggest(trial, space: dict) -> tuple[dict, dict]:
    """(the parameters Optuna chose, the options they set). Parameters whose ``when`` is not met are skipped."""
    chosen: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for name, spec in in_dependency_order(space):
        if any(chosen.get(other) != value for other, value in spec.get("when", {}).items()):
            continue
        if "choices" in spec:
            choices = spec["choices"]
            names = list(choices) if isinstance(choices, dict) else choices
            value = trial.suggest_categorical(name, names)
            chosen[name] = value
            options.update(choices[value] if isinstance(choices, dict) else {spec.get("option", name): value})
        else:
            option_name = spec.get("option", name)
            if isinstance(spec["low"], int) and isinstance(spec["high"], int):  # 200..600: steps, ranks, counts
                value = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
            else:
                value = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec.get("log", False),
                                            step=spec.get("step"))
            chosen[name] = options[option_name] = value
    return chosen, options


def violations(metrics: dict, constraints: dict) -> dict[str, float]:
    """Optuna's convention: one value per constraint, met when <= 0; a missing figure violates it."""
    values = {}
    for metric, rule in constraints.items():
        sign, bound = constraint_bound(rule)
        value = metrics.get(metric)
        values[metric] = 1.0 if value is None else (bound - value if sign == ">=" else value - bound)
    return values


def constraint_bound(rule: str) -> tuple[str, float]:
    """``">= 0.8"`` -> ``(">=", 0.8)``; the rule was checked when the sweep file was read."""
    sign, bound = _CONSTRAINT.fullmatch(rule).groups()
    return sign, float(bound)


def feasible(trial, constraints: dict) -> bool:
    return all(v <= 0 for v in violations(trial.user_attrs, constraints).values())
