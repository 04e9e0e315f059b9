"""MLflow for a fine-tuning job: its settings, the one run, params, inputs, models.

`TrackingSettings.from_env` is the one place the tracking environment variables are read
(MLFLOW_TRACKING_URI, DATABRICKS_HOST + DATABRICKS_TOKEN, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID,
MLFLOW_NESTED_RUN, MLFLOW_TAGS, MLFLOW_FLATTEN_PARAMS, HF_MLFLOW_LOG_ARTIFACTS,
MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, TENSORBOARD_LOGGING_DIR; see the README): each is parsed
once, at start, so that none can fail (or hang a thread) mid-job. `job_run` owns the run from
start (or resume) to its end state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from databricks_llm import __version__, runtime, validation
from databricks_llm.errors import InputError, first_line
from databricks_llm.formats import STRUCTURED_DEFAULT
from databricks_llm.redaction import SECRET_NAME, redact_text, secret_values
from databricks_llm.runtime import Process
from databricks_llm.task import Task

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "databricks_llm"
# MLflow 3's UI opens an experiment by its kind; without it, logged checkpoint models are listed
# as GenAI "Agent versions".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUN_ID_FILE = "mlflow_run_id"
# A row's settings are `Any` columns: with typed ones, MLflow's server casts a request's values
# before the model sees them ("false" -> True, 10.5 -> 10); the pyfunc checks their types itself.
# The same settings are also declared as params (MLflow's convention); a row's own value wins.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec(AnyType(), "temperature", required=False),
                   ColSpec(AnyType(), "max_tokens", required=False),
                   ColSpec(AnyType(), "structured_decoding", required=False)]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec("temperature", "double", 0.0), ParamSpec("max_tokens", "long", 128),
                        ParamSpec("structured_decoding", "boolean", STRUCTURED_DEFAULT)]),
)
JOB_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# Async metric logging sends one batch per 5 s instead of one write per logged step: on a busy
# 2-core machine this took the tracking overhead from 5.3% to 0.7% (docs/benchmarks.md).
ASYNC_LOGGING_DEFAULTS = {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "5"}
_MODEL_FILE_SUFFIXES = {".json", ".safetensors", ".model", ".jinja", ".txt"}
_NOT_MODEL_FILES = {"trainer_state.json"}
_PACKAGES = ["mlflow", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pandas", "outlines-core"]
# Every variable this project (or MLflow, on our behalf) reads as a value, and how it must parse.
# MLflow's async logging thread dies on a non-integer buffering time and the job then hangs at exit.
ENVIRONMENT = {
    "MLFLOW_TAGS": validation.json_object,
    "MLFLOW_NESTED_RUN": validation.boolean,
    "MLFLOW_FLATTEN_PARAMS": validation.boolean,
    "HF_MLFLOW_LOG_ARTIFACTS": validation.boolean,
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": validation.boolean,
    "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": validation.number(int, validation.POSITIVE),
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": validation.number(int, validation.NON_NEGATIVE),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": validation.number(int, validation.POSITIVE),
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": validation.number(float, validation.POSITIVE),
    "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": validation.number(int, validation.POSITIVE),
    "TENSORBOARD_LOGGING_DIR": validation.writable_dir,
}
END_RUN_SECONDS = 60  # ending a run flushes buffered metrics; a dead server must not hold the job
# Space kept next to a local store while a run is open and given back just before the run is
# ended: on a disk filled by checkpoints, SQLite could otherwise not record FAILED.
RESERVE_BYTES = 1 << 20
RESERVE_FILE = ".mlflow_reserve"


@dataclass(frozen=True)
class TrackingSettings:
    """Where and how a job is tracked, read once from the environment (see `from_env`)."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str | None = None  # attach to this run instead of starting one
    nested: bool = False
    tags: dict[str, Any] = field(default_factory=dict)
    flatten_params: bool = False
    log_checkpoints: bool = True  # every save as an MLflow model (False: only the final model)
    system_metrics: bool = True
    tensorboard_dir: str = ""

    @classmethod
    def from_env(cls, output_dir: str) -> TrackingSettings:
        """The settings for a job writing to `output_dir`; a malformed variable, or a tracking or
        registry host that does not answer, is an InputError naming it, before anything is loaded
        or written."""
        validation.check_env(ENVIRONMENT)
        env = os.environ

        def flag(name: str, default: bool) -> bool:
            return validation.boolean(env[name]) if env.get(name) else default

        uri = tracking_uri(output_dir)
        for target in {uri, env.get("MLFLOW_REGISTRY_URI") or uri}:
            check_reachable(target)  # seconds, not the clients' minutes of retries
        return cls(
            uri=uri, experiment=env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
            run_id=env.get("MLFLOW_RUN_ID") or None, nested=flag("MLFLOW_NESTED_RUN", False),
            tags=validation.json_object(env["MLFLOW_TAGS"]) if env.get("MLFLOW_TAGS") else {},
            flatten_params=flag("MLFLOW_FLATTEN_PARAMS", False), log_checkpoints=flag("HF_MLFLOW_LOG_ARTIFACTS", True),
            system_metrics=flag("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", True),
            tensorboard_dir=env.get("TENSORBOARD_LOGGING_DIR") or str(Path(output_dir) / "tensorboard"),
        )


