"""Where a notebook runs: the project root, its paths, the hardware, and Databricks.

Jupyter and Databricks start a notebook's kernel in the notebook's own folder, papermill in any
folder; a Databricks Git folder puts the repo root on `sys.path` and installs nothing. The
notebooks call this module so that they behave the same in each case. It imports only the
standard library and `packaging`: the first notebook cell uses it before the requirements are installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from databricks_llm import logs
from databricks_llm.errors import InputError

log = logging.getLogger(__name__)

# Paths used as given: absolute ones, Unity Catalog volumes, DBFS, and non-path sources.
_AS_GIVEN = ("/", "~", "dbfs:", "embedded:")
_LOCAL_PREFIXES = ("./", "../", "outputs/")
# Spark comes with Databricks; installing pyspark over it breaks the cluster's own.
_PROVIDED_ON_DATABRICKS = {"pyspark"}


def project_root() -> Path:
    """The folder holding `databricks_llm/` and `ds_configs/`: the one the kernel started in (or
    above it: `notebooks/`), else the one this package was imported from."""
    here = Path(__file__).resolve().parents[1]
    for folder in (Path.cwd(), *Path.cwd().parents, here):
        if (folder / "ds_configs").is_dir() and (folder / "databricks_llm").is_dir():
            return folder
    raise FileNotFoundError(f"no project folder (with ds_configs/ and databricks_llm/) above {Path.cwd()} or {here}")


def resolve_path(value: str, base_path: str = "", folder: bool = False) -> str:
    """A notebook path parameter made independent of the kernel's working folder.

    Absolute paths (`/Volumes/...`, `/dbfs/...`), `dbfs:` URIs and `embedded:` sources are used as
    given; so are hub ids (`org/name`) that are not local folders, unless `folder` says the value
    is always a local folder (an output). A relative path goes under `base_path` when one is set (a
    volume or `/local_disk0/...` on Databricks), else under the project root; a project file such
    as `ds_configs/ds_zero_2.json` always resolves to the root.
    """
    if not value or value.startswith(_AS_GIVEN):
        return value
    root = project_root()
    if (root / value).exists() and not value.startswith("outputs/"):
        return str(root / value)
    base = Path(base_path) if base_path else root
    if folder or value.startswith(_LOCAL_PREFIXES) or (base / value).exists():
        return str((base / value).resolve())
    return value  # a hub id


def on_databricks() -> bool:
    return bool(os.environ.get("DATABRICKS_RUNTIME_VERSION"))


def on_serverless() -> bool:
    """Databricks serverless (and Free Edition) report a `client.*` runtime version."""
    return os.environ.get("DATABRICKS_RUNTIME_VERSION", "").startswith("client.")


def missing_requirements(requirements: Path) -> list[str]:
    """Lines of `requirements` that the installed packages do not satisfy (`2.13.0+cpu` satisfies
    `==2.13.0`, as pip decides)."""
    from packaging.requirements import InvalidRequirement, Requirement  # in every Python env with pip's deps

    missing = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        try:
            wanted = Requirement(line)
        except InvalidRequirement:
            continue  # blank lines and pip options
        if wanted.name.lower() in _PROVIDED_ON_DATABRICKS:
            continue
        try:
            installed = metadata.version(wanted.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not wanted.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def install_requirements(ipython: Any, requirements: Path | None = None) -> None:
    """On Databricks: `%pip install` what `requirements.txt` lacks (notebook-scoped), then restart
    Python so the new versions are imported. Elsewhere nothing: a local kernel has its own venv.
    Being the first call of every notebook, it also shows the package's INFO lines in the notebook."""
    logs.setup()
    if not on_databricks():
        return
    missing = missing_requirements(requirements or project_root() / "requirements.txt")
    if not missing:
        log.info("[setup] requirements.txt is satisfied")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as wanted:
        wanted.write("\n".join(missing) + "\n")
    log.info(f"[setup] installing {len(missing)} packages from requirements.txt (notebook-scoped)")
    ipython.run_line_magic("pip", f"install -q -r {wanted.name}")
    ipython.user_ns["dbutils"].library.restartPython()


def export_databricks_credentials(namespace: dict[str, Any]) -> None:
    """On Databricks, give the job's own processes (the DeepSpeed launcher's ranks) the notebook's
    workspace URL and token, as the seed notebook did: they cannot use the notebook's session to
    log to the workspace's MLflow. The token is a secret: tracking never logs it."""
    dbutils = namespace.get("dbutils")
    if dbutils is None or os.environ.get("DATABRICKS_TOKEN"):
        return
    try:
        context = dbutils.notebook.entry_point.getDbutils().notebook().getContext()
        os.environ.setdefault("DATABRICKS_HOST", context.apiUrl().get())
        os.environ["DATABRICKS_TOKEN"] = context.apiToken().get()
    except Exception as err:  # the context API differs between runtimes; say what to set instead
        log.warning(f"[setup] no workspace credentials from the notebook context ({type(err).__name__}); set "
                    "DATABRICKS_HOST and DATABRICKS_TOKEN (e.g. from a secret scope) to log to the workspace")


