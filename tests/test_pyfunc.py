"""The pyfunc model's request handling: the seed's call, batches, and refused requests."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from databricks_llm.errors import InputError
from databricks_llm.validation import MAX_TOKENS_CAP
from databricks_llm.generation import STRUCTURED_DEFAULT as S
from databricks_llm.pyfunc import DEFAULT_MAX_TOKENS, CompletionModel, parse_request


@pytest.fixture(scope="module")
def served(tiny_model):
    model = CompletionModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(tiny_model)}))
    return model


def test_seed_call_dict_is_one_row():
    assert parse_request({"prompt": "Aromi is a pub.", "temperature": 0.4, "max_tokens": 128}) == [("Aromi is a pub.", 0.4, 128, S)]


def test_defaults_are_greedy_and_128_tokens_and_params_override_them():
    assert parse_request([{"prompt": "a"}]) == [("a", 0.0, DEFAULT_MAX_TOKENS, S)]
    assert parse_request([{"prompt": "a"}], params={"max_tokens": 7}) == [("a", 0.0, 7, S)]


def test_structured_decoding_comes_from_params_or_the_row():
    assert parse_request([{"prompt": "a"}], params={"structured_decoding": not S})[0][3] is (not S)
    assert parse_request([{"prompt": "a", "structured_decoding": True}], params={"structured_decoding": False})[0][3] is True


def test_dataframe_rows_with_missing_values_use_defaults():
    frame = pd.DataFrame([{"prompt": "a", "temperature": 0.5}, {"prompt": "b", "temperature": None}])
    assert parse_request(frame) == [("a", 0.5, DEFAULT_MAX_TOKENS, S), ("b", 0.0, DEFAULT_MAX_TOKENS, S)]


@pytest.mark.parametrize("request_, message", [
    ({"temperature": 0.4}, "'prompt' is required"),
    ({"prompt": "   "}, "non-empty string"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be an integer in 1.."),
    ({"prompt": "a", "max_tokens": MAX_TOKENS_CAP + 1}, "max_tokens must be an integer in 1.."),
    ({"prompt": "a", "temperature": -0.1}, "temperature must be a finite number, 0 .greedy. or in 0.001..10"),
    ({"prompt": "a", "temperature": "hot"}, "temperature must be a JSON number"),
    ({"prompt": "a", "temperature": float("inf")}, "temperature must be a finite number"),
    ({"prompt": "a", "temperature": float("nan")}, r"temperature must be a finite number.*\(got nan\)"),
    ({"prompt": "a", "temperature": 1e300}, "in 0.001..10 .got 1e.300."),
    ({"prompt": "a", "temperature": 1e-300}, "in 0.001..10"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens must be an integer in 1.."),
    ({"prompt": "a", "max_tokens": "12"}, "max_tokens must be a JSON number .got '12'."),
    ({"prompt": "a", "max_tokens": True}, "max_tokens must be a JSON number .got True."),
    ({"prompt": 42}, "'prompt' is required"),
    ("just a string", "expected a dict, list or DataFrame"),
    ({"prompt": "a", "structured_decoding": "maybe"}, "structured_decoding must be a JSON boolean"),
    ({"prompt": "a", "structured_decoding": "false"}, "structured_decoding must be a JSON boolean"),
    ({"prompt": "a", "structured_decoding": "no"}, "structured_decoding must be a JSON boolean"),
    ({"prompt": "a", "structured_decoding": 0}, "structured_decoding must be a JSON boolean"),
])
def test_bad_requests_are_refused_with_the_reason(request_, message):
    with pytest.raises(InputError, match=message):
        parse_request(request_)


@pytest.mark.parametrize("params, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": 1e6}, "in 0.001..10"),
    ({"max_tokens": 10.5}, "max_tokens must be an integer"),
    ({"structured_decoding": "false"}, "params: structured_decoding must be a JSON boolean"),
])
def test_bad_params_are_refused_with_the_reason(params, message):
    with pytest.raises(InputError, match=message):
        parse_request([{"prompt": "a"}], params)


def test_a_dataframe_column_sent_as_nan_is_refused_and_a_missing_value_takes_the_default():
    with pytest.raises(InputError, match="temperature must be a finite number"):
        parse_request(pd.DataFrame([{"prompt": "a", "temperature": float("nan")}]))
    frame = pd.DataFrame([{"prompt": "a", "max_tokens": 4}, {"prompt": "b"}])  # pandas: 4.0 and NaN
    assert parse_request(frame) == [("a", 0.0, 4, S), ("b", 0.0, DEFAULT_MAX_TOKENS, S)]


def test_predict_refuses_with_an_mlflow_invalid_parameter_error_whose_message_is_the_reason(served):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="row 0: max_tokens must be an integer") as refused:
        served.predict(None, {"prompt": "a", "max_tokens": 10.5})
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


def test_predict_returns_each_rows_own_answer_in_request_order(served):
    rows = [{"prompt": "Aromi is a pub.", "max_tokens": 8}, {"prompt": "Zizzi is a cheap restaurant near Avalon.", "max_tokens": 8},
            {"prompt": "The Punter is an expensive coffee shop.", "max_tokens": 6}]
    alone = [served.predict(None, row)[0] for row in rows]
    assert served.predict(None, rows) == alone
    assert served.predict(None, rows[::-1]) == alone[::-1]


def test_a_100kb_prompt_is_cut_to_the_sentence_cap(served):
    from databricks_llm.generation import MAX_INPUT_CHARS

    head = "Aromi is a pub. " * (MAX_INPUT_CHARS // 16)
    long = head[:MAX_INPUT_CHARS] + "Zizzi is a cheap restaurant. " * 3500  # 100 KB past the cap
    assert len(long) > 100_000
    assert served.predict(None, {"prompt": long, "max_tokens": 4}) == served.predict(None, {"prompt": head[:MAX_INPUT_CHARS], "max_tokens": 4})


def test_model_loads_whole_in_one_process_while_a_zero3_job_is_live(tiny_model):
    """Rank 0 loads the final model alone to check the input example; ZeRO-3 must not shard it."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    live_job = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        model = CompletionModel()
        model.load_context(SimpleNamespace(artifacts={"model": str(tiny_model)}))
        assert all(p.numel() > 0 for p in model.model.parameters())
        assert is_deepspeed_zero3_enabled(), "the training job's ZeRO-3 config is restored"
    finally:
        unset_hf_deepspeed_config()
        del live_job