def check_report_to(report_to: list[str]) -> None:
    """Each `--report_to` integration is installed (the Trainer would fail only after the model loaded)."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [name for name in report_to if name not in available]
    if missing:
        raise InputError(f"--report_to {','.join(missing)}: not installed or not a known integration "
                         f"(available here: {', '.join(sorted(available)) or 'none'})")


MAX_MODEL_NAME_LENGTH = 256  # the registry's name column


def check_registered_model_name(name: str, flag: str) -> None:
    """A name the Model Registry accepts (MLflow's own rule: not blank, no `/` or `:`, no `..`
    path parts), checked before training rather than refused after it."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as err:
        raise InputError(f"{flag} {name!r} is not a valid model name: {first_line(err.message)}") from None
    if len(name) > MAX_MODEL_NAME_LENGTH or not name.isprintable():
        raise InputError(f"{flag} must be printable and at most {MAX_MODEL_NAME_LENGTH} characters (got {len(name)})")


def tracking_uri(output_dir: str) -> str:
    """MLFLOW_TRACKING_URI, else Databricks when host+token are set or on a Databricks cluster,
    else <output_dir>/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("DATABRICKS_HOST") and os.environ.get("DATABRICKS_TOKEN") or \
            os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return "databricks"
    return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"


PROBE_SECONDS = 5.0


def check_reachable(uri: str) -> None:
    """A TCP connection to the tracking target's host opens within PROBE_SECONDS (MLflow's and the
    Databricks SDK's own retries can wait minutes on a host that is down). Local stores pass."""
    import socket
    from urllib.parse import urlsplit

    if uri.startswith("databricks"):
        host = os.environ.get("DATABRICKS_HOST", "")
        if not host:
            return  # a profile in ~/.databrickscfg, or a Databricks cluster's own workspace
        service, url = "Databricks host (DATABRICKS_HOST)", host if "://" in host else f"https://{host}"
    elif uri.startswith(("http://", "https://")):
        service, url = "MLflow tracking server", uri
    else:
        return
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS):
            pass
    except (OSError, ValueError) as err:
        raise InputError(f"{service} {redact_text(url)} is not reachable within {PROBE_SECONDS:g}s: "
                         f"{first_line(err, 120)}") from None


