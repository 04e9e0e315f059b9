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

Refusals (see `parse_request` for the types) raise MlflowException INVALID_PARAMETER_VALUE, whose
message a REST client gets. temperature is 0 (greedy) or in 0.001..10, max_tokens in 1..512.
`params` keys the signature does not declare are dropped by MLflow, with a warning in the server's
log, before the model sees them: a misspelt param is ignored, not refused.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from databricks_llm.errors import InputError
from databricks_llm.formats import STRUCTURED_DEFAULT
from databricks_llm.generation import generate
from databricks_llm.validation import MAX_TOKENS_CAP, check_settings

DEFAULT_MAX_TOKENS = 128


def parse_request(model_input: Any, params: dict | None = None) -> list[tuple[str, float, int, bool]]:
    """(prompt, temperature, max_tokens, structured_decoding) per row from a dict, list of dicts or DataFrame.

    Types are strict, in a Python call and over REST alike (the signature declares the settings'
    columns as `Any`, so MLflow's server hands them over as sent): numbers are JSON numbers, never
    strings or booleans; max_tokens an integer (4.0 passes: pandas turns ints into floats in a
    column with missing values); structured_decoding a JSON boolean. A missing value (None, or NaN
    in a DataFrame column that has other values: pandas cannot tell a missing key from NaN there)
    takes the default; a column holding nothing but NaN was sent as NaN and is refused.
    """
    sent_as_nan = set(SETTINGS)  # outside a DataFrame a NaN is always one the caller sent
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
        sent_as_nan = {str(c) for c in model_input.columns
                       if model_input[c].dtype.kind == "f" and model_input[c].isna().all()}
    elif isinstance(model_input, dict):
        rows = [model_input] if not isinstance(model_input.get("prompt"), list) else [
            {**model_input, "prompt": p} for p in model_input["prompt"]]
    elif isinstance(model_input, list):
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in model_input]
    else:
        raise InputError(f"expected a dict, list or DataFrame with a 'prompt' field, got {type(model_input).__name__}")
    defaults = {k: v for k, v in (params or {}).items() if v is not None}
    parsed = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"row {i}: 'prompt' is required and must be a non-empty string")
        settings = {key: _setting(row, defaults, key, fallback, sent_as_nan, f"row {i}: ")
                    for key, fallback in SETTINGS.items()}
        temperature, max_tokens = check_settings(settings["temperature"], settings["max_tokens"], prefix=f"row {i}: ")
        parsed.append((prompt, temperature, max_tokens, settings["structured_decoding"]))
    return parsed


SETTINGS = {"temperature": 0.0, "max_tokens": DEFAULT_MAX_TOKENS, "structured_decoding": STRUCTURED_DEFAULT}


def _setting(row: dict, defaults: dict, key: str, fallback: Any, sent_as_nan: set[str], prefix: str) -> Any:
    """The row's value of `key`, else the request's params', else `fallback`; of the setting's type."""
    value = row.get(key)
    missing = value is None or (_is_nan(value) and key not in sent_as_nan)
    where = prefix if not missing else "params: "
    value = defaults.get(key, fallback) if missing else value
    if key == "structured_decoding":
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"{where}structured_decoding must be a JSON boolean, true or false (got {value!r})")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{where}{key} must be a JSON number (got {value!r})")
    if key == "max_tokens" and not (math.isfinite(value) and value == int(value)):
        raise InputError(f"{where}max_tokens must be an integer in 1..{MAX_TOKENS_CAP} (got {value!r})")
    return value if key == "max_tokens" else float(value)


def _is_nan(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and math.isnan(value)


class CompletionModel(mlflow.pyfunc.PythonModel):
    """Loads the model folder logged as the `model` artifact; generates in batches."""

    def load_context(self, context: Any) -> None:
        from databricks_llm import redaction
        from databricks_llm.models import load_for_inference
        from databricks_llm.task import Task

        redaction.install()  # the serving process's loggers (MLflow's, uvicorn's) too

        self.model, self.tokenizer = load_for_inference(context.artifacts["model"])
        self.task = Task.of_model(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One output per request row, in the task's format. A refused request raises MlflowException
        INVALID_PARAMETER_VALUE: MLflow's server answers it with HTTP 400 and the reason as its `message`
        (after its own "Failed to predict data ..."), where any other exception becomes a generic text.
        The DataFrame hint is one MLflow reads no second schema from."""
        try:
            rows = parse_request(model_input, params)
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        results: dict[int, str] = {}
        for settings in {row[1:] for row in rows}:
            index = [i for i, row in enumerate(rows) if row[1:] == settings]
            temperature, max_tokens, structured = settings
            texts = generate(self.model, self.tokenizer, [rows[i][0] for i in index], task=self.task,
                             max_tokens=max_tokens, temperature=temperature, structured=structured)
            results.update(zip(index, texts))
        return [results[i] for i in range(len(rows))]


mlflow.models.set_model(CompletionModel())
