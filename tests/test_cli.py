"""Bad flags fail fast: one line on stderr, exit code 2, no model or data loaded, nothing written."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import REPO, run_module
from databricks_llm import config, fine_tune, models


@pytest.fixture
def no_loading(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", tripwire)
    monkeypatch.setattr(models, "load_tokenizer", tripwire)


def refused(capsys, argv: list[str]) -> str:
    assert fine_tune.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--no_such_flag=1"], "unknown flag --no_such_flag=1"),
    (["--learning_rate=abc"], "--learning_rate"),
    (["--fp16=true", "--bf16=true"], "mutually exclusive"),
    (["--use_4bit=true"], "--use_4bit needs"),
    (["--dataset=./missing/data.csv"], "dataset path ./missing/data.csv does not exist"),
    (["--model=./missing-model"], "model path ./missing-model does not exist"),
    (["--model=some-org/some-model"], "hub is offline"),
    (["--num_train_epochs=0"], "nothing to train"),
    (["--max_steps=0"], "nothing to train"),
    (["--per_device_train_batch_size=-1"], "must be > 0"),
    (["--deepspeed_config=./missing.json"], "does not exist"),
])
def test_bad_flag_is_refused_in_one_line(capsys, no_loading, tiny_model, tmp_path, argv, message):
    err = refused(capsys, [f"--model={tiny_model}", f"--output_dir={tmp_path}/out", *argv])
    assert message in err
    assert not (tmp_path / "out").exists()


def test_invalid_deepspeed_json_is_refused(capsys, no_loading, tmp_path):
    (tmp_path / "ds.json").write_text("{not json")
    err = refused(capsys, [f"--deepspeed_config={tmp_path / 'ds.json'}", f"--output_dir={tmp_path}/out"])
    assert "is not valid JSON" in err


def test_output_dir_that_is_a_file_is_refused(capsys, no_loading, tmp_path):
    (tmp_path / "file").write_text("keep me")
    err = refused(capsys, [f"--output_dir={tmp_path / 'file'}"])
    assert "is a file" in err
    assert (tmp_path / "file").read_text() == "keep me"


def test_unwritable_output_dir_is_refused_even_for_root(capsys, no_loading):
    err = refused(capsys, ["--output_dir=/proc/databricks_llm_out"])
    assert "--output_dir /proc/databricks_llm_out is not writable" in err


def test_bad_data_found_after_parsing_leaves_nothing_written(capsys, monkeypatch, tiny_model, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    err = refused(capsys, [f"--model={tiny_model}", f"--output_dir={tmp_path}/out", "--max_seq_length=8"])
    assert "--max_seq_length=8 is too small" in err
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_is_refused_by_name(capsys, no_loading, tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    err = refused(capsys, [f"--output_dir={tmp_path}", f"--resume_from_checkpoint={tmp_path / 'checkpoint-5'}"])
    assert "checkpoint-5 is not a complete checkpoint" in err


def test_resume_true_takes_the_newest_complete_checkpoint_and_names_the_skipped_one(logged, tmp_path):
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-15").mkdir()  # a job killed while saving leaves this behind
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text('{"global_step"')
    assert config.resume_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert "[resume] skipping incomplete checkpoint-15" in logged.text


def test_resume_true_without_any_checkpoint_is_refused(capsys, no_loading, tmp_path):
    err = refused(capsys, [f"--output_dir={tmp_path}", "--resume_from_checkpoint=true"])
    assert f"--resume_from_checkpoint=true but {tmp_path} holds no complete checkpoint" in err


def test_resume_true_with_only_incomplete_checkpoints_starts_over_and_they_are_moved_aside(capsys, tmp_path):
    (tmp_path / "checkpoint-5").mkdir()  # a disk that filled during the first save leaves this behind
    (tmp_path / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"cut")
    assert config.resume_checkpoint("true", str(tmp_path)) is None
    assert "holds only incomplete checkpoints (checkpoint-5): training starts over" in capsys.readouterr().out
    assert config.quarantine_partial(str(tmp_path)) == [tmp_path / "partial-checkpoint-5"]
    assert "checkpoint-5 is incomplete (no readable trainer_state.json): moved to partial-checkpoint-5" in capsys.readouterr().out
    assert config.checkpoint_folders(str(tmp_path)) == []


def test_resuming_a_checkpoint_already_at_max_steps_is_refused(capsys, no_loading, tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    err = refused(capsys, [f"--output_dir={tmp_path}", "--resume_from_checkpoint=true", "--max_steps=4"])
    assert "is at step 4, already --max_steps=4: nothing to train" in err


def test_a_run_left_running_in_the_folder_is_closed_by_the_next_job(tmp_path):
    import mlflow

    from databricks_llm import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("died")).info.run_id  # RUNNING: its job was killed
    tracking.close_left_running(run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "its own job died" in run.data.tags["databricks_llm.ended_by"]


def test_launcher_extras_and_aliases_are_understood():
    argv = ["--local_rank=1", "--evaluation_strategy=no", "--deepspeed", "--deepspeed_config", "ds.json", "--local_rank", "0"]
    assert config.normalise_argv(argv) == ["--eval_strategy=no", "--deepspeed_config", "ds.json"]


def test_command_line_exit_code_is_2_without_traceback(tmp_path):
    result = run_module("databricks_llm.fine_tune", "--fp16=true", "--bf16=true", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --fp16 and --bf16 are mutually exclusive; pick one"
    assert "Traceback" not in result.stderr


def test_help_documents_project_and_original_flags():
    result = run_module("databricks_llm.fine_tune", "--help", cwd=REPO)
    assert result.returncode == 0
    for flag in ["--final_model_output_path", "--use_lora", "--use_4bit", "--deepspeed_config", "--max_seq_length",
                 "--lora_r", "--max_train_samples", "--gradient_checkpointing", "--eval_strategy", "--run_name"]:
        assert flag in result.stdout


def test_unreachable_tracking_server_is_given_up_after_one_retry_before_the_model_loads(tiny_model, tmp_path):
    """"Fast" counted in contacts, not seconds: a server that drops every connection is tried at
    most three times (the reachability probe, the request and one retry), then the job refuses,
    before any weights load."""
    contacts, stop = [], threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(0.2)

        def drop_connections() -> None:
            while not stop.is_set():
                try:
                    connection, _ = server.accept()
                except OSError:
                    continue
                contacts.append(time.monotonic())
                connection.close()

        thread = threading.Thread(target=drop_connections, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}",
                            env={"MLFLOW_TRACKING_URI": url}, timeout=300)
        stop.set()
        thread.join()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: MLflow tracking at {url} is not usable")
    assert 2 <= len(contacts) <= 3, contacts
    assert "Loading weights" not in result.stderr


@pytest.mark.parametrize("slow", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_runs_but_says_it_is_slow_there(logged, monkeypatch, slow):
    from databricks_llm import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_slow", lambda: slow)
    runtime.check_precision(fp16=False, bf16=True)
    assert logged.messages == (["warning: --bf16 on this CPU (no AVX512-BF16 or AMX) runs bf16 matrix products many "
                                "times slower than float32; leave it off here"] if slow else [])
    assert all(r.levelname == "WARNING" for r in logged.records)


def test_only_rank_0_of_a_launched_job_says_so(logged, monkeypatch):
    from databricks_llm import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_slow", lambda: True)
    monkeypatch.setenv("RANK", "1")
    runtime.check_precision(fp16=False, bf16=True)
    assert logged.messages == []


def test_evaluate_in_bf16_on_such_a_cpu_says_so_too(logged, monkeypatch, tiny_model, tmp_path):
    from databricks_llm import evaluate, runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_slow", lambda: True)
    evaluate._parse([f"--model_uri={tiny_model}", f"--job_dir={tmp_path}", "--dtype=bfloat16"])
    assert logged.messages[0].startswith("warning: --dtype=bfloat16 on this CPU (no AVX512-BF16 or AMX)")
