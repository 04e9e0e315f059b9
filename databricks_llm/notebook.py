"""Notebook plumbing: Databricks widgets for parameters, and the headless papermill chain.

    python -m databricks_llm.notebook --profile=demo   # data prep -> fine-tune -> evaluation

Executed notebooks land in --output (default outputs/notebooks), never in notebooks/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAIN = ("01_data_preparation.ipynb", "02_fine_tune.ipynb", "03_evaluation.ipynb")
# Per profile: parameters for the fine-tuning and evaluation notebooks (data prep uses defaults).
# ci and demo run on CPU: ZeRO-2 there, since generating under ZeRO-3 offload gathers every
# layer for every new token (minutes for a handful of sentences on 2 cores).
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {
        "fine_tune": {"ds_config": "ds_configs/ds_zero_2.json", "max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 2,
                      "extra_args": "--max_train_samples=8 --max_eval_samples=4 --eval_generation_samples=2 "
                                    "--logging_steps=1 --disable_tqdm=true"},
        "evaluate": {"max_samples": 4, "max_tokens": 32},
    },
    "demo": {"fine_tune": {"ds_config": "ds_configs/ds_zero_2.json"}, "evaluate": {}},
    "full": {
        "fine_tune": {"max_steps": -1, "save_steps": 200,
                      "extra_args": "--num_train_epochs=1 --eval_generation_samples=64 --logging_steps=10"},
        "evaluate": {"max_samples": 0},
    },
}


def widget_values(namespace: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """On Databricks, one text widget per parameter (default: its current value), read back
    with the default's type; elsewhere the values are returned unchanged."""
    dbutils = namespace.get("dbutils")
    values = {name: namespace[name] for name in names}
    if dbutils is None:
        return values
    for name, default in values.items():
        dbutils.widgets.text(name, str(default))
        raw = dbutils.widgets.get(name)
        if isinstance(default, bool):
            values[name] = raw.strip().lower() in {"1", "true", "yes"}
        elif isinstance(default, (int, float)):
            values[name] = type(default)(raw)
        else:
            values[name] = raw
    return values


def run_chain(profile: str, output: Path, work_dir: Path, model: str | None = None, dataset: str | None = None) -> None:
    """Execute the three notebooks with papermill, each feeding the next; stop at the first failure."""
    import papermill

    settings = PROFILES[profile]
    prepared, job = str(work_dir / "prepared_data"), str(work_dir / "checkpoints")
    common = {"model": model} if model else {}
    parameters = [
        {**common, "prepared_path": prepared, **({"dataset": dataset} if dataset else {})},
        {**common, "dataset": prepared, "output_dir": job, "final_model_output_path": str(work_dir / "final_model"),
         **settings["fine_tune"]},
        {**({"base_model": model} if model else {}), "dataset": prepared, "output_dir": job, **settings["evaluate"]},
    ]
    output.mkdir(parents=True, exist_ok=True)
    for notebook, params in zip(CHAIN, parameters):
        print(f"[notebook] {notebook} -> {output / notebook}", flush=True)
        papermill.execute_notebook(str(NOTEBOOKS / notebook), str(output / notebook), parameters=params,
                                   kernel_name="python3", cwd=str(NOTEBOOKS.parent), progress_bar=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the notebooks headless with papermill, chained.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--output", type=Path, default=Path("outputs/notebooks"), help="executed notebooks")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs"), help="prepared data, checkpoints, MLflow store")
    parser.add_argument("--model", help="override the model of every notebook")
    parser.add_argument("--dataset", help="override the data-preparation source")
    args = parser.parse_args(argv)
    from papermill.exceptions import PapermillExecutionError

    try:
        run_chain(args.profile, args.output, args.work_dir.resolve(), args.model, args.dataset)
    except PapermillExecutionError as err:
        print(f"error: notebook failed in cell {err.exec_count}: {err.ename}: {err.evalue}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
