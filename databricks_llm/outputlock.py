"""One job per output folder: two jobs writing the same checkpoints, final model and run id
would silently overwrite each other (or race on the new SQLite store's schema)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from databricks_llm.errors import InputError

LOCK_FILE = ".databricks_llm.lock"
# Set by a process that holds a folder's lock for the jobs it starts (the notebook chain runner):
# a job whose lock holder has this pid runs inside that lock instead of being refused.
HOLDER_ENV = "DATABRICKS_LLM_LOCK_HOLDER"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """The job recorded in `lock`, or None when the lock is stale (its process is gone from this host)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None  # unreadable or half-written by a job killed while taking it
    if not isinstance(holder, dict):
        return None
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise InputError(f"{lock} is not a lock a job wrote (pid {pid!r}): delete it if no job is using the folder")
    if holder.get("host") == socket.gethostname() and not _alive(pid):
        return None
    return holder


def _held_for_us(holder: dict) -> bool:
    """The lock is our launcher's, taken for us (HOLDER_ENV)."""
    return holder.get("host") == socket.gethostname() and str(holder.get("pid")) == os.environ.get(HOLDER_ENV)


@contextlib.contextmanager
def hold(output_dir: str) -> Iterator[None]:
    """Hold `<output_dir>/.databricks_llm.lock` for the job (global rank 0 takes it for all ranks).

    A live holder makes this an InputError naming its pid, host and start time; a lock left by a
    killed job on this host is taken over; one held by the process named in HOLDER_ENV (the chain
    runner that started this job) is shared. The lock is removed when the job ends, and so is the
    folder if this made it and nothing else was written there.
    """
    folder = Path(output_dir)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for _ in range(3):  # a stale lock is replaced; a rival taking it meanwhile wins the next round
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and _held_for_us(holder):
                yield
                return
            if holder is not None:
                raise InputError(f"--output_dir {output_dir} is in use by another job (pid {holder.get('pid')} on "
                                 f"{holder.get('host')}, started {holder.get('started')}); wait for it, pick another "
                                 f"folder, or delete {lock} if that job is gone") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise InputError(f"--output_dir {output_dir}: could not take {lock} (another job keeps taking it)")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
            if created:
                folder.rmdir()  # only when empty: a job refused before its first write leaves no folder
