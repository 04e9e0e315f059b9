"""How long structured decoding takes to compile a task's format over a tokenizer's vocabulary.

    python benchmarks/format_compile.py --dataset=../shared/data/snips          # 40 fields in no one order
    python benchmarks/format_compile.py --dataset=../shared/data/e2e_nlg/cleaned

Loads the dataset as `fine_tune` does (the task's schema from the training targets), then builds
the format's index over the embedded SmolLM2's vocabulary (`--model` for another tokenizer)
`--repeats` times, each from scratch, and prints the seconds of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="whose tokenizer")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from databricks_llm import constraints, data, models

    _, task = data.load(args.dataset)
    schema = constraints.task_schema(task)
    tokenizer = models.load_tokenizer(args.model)
    print(f"{args.dataset}: {task.output_format}, {len(schema.fields) if schema else 0} fields, "
          f"one order in the targets: {schema.ordered if schema else '-'}; {len(tokenizer)} tokens")
    for _ in range(args.repeats):
        constraints.for_task.cache_clear()
        start = time.perf_counter()
        constraints.for_task(tokenizer, task)
        print(f"compiled in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