def connect(settings: TrackingSettings, output_dir: str) -> str:
    """Point MLflow at the target and make sure the experiment exists; returns its id.

    The first contact uses 1 retry and a 10 s timeout, so an unreachable server is reported in
    seconds rather than after MLflow's default minutes of retries. Later calls get
    JOB_HTTP_LIMITS unless the user set those variables: a server that goes away mid-job
    costs each logging call under a minute, not several. ASYNC_LOGGING_DEFAULTS likewise
    (MLflow reads all of these from the environment, so that is where they are set).
    """
    uri, run_id = settings.uri, settings.run_id
    store = local_store(uri)
    if run_id and store is not None and not store.exists():
        raise InputError(f"MLFLOW_RUN_ID={run_id}: no such run (the local store {uri} does not exist yet)")
    mlflow.set_tracking_uri(uri)
    saved = {k: os.environ.get(k, default) for k, default in JOB_HTTP_LIMITS.items()}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        if run_id:
            _check_run(run_id)
        experiment = mlflow.get_experiment_by_name(settings.experiment)
        if experiment is None:
            location = (Path(output_dir) / "mlartifacts").resolve().as_uri() if store is not None else None
            experiment_id = mlflow.create_experiment(settings.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        if experiment is None or not set(EXPERIMENT_KIND) & set(experiment.tags):
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
    except InputError:
        raise
    except Exception as err:  # the client raises MlflowException, requests or OS errors alike
        raise InputError(f"MLflow tracking at {uri} is not usable: {first_line(err)}") from None
    finally:
        os.environ.update(saved)
    for name, value in ASYNC_LOGGING_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _check_run(run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise InputError(f"MLFLOW_RUN_ID={run_id}: no such run in the tracking store") from None
        raise


def end_run(status: str, seconds: float = END_RUN_SECONDS) -> None:
    """End the active run as `status`; a store or server in trouble cannot hold the job.

    Buffered metrics are flushed first in a daemon thread given `seconds`: a full disk fails it,
    a dead server could block it for good. The status is then set from this thread (MLflow keeps
    the active run per thread) whether or not the flush succeeded, unless it is still blocked.
    """
    if mlflow.active_run() is None:
        return
    reserve = _reserve_path()
    if reserve is not None:
        reserve.unlink(missing_ok=True)
    flush = threading.Thread(target=lambda: survive("flushing metrics", mlflow.flush_async_logging),
                             name="flush-mlflow-metrics", daemon=True)
    flush.start()
    flush.join(seconds)
    if flush.is_alive():
        log.warning(f"[mlflow] buffered metrics were not sent within {seconds:g}s; the run cannot be marked {status}")
        return
    survive(f"marking the run {status}", lambda: mlflow.end_run(status))


def local_store(uri: str) -> Path | None:
    """The SQLite file behind a `sqlite:///` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _reserve_path() -> Path | None:
    store = local_store(mlflow.get_tracking_uri())
    return store.with_name(RESERVE_FILE) if store is not None else None


def _reserve_space() -> None:
    """Hold RESERVE_BYTES next to a local store for `end_run` (best effort: a nearly full disk gets none)."""
    reserve = _reserve_path()
    if reserve is None:
        return
    try:
        with reserve.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
    except OSError:
        reserve.unlink(missing_ok=True)


def status_after(error: BaseException | None) -> str:
    """FINISHED, KILLED for Ctrl-C/SIGTERM (they unwind as KeyboardInterrupt/SystemExit), else FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def model_label(source: str) -> str:
    """A short readable name for a model source: `checkpoint-40@1a2b3c4d`, `m-...`, a folder's name."""
    if source.startswith("runs:/"):
        run_id, _, artifact = source[len("runs:/"):].partition("/")
        return f"{artifact or 'run'}@{run_id[:8]}"
    return source.rstrip("/").split("/")[-1].split(":")[-1] or source


def default_run_name(model: str) -> str:
    """`<model>-<date-time>`: runs that can be told apart in the MLflow UI's run list."""
    return f"{model_label(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class JobRun:
    """The job's run as rank 0 sees it; `skip_until_step`: steps a resumed run already logged."""

    run_id: str
    skip_until_step: int = -1


@contextlib.contextmanager
def job_run(settings: TrackingSettings, process: Process, *, output_dir: str, run_name: str, resume: bool,
            device: Any) -> Iterator[JobRun | None]:
    """The job's one MLflow run around everything it does after its data checks.

    Global rank 0 connects (a local store is created only now), starts the run or, on resume,
    reopens the one named in <output_dir>/mlflow_run_id, and yields it; other ranks yield None.
    On multi-node jobs every node's first process logs its own system metrics into the run as
    system/node-<i>/... The run always ends: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any
    error, a full disk included), after a bounded flush of the buffered metrics.
    """
    run, monitor, error = None, None, None
    if process.is_main:
        connect(settings, output_dir)
        run = _start_run(settings, output_dir, run_name, resume, f"node-{process.node}" if process.nodes > 1 else None)
        log.info(f"[mlflow] run {run.run_id} at {redact_text(settings.uri)}")
    try:
        if process.nodes > 1:
            run_id = runtime.broadcast(run.run_id if run else None, device)
            if not process.is_main and process.is_node_main and settings.system_metrics:
                monitor = _node_system_metrics(run_id, settings.uri, process.node)
        yield run
    except BaseException as err:
        error = err
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        if run is not None:
            end_run(status_after(error))


def _start_run(settings: TrackingSettings, output_dir: str, run_name: str, resume: bool,
               node_id: str | None) -> JobRun:
    """Start (or reopen) the run and record its id in <output_dir>/mlflow_run_id for a resume."""
    if node_id:
        mlflow.system_metrics.set_system_metrics_node_id(node_id)
    run_file = Path(output_dir) / RUN_ID_FILE
    run_id = settings.run_id or (run_file.read_text().strip() if resume and run_file.exists() else None)
    if run_file.exists() and not run_id:
        close_left_running(run_file.read_text().strip())
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else redact_text(run_name), nested=settings.nested,
                           log_system_metrics=settings.system_metrics)
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        run_file.write_text(run.info.run_id)
        _reserve_space()
        return JobRun(run.info.run_id, _last_logged_step(run.info.run_id) if run_id else -1)
    except BaseException as err:  # a full disk, Ctrl-C: the run must not stay RUNNING
        end_run(status_after(err))
        raise


def close_left_running(run_id: str) -> None:
    """End the folder's previous run as FAILED when it is still RUNNING and not being resumed: its job
    died (kill -9, a full disk, a server that went away) before it could end it. This job holds the
    folder's lock, so no job is writing to it."""
    def close() -> None:
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "databricks_llm.ended_by", "the next job in its folder: its own job died")
            client.set_terminated(run_id, "FAILED")
            print(f"[mlflow] run {run_id} was left RUNNING by a job that died: marked FAILED", flush=True)

    survive(f"closing the folder's previous run {run_id}", close)