PAPERMILL_CELL = "# Parameters\n"  # how papermill's injected-parameters cell starts (its Python translator)


def refuse_unknown_parameters(namespace: dict[str, Any], names: list[str]) -> None:
    """Papermill only warns about a parameter the notebook does not take (`-p max_step 5`) and runs
    with the default: here it is refused, naming the parameters the notebook takes. The injected
    names are read from the kernel's cell history (`In`), so a re-run in Jupyter is not affected."""
    import ast

    injected = next((cell for cell in reversed(namespace.get("In") or []) if cell.startswith(PAPERMILL_CELL)), "")
    try:
        given = [node.targets[0].id for node in ast.parse(injected).body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)]
    except SyntaxError:
        return
    unknown = [name for name in given if name not in names]
    if unknown:
        raise InputError(f"unknown notebook parameter {', '.join(unknown)}: this notebook takes {', '.join(names)}")


def widget_values(namespace: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """On Databricks, one text widget per parameter (default: its current value), read back
    with the default's type; elsewhere the values are returned unchanged. Unknown parameters
    (papermill's) are refused first."""
    from databricks_llm.validation import parse_bool  # the one bool parser of every CLI

    refuse_unknown_parameters(namespace, names)
    dbutils = namespace.get("dbutils")
    values = {name: namespace[name] for name in names}
    if dbutils is None:
        return values
    for name, default in values.items():
        dbutils.widgets.text(name, str(default))
        raw = dbutils.widgets.get(name)
        if isinstance(default, bool):
            values[name] = parse_bool(raw)
        elif isinstance(default, (int, float)):
            values[name] = type(default)(raw)
        else:
            values[name] = raw
    return values


def task_value(namespace: dict[str, Any], task: str, key: str, default: str) -> str:
    """What an earlier task of the same Databricks job published under `key`; `default` when
    the notebook runs outside a job (or off Databricks)."""
    dbutils = namespace.get("dbutils")
    if dbutils is None:
        return default
    return dbutils.jobs.taskValues.get(taskKey=task, key=key, default=default, debugValue=default)


def publish(namespace: dict[str, Any], **values: str) -> None:
    """Hand `values` to the job's later tasks (Databricks job task values; outside a job, and off
    Databricks, the next notebook finds them through files and MLflow instead)."""
    dbutils = namespace.get("dbutils")
    for key, value in values.items():
        log.info(f"[task value] {key} = {value}")
        if dbutils is not None:
            dbutils.jobs.taskValues.set(key=key, value=value)


@dataclass(frozen=True)
class Launch:
    """How the fine-tuning notebook starts the job, and why."""

    launcher: str  # "deepspeed" (its launcher, `--module`) or "python" (`python -m`, no DeepSpeed)
    ds_config: str | None
    reason: str


def choose_launch(launcher: str = "auto", ds_config: str = "auto", cuda: bool | None = None) -> Launch:
    """On GPUs `--deepspeed_config=auto`: the job's memory plan picks ZeRO-3, ZeRO-3 + CPU offload or
    none from the model and the GPUs (databricks_llm/memory_plan.py); ZeRO-2 on CPU, where generating
    under ZeRO-3 offload takes minutes per handful of sentences; plain `python -m` where DeepSpeed
    cannot build its CPU ops (no C++ compiler) or on Databricks serverless / Free Edition."""
    if launcher not in ("auto", "deepspeed", "python"):
        raise ValueError(f"launcher must be auto, deepspeed or python (got {launcher!r})")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:  # the launcher started from this kernel would otherwise print "Setting accelerator to CPU"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    configs = project_root() / "ds_configs"
    if launcher == "auto":
        if cuda:
            launcher, reason = "deepspeed", "CUDA found"
        elif on_serverless():
            launcher, reason = "python", "Databricks serverless: no DeepSpeed launcher"
        elif shutil.which("c++") or shutil.which("g++"):
            launcher, reason = "deepspeed", "no CUDA: DeepSpeed on CPU"
        else:
            launcher, reason = "python", "no CUDA and no C++ compiler for DeepSpeed's CPU ops"
    else:
        reason = f"launcher={launcher} as set"
    if ds_config == "auto":
        if launcher == "python":
            return Launch("python", None, reason + ", no DeepSpeed config")
        if cuda:
            return Launch(launcher, "auto", f"{reason}, DeepSpeed config from the job's memory plan")
        return Launch(launcher, str(configs / "ds_zero_2.json"), f"{reason}, ds_zero_2.json")
    return Launch(launcher, resolve_path(ds_config) if ds_config else None, f"{reason}, {ds_config or 'no DeepSpeed config'}")


def run_job(command: str) -> None:
    """Run a shell command (the fine-tuning launcher) with its output streamed into the notebook;
    on failure raise with the job's own `error:` line, not just its exit code."""
    import subprocess

    process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1)
    reason = None
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.startswith("error:"):
            reason = line.strip()
    code = process.wait()
    if code != 0:
        raise RuntimeError(f"fine-tuning failed with exit code {code}" + (f": {reason}" if reason else ""))
