"""MLflow pyfunc model (models-from-code) serving a fine-tuned checkpoint or final model.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/checkpoint-N")
    model.predict({"prompt": "The Punter is an expensive Chinese coffee shop.", "temperature": 0.4, "max_tokens": 128})
    model.predict([{"prompt": "The Punter is a pub."}, {"prompt": "Aromi is cheap."}], params={"max_tokens": 64, "temperature": 0})
    model.predict({"prompt": "Aromi is cheap."}, params={"structured_decoding": False})  # free text (default: held to the task's format)

`prompt` is the raw input (a restaurant description, a support ticket); it is wrapped in the
prompt of the task the model was trained on (`extraction_task.json` among the model's files), so
the caller never passes the instruction. Settings come from the request rows (the seed's style)
or from MLflow's `params` (declared in the signature with their defaults); a row's own value wins.
Returns one output per row in the task's format (slot list, JSON object or text).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import mlflow
import pandas as pd

from databricks_llm import validation
from databricks_llm.errors import InputError
from databricks_llm.formats import STRUCTURED_DEFAULT
from databricks_llm.generation import generate

DEFAULT_MAX_TOKENS = 128


def parse_request(model_input: Any, params: dict | None = None) -> list[tuple[str, float, int, bool]]:
    """(prompt, temperature, max_tokens, structured_decoding) per row from a dict, list of dicts or DataFrame."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        rows = [model_input] if not isinstance(model_input.get("prompt"), list) else [
            {**model_input, "prompt": p} for p in model_input["prompt"]]
    elif isinstance(model_input, list):
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in model_input]
    else:
        raise InputError(f"expected a dict, list or DataFrame with a 'prompt' field, got {type(model_input).__name__}")
    defaults = params or {}
    parsed = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"row {i}: 'prompt' is required and must be a non-empty string")
        temperature = _value(row, defaults, "temperature", 0.0)
        max_tokens = _value(row, defaults, "max_tokens", DEFAULT_MAX_TOKENS)
        structured = _flag(row, defaults, "structured_decoding", STRUCTURED_DEFAULT, prefix=f"row {i}: ")
        parsed.append((prompt, *validation.check_settings(temperature, max_tokens, prefix=f"row {i}: "), structured))
    return parsed


def _flag(row: dict, defaults: dict, key: str, fallback: bool, prefix: str) -> bool:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = defaults.get(key, fallback)
    try:
        return validation.parse_bool(value)
    except argparse.ArgumentTypeError:
        raise InputError(f"{prefix}{key} must be true or false (got {value!r})") from None


def _value(row: dict, defaults: dict, key: str, fallback: float) -> float:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = defaults.get(key, fallback)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{key} must be a number (got {value!r})") from None


class CompletionModel(mlflow.pyfunc.PythonModel):
    """Loads the model folder logged as the `model` artifact; generates in batches."""

    def load_context(self, context: Any) -> None:
        from databricks_llm.models import load_for_inference
        from databricks_llm.task import Task

        self.model, self.tokenizer = load_for_inference(context.artifacts["model"])
        self.task = Task.of_model(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One output per request row, in the task's format. MLflow hands requests over as a DataFrame
        (the signature's schema); a DataFrame hint is one MLflow reads no second schema from."""
        rows = parse_request(model_input, params)
        results: dict[int, str] = {}
        for settings in {row[1:] for row in rows}:
            index = [i for i, row in enumerate(rows) if row[1:] == settings]
            temperature, max_tokens, structured = settings
            texts = generate(self.model, self.tokenizer, [rows[i][0] for i in index], task=self.task,
                             max_tokens=max_tokens, temperature=temperature, structured=structured)
            results.update(zip(index, texts))
        return [results[i] for i in range(len(rows))]


mlflow.models.set_model(CompletionModel())
