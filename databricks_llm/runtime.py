"""Process-level setup: distributed env, backends and hardware checks.

Users launch the same module with `python -m`, `deepspeed --module`, torchrun or Spark; this is
where the differences are absorbed so that nothing special has to be passed on the command line.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from databricks_llm.errors import InputError, first_line

log = logging.getLogger(__name__)

if not torch.cuda.is_available():  # said explicitly, or DeepSpeed prints "Setting accelerator to CPU" in every process
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_distributed_env_defaults() -> None:
    """Give a plain `python -m` run the env a 1-rank launcher would set (DeepSpeed wants it)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_process_group(use_deepspeed: bool) -> None:
    """Start the process group early so ZeRO-3 can shard at model creation (gloo on CPU)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)  # wraps a group accelerate may have made
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)


def leave() -> None:
    """End of a job that went well: wait for every rank (rank 0 is the last to finish, it logs the
    final model), then close the process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code`. A rank of a job (WORLD_SIZE set by its launcher, or by
    `set_distributed_env_defaults`) skips the interpreter's teardown: gloo's worker threads outlive
    `destroy_process_group` (DeepSpeed's groups and ZeRO-3's parameters still hold the groups), and
    destroying them during teardown sometimes aborted a job that had gone well ("terminate called
    without an active exception", exit -6, one CI run in several). Python's exit handlers (MLflow's,
    temporary folders') still run first."""
    if "WORLD_SIZE" not in os.environ:
        sys.exit(code)
    atexit._run_exitfuncs()  # what interpreter teardown would have run, in the same order
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class Process:
    """This process's place in the job, computed once from what torchrun, deepspeed or Spark's
    distributors set (a plain `python -m` run is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def current(cls) -> Process:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")), world_size=world,
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world))

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that tracks the job and writes its final model."""
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @property
    def nodes(self) -> int:
        return max(self.world_size // self.local_world_size, 1)


def start(use_deepspeed: bool) -> Process:
    """Join the job's process group (before the model exists: ZeRO-3 shards at creation) and say
    where this process stands in it."""
    if use_deepspeed:
        set_distributed_env_defaults()
    init_process_group(use_deepspeed)
    return Process.current()


def broadcast(value, device: torch.device):
    """Rank 0's `value` on every rank of the process group."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=device)
    return box[0]


def check_precision(fp16: bool, bf16: bool) -> None:
    """Refuse mixed-precision flags the hardware cannot honour, with the reason."""
    if fp16 and bf16:
        raise InputError("--fp16 and --bf16 are mutually exclusive; pick one")
    if fp16 and not torch.cuda.is_available():
        raise InputError("--fp16 needs a CUDA GPU (none found); drop the flag")
    if bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise InputError("--bf16 is not supported by this GPU; use --fp16")
    if bf16:
        warn_if_bf16_is_slow("--bf16")


def cpu_bf16_is_slow() -> bool:
    """True on an x86 CPU without AVX512-BF16 or AMX (and no GPU), where bf16 matrix products take a
    fallback path: on one 2-core AVX2 machine 0.9 GFLOP/s against 55 in float32 (docs/benchmarks.md)."""
    import platform

    return (not torch.cuda.is_available() and platform.machine().lower() in ("x86_64", "amd64")
            and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def warn_if_bf16_is_slow(flag: str) -> None:
    """A job asked for bf16 where it runs many times slower than float32: it still runs, but says so
    (once, from rank 0: every rank of a launched job parses the same flags)."""
    if Process.current().is_main and cpu_bf16_is_slow():
        log.warning(f"warning: {flag} on this CPU (no AVX512-BF16 or AMX) runs bf16 matrix products many times slower "
                    "than float32; leave it off here")


def check_4bit() -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU; say so before anything heavy starts."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_4bit needs the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        raise InputError("--use_4bit needs a CUDA GPU for bitsandbytes 4-bit kernels (none found)")


def check_liger_kernel() -> None:
    """`--use_liger_kernel` (fused RMSNorm, SwiGLU, RoPE and linear cross-entropy for Llama, Mistral,
    Qwen and the other families liger-kernel lists) needs the liger-kernel package, whose kernels are triton's: a CUDA GPU. Not in requirements.txt:
    it brings triton, which CPU installs do not need (benchmarks/gpu_wheels.sh fetches it)."""
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise InputError("--use_liger_kernel needs the liger-kernel package (pip install liger-kernel; it brings triton)")
    if not torch.cuda.is_available():
        raise InputError("--use_liger_kernel needs a CUDA GPU (its kernels are triton's; none found)")


def check_deepspeed_config(path: str, training: Any) -> None:
    """The DeepSpeed JSON is an object, its ZeRO section passes DeepSpeed's own config model, and
    its batch, accumulation, precision and optimizer values agree with the flags (transformers'
    own comparison, which otherwise fails only once the model is loaded)."""
    from pydantic import ValidationError

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--deepspeed_config {path} does not exist")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--deepspeed_config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InputError(f"--deepspeed_config {path} must hold a JSON object, not a {type(config).__name__}")
    from deepspeed.runtime.zero.config import get_zero_config
    from transformers.integrations import deepspeed as hf_deepspeed

    try:
        get_zero_config(config)
    except (ValidationError, TypeError, ValueError) as err:
        raise InputError(f"--deepspeed_config {path}: zero_optimization: {_first_problem(err)}") from None
    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # creating the config below registers it globally
    try:
        synced = hf_deepspeed.HfTrainerDeepSpeedConfig(config)
        synced.trainer_config_process(training)
    except (TypeError, ValueError, AttributeError) as err:
        raise InputError(f"--deepspeed_config {path}: {_first_problem(err)}") from None
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live
    if synced.mismatches:
        raise InputError(f"--deepspeed_config {path} contradicts the flags: {synced.mismatches[0].lstrip('- ')} "
                         "(set it to \"auto\" or change the flag)")


STALE_BUILD_LOCK_MINUTES = 10  # DeepSpeed's CPU ops build in under a minute here, CUDA ones in a few


def check_op_build_locks() -> None:
    """DeepSpeed compiles its ops (fused and CPU Adam, shared-memory comms) on first use under
    torch's extensions folder, holding a `lock` file there while it builds. A build killed part-way
    leaves the file behind and every later job waits on it forever without a word (seen here: test
    runs hung on one). A lock older than any build takes is refused here, naming the file to delete."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            minutes = (time.time() - lock.stat().st_mtime) / 60
        except FileNotFoundError:  # the build it belonged to just finished
            continue
        if minutes >= STALE_BUILD_LOCK_MINUTES:
            raise InputError(f"{lock} is {minutes:.0f} minutes old: a DeepSpeed op build was killed part-way and "
                             "every job would wait on it forever; delete that file and rerun")


def _first_problem(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']} (got {first.get('input')!r})"
    return first_line(err)


class Stop:
    """SIGTERM and Ctrl-C, handled so that a job always ends, and ends its MLflow run.

    An exception raised from a signal handler lands wherever the main thread happens to be, and
    can leave a library lock held (seen: the `logging` module's, after which ending the MLflow run
    waited forever on the system-metrics thread). So while `deferring` (the training loop), the
    first signal is only recorded, and `check()` raises at the next step boundary; elsewhere, and
    on a second signal, the job unwinds at once. Either way the process is gone `seconds` after
    the first signal (`exit_within`).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds, self.signum, self.deferring = seconds, None, False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            exit_within(self.seconds, 128 + signum)
            self.signum = signum
            if self.deferring:
                return
        self._raise(signum)

    def check(self) -> None:
        """At a safe point: unwind if a signal came (KILLED run; exit 143 or 130)."""
        if self.signum is not None:
            log.info(f"[stop] {signal.Signals(self.signum).name}: stopping after step")
            self._raise(self.signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def exit_within(seconds: float, code: int) -> None:
    """Make sure the process exits with `code` at most `seconds` from now, even if a non-daemon
    thread (a stuck upload, a logging queue waiting on a dead server) would keep it alive."""
    def force() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
