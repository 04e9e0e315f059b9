"""A sweep's search space: fine_tune flags and the values each may take, from a small YAML/JSON file
or the LoRA defaults, checked in full before a sweep starts.

A file maps flag names (as fine_tune spells them, without dashes) to one of

    learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}    # a float range (log scale when asked)
    max_steps: {low: 200, high: 1000, step: 100}             # integers when low, high and step are
    lora_r: {choices: [8, 16, 32]}                           # one of a list
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from databricks_llm.errors import InputError, first_line

_KEYS = {"low", "high", "step", "log", "choices"}


@dataclass(frozen=True)
class Dimension:
    """One flag of the space and its Optuna distribution."""

    name: str
    distribution: optuna.distributions.BaseDistribution

    def bounds(self) -> tuple[Any, Any]:
        """The two extreme values (first and last choice for a list): what the job's checks are run on."""
        d = self.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return d.choices[0], d.choices[-1]
        return d.low, d.high

    def contains(self, value: Any) -> bool:
        d = self.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return value in d.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and d.low <= value <= d.high


# The LoRA recipe's knobs (flag names of databricks_llm.config), around the hand-found E2E recipes.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True},
    "lora_r": {"choices": [4, 8, 16, 32]},
    "lora_alpha": {"choices": [8, 16, 32, 64]},
    "lora_dropout": {"low": 0.0, "high": 0.1},
    "warmup_steps": {"low": 0.0, "high": 0.1},  # below 1: a fraction of the steps (TrainingArguments)
    "num_train_epochs": {"low": 1, "high": 3, "step": 1},
}


def default_space(fixed_flags: set[str]) -> list[Dimension]:
    """The default space less what the job's own flags fix (`--max_steps` fixes the length, so the
    epochs are not searched either)."""
    fixed = set(fixed_flags) | ({"num_train_epochs"} if "max_steps" in fixed_flags else set())
    return parse_space({k: v for k, v in DEFAULT_SPACE.items() if k not in fixed}, "the default space")


def load_space(path: str) -> list[Dimension]:
    """Read and check a space file; InputError names the file and the entry at fault."""
    text = _read(path, "--space")
    return parse_space(_parse(text, path, "--space"), f"--space {path}")


def load_trials(path: str, space: list[Dimension]) -> list[dict[str, Any]]:
    """A list of parameter sets to run first (`--enqueue`), each inside `space`."""
    what = f"--enqueue {path}"
    trials = _parse(_read(path, "--enqueue"), path, "--enqueue")
    if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
        raise InputError(f"{what}: must be a list of {{flag: value}} mappings")
    names = {d.name: d for d in space}
    for i, params in enumerate(trials):
        for name, value in params.items():
            if name not in names:
                raise InputError(f"{what}: entry {i}: {name} is not in the search space ({', '.join(names)})")
            if not names[name].contains(value):
                raise InputError(f"{what}: entry {i}: {name}={value!r} is outside its range in the search space")
    return trials


def parse_space(entries: Any, what: str) -> list[Dimension]:
    """Mapping of flag -> range/choices into dimensions (flag names themselves are checked by the job's parser)."""
    if not isinstance(entries, dict) or not entries:
        raise InputError(f"{what}: must be a non-empty mapping of fine_tune flag names to ranges or choices")
    return [Dimension(str(name).lstrip("-"), _distribution(str(name), spec, what)) for name, spec in entries.items()]


def _distribution(name: str, spec: Any, what: str) -> optuna.distributions.BaseDistribution:
    where = f"{what}: {name}"
    if not isinstance(spec, dict) or set(spec) - _KEYS or not spec:
        raise InputError(f"{where}: must be {{low, high[, step][, log]}} or {{choices: [...]}} (got {spec!r})")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices or \
                not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise InputError(f"{where}: choices must be a non-empty list of numbers, strings or booleans, alone")
        return optuna.distributions.CategoricalDistribution(choices)
    if "low" not in spec or "high" not in spec:
        raise InputError(f"{where}: needs both low and high")
    low, high, step = (_number(spec.get(k), f"{where}: {k}") for k in ("low", "high", "step"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise InputError(f"{where}: log must be true or false (got {log!r})")
    if not low < high:
        raise InputError(f"{where}: low must be below high (got {low:g}, {high:g})")
    if log and low <= 0:
        raise InputError(f"{where}: a log scale needs low > 0 (got {low:g})")
    if step is not None and (step <= 0 or log):
        raise InputError(f"{where}: step must be > 0 and cannot go with log (got step {step:g})")
    if all(isinstance(v, int) for v in (low, high, step if step is not None else 1)):
        return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)


def _number(value: Any, where: str) -> int | float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        number = value
    elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"{where} must be a number (got {value!r})") from None
    else:
        raise InputError(f"{where} must be a number (got {value!r})")
    if number is not None and not math.isfinite(number):
        raise InputError(f"{where} must be finite (got {value!r})")
    return number


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{flag} {path}: cannot read it ({first_line(getattr(err, 'strerror', None) or err)})") from None


def _parse(text: str, path: str, flag: str) -> Any:
    import yaml

    try:  # YAML is a superset of JSON
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{flag} {path}: not valid YAML or JSON ({first_line(err, 150)})") from None


def flags(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as fine_tune flags."""
    return [f"--{name}={json.dumps(value) if isinstance(value, bool) else value}" for name, value in params.items()]


def describe(space: list[Dimension]) -> dict[str, str]:
    """The space as readable text per flag (parent run params, docs)."""
    return {d.name: repr(d.distribution) for d in space}
