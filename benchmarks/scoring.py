"""Scoring speed: today's generation settings against the previous ones on the same rows, same process.

    python benchmarks/scoring.py --model=outputs/bench_quality/checkpoints/final_model   # 200 test rows: today vs baseline
    python benchmarks/scoring.py --model=... --rows=200 --variants=prefix,batch64,structured

The baseline is how `evaluate` generated when issue #17 was filed (batch 32, every prompt computed
in full, free decoding, and the vocabulary projection fed a strided slice on the first step, which
torch turns into a batched product over a copy of the weight per row; `generation._contiguous_head_input`
has removed that since), and transformers' `generate` running every row of a batch until its longest
ends (`generation._greedy` drops finished rows since). Variants with `STRIDED` or `HF_LOOP` set run with
that old first step or loop, `uncopied` without holding copied fields to the input's text
(`constraints._Copy`), `wholevocab` with the vocabulary projection over every token at every step
(`generation.NARROW_PROJECTION_AT_MOST` 0), and `enforcer` with each state's tokens computed by
lm-format-enforcer when a row first reaches the state (`EnforcerRegex`) instead of outlines-core's
index of them all, so that each lever is measured alone. Each variant generates for the
same rows in the same dtype; the script prints seconds, the speed ratio against the baseline, and
how many outputs differ from the baseline's (greedy decoding: they should not; a few can where
bf16 rounding differs between batch shapes, and those rows are printed). Untimed runs of
`today` over the rows (one per format the variants use) first compute the formats' states (what a long-lived process has done after
its first rows). Variants run in turn, then again in reverse order (`--repeats`), medians reported.
`--cold` measures what a fresh `evaluate` process meets instead: no warm-up and one pass in the order
given, so the first variant that uses a format computes its states (and the tokenizer's view of the
vocabulary) inside its timed run:

    python benchmarks/scoring.py --model=... --rows=0 --variants=today --cold   # the whole split, ours first
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
E2E = REPO.parent / "shared" / "data" / "e2e_nlg" / "cleaned"

STRIDED = "strided_head"  # not a generate() setting: run with the vocabulary projection's old strided input
HF_LOOP = "hf_generate"  # not a generate() setting: greedy decoding by transformers' generate, as before
UNCOPIED = "uncopied"  # not a generate() setting: the task's copied fields left free (structured decoding before they were)
WHOLE_VOCAB = "whole_vocabulary"  # not a generate() setting: every step projects onto the whole vocabulary, as before
ENFORCER = "enforcer"  # not a generate() setting: the format's states by lm-format-enforcer, as before outlines-core
VARIANTS = {  # name -> generate() settings
    "baseline": {"batch_size": 32, "reuse_prefix": False, "structured": False, STRIDED: True, HF_LOOP: True},
    "prefix": {"batch_size": 32, "structured": False, STRIDED: True, HF_LOOP: True},
    "batch64": {"batch_size": 64, "structured": False, STRIDED: True, HF_LOOP: True},
    "batch128": {"batch_size": 128, "structured": False, STRIDED: True, HF_LOOP: True},
    "structured": {"batch_size": 32, "structured": True, STRIDED: True, HF_LOOP: True},
    "contiguous": {"batch_size": 32, "structured": False, HF_LOOP: True},
    "contiguous128": {"batch_size": 128, "structured": False, HF_LOOP: True},
    "dropping128": {"batch_size": 128, "structured": False},  # finished rows leave the batch
    "generate128": {"batch_size": 128, "structured": True, HF_LOOP: True},  # evaluate before rows left the batch
    "uncopied": {"batch_size": 128, "structured": True, UNCOPIED: True},  # today before values were copied
    "wholevocab": {"batch_size": 128, "structured": True, WHOLE_VOCAB: True},  # today before the narrow projection
    "enforcer": {"batch_size": 128, "structured": True, ENFORCER: True},  # today before outlines-core's index
    "today": {"batch_size": 128, "structured": True},  # what quality.py's scoring runs now
}


def enforcer_regex() -> type:
    """The format's states as structured decoding found them before outlines-core: lm-format-enforcer's
    regular-expression parser, each state's tokens computed when a row first reaches it."""
    from lmformatenforcer import RegexParser

    from databricks_llm import constraints

    class EnforcerRegex(constraints._EnforcerFormat):
        def __init__(self, expression: str, tokenizer: object) -> None:
            super().__init__(tokenizer)
            self.parser = RegexParser(expression)

    return EnforcerRegex


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a fine-tuned model folder (or any evaluate --model_uri)")
    parser.add_argument("--dataset", default=str(E2E))
    parser.add_argument("--rows", type=int, default=200, help="the first N test rows; 0: the whole split")
    parser.add_argument("--max_tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variants", default="contiguous128,dropping128,generate128,today",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="each variant runs 2 x repeats times, orders alternating")
    parser.add_argument("--reference", default="baseline", help="the variant whose outputs the 'differ' column compares with")
    parser.add_argument("--cold", action="store_true",
                        help="no warm-up and one pass, the variants in the order given and the baseline last")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v and v != "baseline"]
    names = [*variants, "baseline"] if args.cold else ["baseline", *variants]
    if args.reference not in names:
        names.append(args.reference)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {', '.join(unknown)} (choose from {', '.join(VARIANTS)})", file=sys.stderr)
        return 2

    from databricks_llm import constraints, data, generation, models
    from databricks_llm.evaluate import load_scorable, task_of
    from databricks_llm.generation import generate
    from databricks_llm.scoring import score

    task = task_of(args.model)
    splits, task = data.load(args.dataset, task, columns_hint=True, need_train=False)
    schema = constraints.task_schema(task)
    uncopied = dataclasses.replace(task, schema=dataclasses.replace(schema, copied=()).to_json()) if schema else task
    rows = data.head(splits["test"], args.rows)
    inputs, references = rows[data.INPUT], rows[data.OUTPUT]
    model, tokenizer = load_scorable(args.model)
    model = model.to(models.inference_dtype(args.dtype)).eval()
    enforced = {}  # task -> its Constraint with lm-format-enforcer's states, kept like `constraints.for_task`'s

    def by_enforcer(tokenizer: object, held: object) -> object:
        if held not in enforced:
            with mock.patch.object(constraints, "_IndexFormat", enforcer_regex()):
                enforced[held] = constraints.Constraint(tokenizer, held.output_format, constraints.task_schema(held))
        return enforced[held]

    def run(settings: dict) -> list[str]:
        settings = dict(settings)
        head = contextlib.nullcontext if settings.pop(STRIDED, False) else generation._contiguous_head_input
        loop = (functools.partial(generation._transformers_generate, do_sample=False)
                if settings.pop(HF_LOOP, False) else generation._greedy)
        held = uncopied if settings.pop(UNCOPIED, False) else task
        narrow = 0.0 if settings.pop(WHOLE_VOCAB, False) else generation.NARROW_PROJECTION_AT_MOST
        states = by_enforcer if settings.pop(ENFORCER, False) else constraints.for_task
        with (mock.patch.object(generation, "_contiguous_head_input", head),
              mock.patch.object(generation, "_greedy", loop),
              mock.patch.object(generation, "NARROW_PROJECTION_AT_MOST", narrow),
              mock.patch.object(constraints, "for_task", states)):
            return generate(model, tokenizer, inputs, task=held, max_tokens=args.max_tokens, **settings)

    # warm-up, untimed: today's settings over every row with each format the variants use, so that no timed
    # variant computes a format's states for the others (whichever ran first used to pay for them all)
    formats = {(v.get(UNCOPIED, False), v.get(ENFORCER, False)): v for v in map(VARIANTS.get, names) if v["structured"]}
    for uncopied_, enforcer_ in [] if args.cold else formats:
        run({**VARIANTS["today"], UNCOPIED: uncopied_, ENFORCER: enforcer_})
    seconds: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[str]] = {}
    for repeat in range(1 if args.cold else 2 * args.repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            outputs[name] = run(VARIANTS[name])
            seconds[name].append(time.perf_counter() - start)
            print(f"[scoring] {name}: {seconds[name][-1]:.1f}s", flush=True)
    base = statistics.median(seconds["baseline"])
    print(f"{len(inputs)} rows of {args.dataset} test, {args.dtype}, max_tokens {args.max_tokens}; "
          f"{'cold: one pass, no warm-up; ' if args.cold else ''}'differ': outputs unlike {args.reference}'s")
    print(f"{'variant':<12}{'median s':>10}{'min..max':>16}{'speed-up':>10}{'differ':>8}{'F1':>8}{'exact':>8}")
    for name in names:
        s = score(task.output_format, outputs[name], references)
        differ = [i for i, (a, b) in enumerate(zip(outputs[name], outputs[args.reference])) if a != b]
        print(f"{name:<12}{statistics.median(seconds[name]):>10.1f}{min(seconds[name]):>8.1f}..{max(seconds[name]):<6.1f}"
              f"{base / statistics.median(seconds[name]):>10.2f}{len(differ):>8}{s['f1']:>8.4f}{s['exact_match']:>8.4f}")
        for i in differ[:5]:
            print(f"    row {i}: {args.reference} {outputs[args.reference][i]!r}\n"
                  f"    {'':>{len(str(i)) + 5}}{name} {outputs[name][i]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