def _node_system_metrics(run_id: str, uri: str, node: int) -> Any:
    """This node's system metrics into the job's run, as system/node-<i>/...; `.finish()` stops it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, node_id=f"node-{node}", resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def _last_logged_step(run_id: str) -> int:
    client = mlflow.tracking.MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return max((m.step for k in keys for m in client.get_metric_history(run_id, k)), default=-1)


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Drop secret-looking keys and any value that contains a secret from the environment."""
    secrets = secret_values()
    return {k: v for k, v in params.items()
            if not SECRET_NAME.search(k) and not any(s in str(v) for s in secrets)}


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_params(params: dict[str, Any], flatten: bool = False) -> None:
    """Log params (flattened when MLFLOW_FLATTEN_PARAMS is set), secrets and over-long values dropped."""
    if flatten:
        params = _flatten(params)
    limit = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
    items = [(k, v) for k, v in redact(params).items() if len(str(v)) <= limit]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


def set_tags(model: str, task: Task, extra: dict[str, Any]) -> None:
    """Model id, the task's output format, git commit and whatever MLFLOW_TAGS (`extra`) adds."""
    tags = {"model": model, "task": "extraction", "output_format": task.output_format}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(redact({**tags, **extra}))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_dataset(frame: Any, source: str, context: str) -> None:
    """Record a split as a run input (MLflow computes its digest)."""
    from mlflow.data.pandas_dataset import from_pandas

    name = redact_text(Path(source).name if Path(source).exists() else source)
    mlflow.log_input(from_pandas(frame, name=f"{name}:{context}", targets="output"), context=context)


def pip_requirements() -> list[str]:
    """Exact versions of what serving needs (the inferred default would add torchvision)."""
    return [f"{p}=={metadata.version(p)}" for p in _PACKAGES]


# Checkpoints are logged without an input example on purpose (MLflow checks one by loading the model and
# generating, seconds per checkpoint); the final model carries one. MLflow's note about that, and only it:
warnings.filterwarnings("ignore", message=r".*An input example was not provided when logging the model",
                        category=UserWarning, module=r"mlflow\.pyfunc")


def log_model_folder(folder: str | Path, name: str, step: int = 0, example: str | None = None,
                     registered_model_name: str | None = None) -> Any:
    """Log a saved model folder (LoRA adapter or full model + tokenizer + task file) as a pyfunc
    model; the task is also in the model's metadata (`extraction_task`).

    Training state (optimizer, scheduler, RNG, DeepSpeed shards) is left out: only the files a
    model needs are hard-linked into a staging folder. A LoRA adapter refers to its base model
    through `base_model_name_or_path` (a hub id or a local path), so it is logged alone.
    MLflow checks an input example by loading the model and generating, seconds per call, so
    checkpoints are logged with the signature only and the final model also with `example` (an input).
    """
    from databricks_llm import pyfunc

    with tempfile.TemporaryDirectory() as staging:
        model_dir = Path(staging) / "model"
        model_dir.mkdir()
        for file in Path(folder).iterdir():
            if file.is_file() and file.suffix in _MODEL_FILE_SUFFIXES and file.name not in _NOT_MODEL_FILES:
                _link_or_copy(file, model_dir / file.name)
        return mlflow.pyfunc.log_model(
            name=name, step=step, python_model=pyfunc.__file__, artifacts={"model": str(model_dir)},
            code_paths=[str(Path(__file__).parent)], signature=SIGNATURE,
            input_example={"prompt": example, "max_tokens": 128} if example else None,
            pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
            metadata={"task": "llm/v1/completions", "extraction_task": Task.of_model(folder).to_dict(),
                      "databricks_llm_version": __version__},
        )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def survive(action: str, fn: Callable[[], Any]) -> None:
    """Tracking trouble must never kill training: report it and carry on."""
    try:
        fn()
    except Exception as err:  # network, server and store errors all land here
        message = f"[mlflow] {action} failed, training continues: {type(err).__name__}: {first_line(err, 200)}"
        log.warning(redact_text(message))
