"""Faults survived: SIGKILL then resume, SIGTERM/SIGINT, a second job on the folder, a full disk, and a
tracking server that goes away and comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import REPO, start_mlflow_server, stop

pytestmark = pytest.mark.slow


def start_job(model, out, *flags: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "databricks_llm.fine_tune", f"--model={model}", f"--output_dir={out}",
               "--max_steps=40", "--save_steps=5", "--eval_strategy=no", "--logging_steps=1",
               "--max_train_samples=16", "--per_device_train_batch_size=4", "--disable_tqdm=true", *flags]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(job: subprocess.Popen, timeout: int) -> str:
    """The job's output once it exits; a job still running after `timeout` fails the test with
    every thread's stack (SIGABRT makes the faulthandler print them)."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGABRT)
        pytest.fail(f"the job did not exit within {timeout}s:\n" + job.communicate(timeout=60)[0][-8000:])


def test_killed_job_resumes_into_the_same_run_without_missing_or_repeated_steps(tiny_model, tmp_path):
    job = start_job(tiny_model, tmp_path)
    wait_for_checkpoint(job, tmp_path, step=10)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    run_id = (tmp_path / "mlflow_run_id").read_text()
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    half_written = leave_a_half_written_checkpoint(tmp_path)

    resumed = start_job(tiny_model, tmp_path, "--resume_from_checkpoint=true")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert f"[resume] skipping incomplete {half_written}" in output
    run = mlflow.get_run(run_id)
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 41))
    assert run.info.status == "FINISHED"
    assert len(mlflow.search_runs([run.info.experiment_id], output_format="list")) == 1
    assert (tmp_path / "final_model" / "adapter_model.safetensors").exists()


def leave_a_half_written_checkpoint(out) -> str:
    """What a kill during a save leaves (whether or not this kill hit one): the next checkpoint
    folder with its weights written and no trainer_state.json yet."""
    newest = max((p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
                 key=lambda p: int(p.name.split("-")[1]))
    half = out / f"checkpoint-{int(newest.name.split('-')[1]) + 5}"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").unlink(missing_ok=True)
    (half / "adapter_model.safetensors").write_bytes((newest / "adapter_model.safetensors").read_bytes()[:100])
    return half.name


def wait_for_checkpoint(job: subprocess.Popen, folder, step: int = 5) -> None:
    deadline = time.time() + 300
    while not (folder / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
        time.sleep(0.2)


def run_status(out) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return mlflow.get_run((out / "mlflow_run_id").read_text()).info.status


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_terminated_or_interrupted_job_marks_its_run_killed(tiny_model, tmp_path, signum, code):
    job = start_job(tiny_model, tmp_path)
    wait_for_checkpoint(job, tmp_path)
    os.killpg(job.pid, signum)
    output = finish(job, timeout=120)
    assert job.returncode == code, output[-3000:]
    assert run_status(tmp_path) == "KILLED"
    assert not (tmp_path / ".databricks_llm.lock").exists()


def test_second_job_on_the_same_folder_is_refused_naming_the_first(tiny_model, tmp_path):
    first = start_job(tiny_model, tmp_path)
    try:
        wait_for_checkpoint(first, tmp_path)
        second = start_job(tiny_model, tmp_path, "--max_steps=2")
        output = finish(second, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=120)
    assert second.returncode == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: --output_dir {tmp_path} is in use by another job (pid {first.pid} on "), last
    assert run_status(tmp_path) == "KILLED"  # the first job's, never overwritten by the second
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1


def test_full_disk_during_a_run_marks_it_failed(tiny_model, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        job = start_job(tiny_model, disk / "out", "--save_steps=1")
        output = finish(job, timeout=600)
        assert job.returncode != 0, output[-3000:]
        assert "No space left on device" in output or "disk is full" in output, output[-3000:]
        assert run_status(disk / "out") == "FAILED", output[-3000:]
        assert not (disk / "out" / ".databricks_llm.lock").exists()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # the store stays open in this process


def test_tracking_server_outage_mid_training_is_survived_and_logging_resumes(tiny_model, tmp_path):
    url, server = start_mlflow_server(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    job_dir = tmp_path / "job"
    job = start_job(tiny_model, job_dir, "--max_steps=200", "--save_steps=25", "--gradient_accumulation_steps=4",
                    env={"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        deadline = time.time() + 300
        while not (job_dir / "checkpoint-25" / "trainer_state.json").exists():
            assert job.poll() is None and time.time() < deadline
            time.sleep(0.2)
        stop(server)
        url, server = start_mlflow_server(tmp_path, port=port)  # same store, same address
        back_at = max(int(p.name.split("-")[1]) for p in job_dir.glob("checkpoint-*"))
        assert back_at < 200, "training ended before the server came back: raise --max_steps"
        output, _ = job.communicate(timeout=900)
        mlflow.set_tracking_uri(url)
        run = mlflow.get_run((job_dir / "mlflow_run_id").read_text())
        steps = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")}
        models = {m.name for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")}
    finally:
        job.kill()
        stop(server)
    assert job.returncode == 0, output[-3000:]
    assert (job_dir / "checkpoint-200").exists() and (job_dir / "final_model").exists()
    assert "failed, training continues" in output and len(steps) < 200  # the outage cost some steps
    assert run.info.status == "FINISHED"
    assert {s for s in steps if s > back_at + 25}, f"nothing logged after the server came back at step {back_at}"
    assert {"checkpoint-200", "final_model"} <= models
