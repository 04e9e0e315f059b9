"""Run the fine-tuning job across a Spark cluster with TorchDistributor or DeepspeedTorchDistributor.

In a notebook attached to the cluster (Databricks: the notebook's own Spark session):

    from databricks_llm.distributed import run_on_spark
    run_on_spark(["--output_dir=/Volumes/main/default/llm/checkpoints", "--model=meta-llama/Llama-2-7b-hf"],
                 num_processes=16, nnodes=2, local_mode=False, use_gpu=True,
                 deepspeed_config="ds_configs/ds_zero_3.json")

From a shell (starts a Spark session; --master as for spark-submit):

    python -m databricks_llm.distributed --num_processes=2 --master=local[2] [--local_mode=false]
        [--deepspeed_config=ds_configs/ds_zero_2.json] -- --max_steps=10 [any fine_tune flag]

The distributors start torchrun on this package's `fine_tune.py` as a file; the DeepSpeed one
appends `--deepspeed --deepspeed_config PATH`, which `fine_tune` accepts as is.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from databricks_llm import logs
from databricks_llm.errors import InputError, exit_code
from databricks_llm.validation import POSITIVE, argument_parser, check_ranges

FINE_TUNE_FILE = str(Path(__file__).with_name("fine_tune.py"))
# Tracking target, credentials and hub/cache settings the training processes need. Spark tasks
# do not inherit the driver's environment, so these are set in each task before torchrun starts.
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "DATABRICKS_", "HF_", "TOKENIZERS_", "TORCH_EXTENSIONS_DIR")
PATH_FLAGS = ("--output_dir", "--final_model_output_path", "--logging_dir", "--model", "--tokenizer", "--dataset",
              "--resume_from_checkpoint")


def absolute_paths(args: list[str]) -> list[str]:
    """Make relative paths in path flags absolute: Spark tasks run in their own working folders.

    Output paths always; input paths only when they exist here (otherwise they are hub ids); an
    `--instruction=@file` when the file exists here.
    """
    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name not in (*PATH_FLAGS, "--instruction"):
            continue
        index, value = (i, value) if eq else (i + 1, out[i + 1] if i + 1 < len(out) else "")
        prefix = "@" if name == "--instruction" else ""
        if not value.startswith(prefix):
            continue
        path = Path(value[len(prefix):])
        is_output = name in PATH_FLAGS[:3]
        if value and not path.is_absolute() and (is_output or path.exists()) and value.lower() != "true":
            out[index] = (f"{name}=" if eq else "") + prefix + str(path.resolve())
    return out


def run_on_spark(args: list[str], *, num_processes: int, nnodes: int = 1, local_mode: bool = True,
                 use_gpu: bool = False, deepspeed_config: str | None = None, master: str | None = None) -> None:
    """Run `fine_tune` with `args` on `num_processes` processes started by Spark.

    `local_mode=True` runs them on the driver node; `False` runs them in executors (one Spark
    task per process on CPU, per GPU group on GPU). With `deepspeed_config`, the DeepSpeed
    distributor is used (`num_processes` is split evenly over `nnodes`). Uses the active Spark
    session, else starts one on `master` (default local[*]). Bad flags raise InputError here,
    before Spark starts.
    """
    from databricks_llm import config

    if num_processes <= 0 or nnodes <= 0 or num_processes % nnodes:
        raise InputError(f"--num_processes ({num_processes}) must be a positive multiple of --nnodes ({nnodes})")
    args = absolute_paths(args)
    if deepspeed_config:
        deepspeed_config = str(Path(deepspeed_config).resolve())
    config.parse(args + (["--deepspeed_config", deepspeed_config] if deepspeed_config else []))
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    from pyspark.sql import SparkSession

    if master or SparkSession.getActiveSession() is None:
        SparkSession.builder.appName("databricks_llm.fine_tune").master(master or "local[*]").getOrCreate()
    if deepspeed_config:
        from pyspark.ml.deepspeed.deepspeed_distributor import DeepspeedTorchDistributor as Distributor

        distributor = Distributor(numGpus=num_processes // nnodes, nnodes=nnodes, localMode=local_mode,
                                  useGpu=use_gpu, deepspeedConfig=deepspeed_config)
    else:
        from pyspark.ml.torch.distributor import TorchDistributor as Distributor

        distributor = Distributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu)
    launch = Distributor._run_training_on_pytorch_file

    def launch_with_env(input_params: dict, train_path: str, *argv: str) -> None:
        os.environ.update(env)
        launch(input_params, train_path, *argv)

    # `run` would launch without the environment; `_run` is the same call with the launcher given.
    distributor._run(FINE_TUNE_FILE, launch_with_env, *args)


RANGES = {"num_processes": POSITIVE, "nnodes": POSITIVE}


@dataclass
class LaunchArguments:
    num_processes: int = field(default=2, metadata={"help": "Training processes in all."})
    nnodes: int = field(default=1, metadata={"help": "Nodes they are spread over."})
    local_mode: bool = field(default=True, metadata={"help": "Run the processes on the driver (false: in executors)."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per process."})
    deepspeed_config: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config: use the DeepSpeed distributor."})
    master: str | None = field(default=None, metadata={"help": "Spark master URL, as for spark-submit (default: local[*])."})


def main(argv: list[str] | None = None) -> int:
    """Shell entry point: `run_on_spark` with the flags after `--`."""
    logs.setup()
    argv = sys.argv[1:] if argv is None else argv
    ours, job = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])

    def run() -> None:
        (args,) = argument_parser(LaunchArguments, description=__doc__.split("\n")[0]).parse_args_into_dataclasses(args=ours)
        check_ranges(args, RANGES)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter, with its packages
        run_on_spark(job, num_processes=args.num_processes, nnodes=args.nnodes, local_mode=args.local_mode,
                     use_gpu=args.use_gpu, deepspeed_config=args.deepspeed_config, master=args.master)

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
