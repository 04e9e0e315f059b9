"""The shared checks: one bool parser, numeric ranges, redaction, the output-folder lock."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from databricks_llm import outputlock
from databricks_llm.errors import InputError
from databricks_llm.redaction import redact_text
from databricks_llm.validation import FRACTION, POSITIVE, PROBABILITY, argument_parser, parse_bool


@pytest.mark.parametrize("text, value", [("true", True), ("Yes", True), ("on", True), ("1", True),
                                         ("false", False), ("NO", False), ("off", False), ("0", False)])
def test_bool_parser_reads_the_usual_spellings(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "truthy"])
def test_bool_parser_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected true/false"):
        parse_bool(text)


def test_the_spark_launcher_reads_booleans_with_the_shared_parser():
    from databricks_llm.distributed import LaunchArguments

    (args,) = argument_parser(LaunchArguments, "test").parse_args_into_dataclasses(args=["--local_mode=no", "--use_gpu=yes"])
    assert (args.local_mode, args.use_gpu) == (False, True)
    with pytest.raises(InputError, match="argument --local_mode.*: expected true/false"):
        argument_parser(LaunchArguments, "test").parse_args_into_dataclasses(args=["--local_mode=maybe"])


def test_ranges_refuse_nan_inf_and_the_open_ends():
    assert 1e-4 in POSITIVE and 0 not in POSITIVE and float("nan") not in POSITIVE and float("inf") not in POSITIVE
    assert 0.5 in FRACTION and 0 not in FRACTION and 1 not in FRACTION
    assert 0 in PROBABILITY and 1 not in PROBABILITY
    assert (str(POSITIVE), str(FRACTION), str(PROBABILITY)) == ("> 0", "in (0, 1)", "in [0, 1)")


def test_redaction_masks_every_copy_of_every_secret(monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-very-secret-1")
    text = ("error at http://user:s3cret@host:5000/api and again http://user:s3cret@host:5000/x; "
            "https://tok123@db.example/x?access_token=abc123&page=2 dapi0123456789abcdef0123456789abcdef "
            "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123 Authorization: Bearer eyJhbGciOi.abc env tok-very-secret-1")
    redacted = redact_text(text)
    for secret in ["s3cret", "tok123", "abc123", "dapi0123", "hf_AbCd", "eyJhbGciOi", "tok-very-secret-1"]:
        assert secret not in redacted, redacted
    assert redacted.count("http://user:***@host:5000") == 2
    assert "page=2" in redacted and "transformers/hf_argparser.py" in redact_text("transformers/hf_argparser.py")


def test_a_second_job_on_the_folder_is_refused_naming_the_first(tmp_path):
    with outputlock.hold(str(tmp_path)):
        holder = subprocess.run([sys.executable, "-c", (
            "from databricks_llm import outputlock\n"
            f"with outputlock.hold({str(tmp_path)!r}): pass\n")], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert f"is in use by another job (pid {os.getpid()} on {socket.gethostname()}" in holder.stderr
    assert not (tmp_path / outputlock.LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / outputlock.LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with outputlock.hold(str(tmp_path)):
        assert json.loads((tmp_path / outputlock.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / outputlock.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "today"}))
    with pytest.raises(InputError, match="pid 1 on elsewhere, started today"):
        with outputlock.hold(str(tmp_path)):
            pass


def test_a_job_refused_before_writing_leaves_no_output_folder(tmp_path):
    with pytest.raises(InputError):
        with outputlock.hold(str(tmp_path / "new")):
            raise InputError("refused")
    assert not (tmp_path / "new").exists()


MASKING_SCRIPT = r"""
import io, logging, sys
import mlflow  # its loggers get their handlers on import, before `install`
from databricks_llm import redaction

redaction.install()
later = logging.getLogger("library.made.later")
later.addHandler(logging.StreamHandler(sys.stderr))
uri = "http://alice:s3cretpass@127.0.0.1:9/api"
logging.getLogger("mlflow.utils.async_logging").error("flush to %s failed", uri)
later.warning("token %s, everyday: false true 1", "tok-very-secret-1")
try:
    raise ConnectionError(f"cannot reach {uri}")
except ConnectionError:
    logging.getLogger("mlflow.system_metrics").exception("monitor died")
print("dataset /data/tok-very-secret-1/train.csv")
"""


def test_every_logger_print_and_traceback_of_the_process_is_masked_after_install():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MY_API_TOKEN": "tok-very-secret-1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "true", "SOME_PASSWORD": "1"}
    result = subprocess.run([sys.executable, "-c", MASKING_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "s3cretpass" not in output and "tok-very-secret-1" not in output, output
    assert output.count("http://alice:***@127.0.0.1:9/api") == 2, output  # MLflow's logger, the exception
    assert "everyday: false true 1" in output and "dataset /data/***/train.csv" in output


def test_secret_names_are_name_parts_and_everyday_values_are_never_secrets(monkeypatch):
    from databricks_llm.redaction import SECRET_NAME, secret_values

    assert all(SECRET_NAME.search(n) for n in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "hub_token"))
    assert not any(SECRET_NAME.search(n) for n in ("TOKENIZERS_PARALLELISM", "include_tokens_per_second", "max_tokens", "PWD"))
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "true")
    monkeypatch.setenv("SHORT_TOKEN", "abc")
    assert not {"true", "abc"} & secret_values()


def test_a_lock_taken_by_the_launcher_named_in_the_environment_is_shared(tmp_path, monkeypatch):
    with outputlock.hold(str(tmp_path)):
        monkeypatch.setenv(outputlock.HOLDER_ENV, str(os.getpid()))
        with outputlock.hold(str(tmp_path)):  # the chain runner's own job
            assert (tmp_path / outputlock.LOCK_FILE).exists()
        assert (tmp_path / outputlock.LOCK_FILE).exists()  # still the runner's
    assert not (tmp_path / outputlock.LOCK_FILE).exists()


def test_a_tracking_host_that_does_not_answer_is_refused_in_seconds_naming_the_service(monkeypatch):
    from databricks_llm.tracking import check_reachable

    monkeypatch.setenv("DATABRICKS_HOST", "http://127.0.0.1:9")
    with pytest.raises(InputError, match=r"Databricks host \(DATABRICKS_HOST\) http://127.0.0.1:9 is not reachable"):
        check_reachable("databricks")
    with pytest.raises(InputError, match=r"MLflow tracking server http://u:\*\*\*@127.0.0.1:9 is not reachable"):
        check_reachable("http://u:pw-secret@127.0.0.1:9")
    check_reachable("sqlite:///x.db")  # local stores are not probed
