"""Peak memory and time of the notebook chain, as a user on a small machine runs it.

    python benchmarks/demo_memory.py --profile=demo     # make demo's chain (DeepSpeed ZeRO-2 on CPU)
    python benchmarks/demo_memory.py --profile=free     # Free Edition profile: no DeepSpeed launcher

Runs `python -m databricks_llm.notebook --profile=...` and samples the resident memory of its
whole process tree (runner, notebook kernels, launcher, training ranks) every 0.2 s. Prints the
peak of the tree's summed RSS (what the machine must hold at once), the largest single process,
and the wall time. Goal (issue #12): the chain under 6 GiB peak on the embedded model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(sum, max) RSS in bytes over `root` and its descendants, skipping ones that just exited."""
    sizes = []
    for process in [root, *root.children(recursive=True)]:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.Error:
            continue
    return sum(sizes), max(sizes, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="demo", help="a profile of databricks_llm.notebook (ci, demo, free, full)")
    parser.add_argument("--limit_gib", type=float, default=6.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "databricks_llm.notebook", f"--profile={args.profile}",
                   f"--output={work}/executed", f"--work_dir={work}/outputs"]
        start = time.time()
        chain = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root = psutil.Process(chain.pid)
        peak_sum = peak_one = 0
        while chain.poll() is None:
            total, largest = tree_rss(root)
            peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
            time.sleep(0.2)
        seconds = time.time() - start
        if chain.returncode != 0:
            print(chain.stderr.read()[-3000:], file=sys.stderr)
            return chain.returncode
    verdict = "under" if peak_sum < args.limit_gib * GIB else "OVER"
    print(f"chain {args.profile}: peak RSS of the process tree {peak_sum / GIB:.2f} GiB ({verdict} the "
          f"{args.limit_gib:g} GiB limit), largest process {peak_one / GIB:.2f} GiB, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
