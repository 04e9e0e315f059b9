"""Shared fixtures: a tiny random Llama + a BPE tokenizer trained on the embedded sample, one
tracked fine-tuning job on it for the tests that only read a job's results, and MLflow isolation.

Everything is built locally (no hub), once per test session.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_E2E = REPO.parent / "shared" / "data" / "e2e_nlg"
MLFLOW = str(Path(sys.executable).parent / "mlflow")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's op builds (compiled once, ~2 min) belong to this venv: a clean clone's tests never wait
# on the lock a killed build of another checkout left in the shared ~/.cache/torch_extensions.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def build_tiny_model(folder: Path, chat_template: bool = True) -> Path:
    """Save a 2-layer, 32-wide random Llama and its tokenizer to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from databricks_llm.task import E2E_INSTRUCTION
    from databricks_llm.sample_data import generate

    rows = generate(300, seed=123)
    texts = [r["sentence"] for r in rows] + [r["mr"] for r in rows] + [E2E_INSTRUCTION, "Description: ### Meaning representation:"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def logged(caplog):
    """What the package logged during the test, INFO and up (`.messages`, `.text`)."""
    caplog.set_level(logging.INFO, logger="databricks_llm")
    return caplog


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch):
    """Every test starts with no MLflow or Databricks target in its environment, whatever the shell
    or an earlier test set (`mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI); subprocesses
    it starts inherit only what the test itself sets."""
    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "DATABRICKS_"))]:
        monkeypatch.delenv(name)
    yield
    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "DATABRICKS_"))]:
        del os.environ[name]  # set during the test; monkeypatch then restores the shell's own


def run_module(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m databricks_llm.fine_tune` (or another launcher) as users do."""
    command = (launcher or [sys.executable, "-m"]) + list(args)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


FAKE_SECRETS = {"DATABRICKS_TOKEN": "dapi-fake-secret-0001", "HF_TOKEN": "hf_fakeSecret0002",
                "MY_SERVICE_PASSWORD": "pw-fake-secret-0003"}
QUICK_JOB = ["--max_train_samples=16", "--per_device_train_batch_size=4", "--logging_steps=1", "--disable_tqdm=true"]


@dataclass(frozen=True)
class TrainedJob:
    """A finished tracked job: its output folder, store, run and what it printed."""

    out: Path
    store: str
    run_id: str
    result: subprocess.CompletedProcess
    env: dict


@pytest.fixture(scope="session")
def trained_job(tiny_model, tmp_path_factory) -> TrainedJob:
    """One LoRA job on the tiny model, 4 steps with a save and an evaluation (slot scores included)
    every 2, gradient checkpointing and a merged final model, tracked in a local store under a named
    experiment with user tags and fake secrets in its environment. Read it through `job`."""
    out = tmp_path_factory.mktemp("trained-job")
    store = f"sqlite:///{out / 'mlflow.db'}"
    env = {**FAKE_SECRETS, "DATABRICKS_HOST": "https://example.invalid", "MLFLOW_TRACKING_URI": store,
           "MLFLOW_TAGS": json.dumps({"team": "nlp"}), "MLFLOW_EXPERIMENT_NAME": "spec",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={out}", *QUICK_JOB,
                        "--max_steps=4", "--save_steps=2", "--eval_steps=2", "--eval_generation_samples=4",
                        "--gradient_checkpointing=true", "--merge_adapter=true", "--run_name=spec-run", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return TrainedJob(out, store, (out / "mlflow_run_id").read_text().strip(), result, env)


@pytest.fixture
def job(trained_job) -> TrainedJob:
    """The session's trained job, with MLflow pointed at its store for this test."""
    import mlflow

    mlflow.set_tracking_uri(trained_job.store)
    return trained_job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: int = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def start(command: list[str], health: str, log: Path) -> subprocess.Popen:
    """Start a server in its own process group and wait until `health` answers."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(health, process)
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
    process.wait(timeout=30)


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite backend and artifact root."""
    port = port or free_port()
    process = start([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
                     "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1"], f"http://127.0.0.1:{port}/health", root / "server.log")
    return f"http://127.0.0.1:{port}", process


def loss_and_gradients(model, batches, loss=lambda model, batch: model(**batch).loss) -> list:
    """(loss, every gradient flattened) of `model` on each batch, from zeroed gradients: two ways of
    batching the same rows should give the same."""
    import torch

    results = []
    for batch in batches:
        model.zero_grad()
        value = loss(model, batch)
        value.backward()
        results.append((value.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    return results

