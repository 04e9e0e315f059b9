"""Scoring speed: the decoder's levers, each removed in turn, against the baseline, same rows, same process.

    python benchmarks/scoring.py --model=outputs/bench_quality/checkpoints/final_model   # 200 test rows
    python benchmarks/scoring.py --model=... --rows=1000 --variants=today,wide,uncopied,free128,hf128

The baseline is how `evaluate` generated when issue #17 was filed: transformers' `generate` in
batches of 32, free decoding, every row stepping until its batch's longest ends. The other variants
go through `generation.generate`'s public options only:

- `today`: what `evaluate` runs (batch 128, structured decoding, narrow projection);
- `wide`: today without the narrow projection (`narrow=0`: every step projects onto the whole vocabulary);
- `uncopied`: today without holding copied fields to the input's text (the schema's `copied` emptied);
- `batch32`: today in batches of 32;
- `free128`: the decoder without structured decoding; `hf128`: transformers' `generate` at batch 128,
  free (so `hf128` against `free128` is what the decoder's own loop is worth: rows leave the batch
  as they end, and the projection's input is contiguous).

Untimed runs of `today` first compute the format's states (what a long-lived process has done
after its first rows); `--cold` skips them and runs each variant once, in the order given. Variants
run in turn, then in reverse order (`--repeats`), medians reported, with the speed-up against the
baseline and how many outputs differ from `--reference`'s. `--outputs_json` writes every variant's
outputs, to compare with another version's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
E2E = REPO.parent / "shared" / "data" / "e2e_nlg" / "cleaned"

VARIANTS = {  # name -> generate() options, or None for transformers' generate (with its batch size)
    "baseline": {"hf_batch": 32},
    "hf128": {"hf_batch": 128},
    "free128": {"batch_size": 128, "structured": False},
    "batch32": {"batch_size": 32},
    "wide": {"batch_size": 128, "narrow": 0.0},
    "uncopied": {"batch_size": 128, "uncopied": True},
    "today": {"batch_size": 128},
}


def hf_generate(model: object, tokenizer: object, inputs: list[str], task: object, max_tokens: int,
                batch: int) -> list[str]:
    """Free greedy decoding by transformers' `generate`, left-padded batches in input order."""
    import torch

    from databricks_llm.data import build_prompts

    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(inputs), batch):
        encoded = tokenizer(build_prompts(tokenizer, inputs[start:start + batch], task), return_tensors="pt",
                            padding=True, add_special_tokens=False)
        with torch.no_grad():
            new = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[:, encoded["input_ids"].shape[1]:]
        outputs += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="a fine-tuned model folder (or any evaluate --model_uri)")
    parser.add_argument("--dataset", default=str(E2E))
    parser.add_argument("--rows", type=int, default=200, help="the first N test rows; 0: the whole split")
    parser.add_argument("--max_tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variants", default="free128,hf128,today", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="each variant runs 2 x repeats times, orders alternating")
    parser.add_argument("--reference", default="baseline", help="the variant whose outputs the 'differ' column compares with")
    parser.add_argument("--cold", action="store_true", help="no warm-up and one pass, in the order given, the baseline last")
    parser.add_argument("--outputs_json", default=None, help="write each variant's outputs here")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v and v != "baseline"]
    names = [*variants, "baseline"] if args.cold else ["baseline", *variants]
    if args.reference not in names:
        names.append(args.reference)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {', '.join(unknown)} (choose from {', '.join(VARIANTS)})", file=sys.stderr)
        return 2

    from databricks_llm import constraints, data, models
    from databricks_llm.evaluate import load_scorable, task_of
    from databricks_llm.formats import of
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

    def run(options: dict) -> list[str]:
        options = dict(options)
        if "hf_batch" in options:
            return hf_generate(model, tokenizer, inputs, task, args.max_tokens, options["hf_batch"])
        held = uncopied if options.pop("uncopied", False) else task
        return generate(model, tokenizer, inputs, task=held, max_tokens=args.max_tokens, **options)

    for options in [] if args.cold else [o for o in map(VARIANTS.get, names) if o.get("structured", "hf_batch" not in o)]:
        run(options)  # untimed: the format's states, as a long-lived process knows them
    seconds: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[str]] = {}
    for repeat in range(1 if args.cold else 2 * args.repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            outputs[name] = run(VARIANTS[name])
            seconds[name].append(time.perf_counter() - start)
            print(f"[scoring] {name}: {seconds[name][-1]:.1f}s", flush=True)
    if args.outputs_json:
        Path(args.outputs_json).write_text(json.dumps(outputs, ensure_ascii=False, indent=1))
    base = statistics.median(seconds["baseline"])
    print(f"{len(inputs)} rows of {args.dataset} test, {args.dtype}, max_tokens {args.max_tokens}; "
          f"{'cold: one pass, no warm-up; ' if args.cold else ''}'differ': outputs unlike {args.reference}'s")
    print(f"{'variant':<12}{'median s':>10}{'min..max':>16}{'speed-up':>10}{'differ':>8}{'F1':>8}{'exact':>8}")
    for name in names:
        s = score(of(task.output_format), outputs[name], references)
        differ = [i for i, (a, b) in enumerate(zip(outputs[name], outputs[args.reference])) if a != b]
        print(f"{name:<12}{statistics.median(seconds[name]):>10.1f}{min(seconds[name]):>8.1f}..{max(seconds[name]):<6.1f}"
              f"{base / statistics.median(seconds[name]):>10.2f}{len(differ):>8}{s['f1']:>8.4f}{s['exact_match']:>8.4f}")
        for i in differ[:5]:
            print(f"    row {i}: {args.reference} {outputs[args.reference][i]!r}\n"
                  f"    {'':>{len(str(i)) + 5}}{name} {outputs[name][i]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
