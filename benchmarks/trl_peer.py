"""Our training step against Hugging Face TRL's SFTTrainer, side by side in one process.

    python benchmarks/trl_peer.py           # SmolLM2-135M-Instruct + LoRA, real cleaned E2E rows, bf16, 3 repeats
    python benchmarks/trl_peer.py --quick   # a few steps, one repeat: keeps the script working (CI)

Same model (loaded the same way, bf16 frozen base), same LoRA (r 8, alpha 16, dropout 0, every
linear layer), same rows in the same seeded order, batch size, steps, learning rate, dtype and CPU
threads and attention (`--attn_implementation`: transformers' default SDPA, or eager, which
fine_tune picks for bf16 on a CPU); gradient checkpointing off for both (TRL's default is on: it
saves memory, not time).
TRL gets the data as its docs recommend for prompt-completion tasks: conversational `prompt`
(system instruction + user input) and `completion` (assistant target) rows, which apply the chat
template and train on the completion only (`completion_only_loss`). Its `padding_free=True` and
`packing=True` need FlashAttention's variable-length kernels to keep rows apart, which do not
exist on CPU; they are not run here (`--padding_free` tries it anyway).

Prints `useful_tokens_per_s: ours X, trl Y, ratio R` and `seconds_per_step: ...` (medians over the
repeats, min..max); useful tokens are the task's target tokens (the same count for both).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import E2E, LORA, summary, train_seconds, training_setup  # noqa: E402  (a sibling script)


def trl_seconds(model_source: str, rows, task, tokenizer, args) -> float:
    """train_runtime of TRL's SFTTrainer on `rows` (a fresh model: SFTTrainer wraps it in place)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from databricks_llm import models

    conversational = Dataset.from_list([
        {"prompt": [{"role": "system", "content": task.instruction}, {"role": "user", "content": r["input"]}],
         "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
    model = models.load_model(model_source, dtype=torch.bfloat16 if args.bf16 else None,
                              attn_implementation=args.attn_implementation)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                           learning_rate=2e-4, report_to="none", save_strategy="no", logging_steps=10_000,
                           disable_tqdm=True, bf16=args.bf16, use_cpu=not torch.cuda.is_available(), seed=0,
                           max_length=256, completion_only_loss=True, gradient_checkpointing=False,
                           padding_free=args.padding_free)
        trainer = SFTTrainer(model=model, args=config, train_dataset=conversational, processing_class=tokenizer,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **LORA))
        return trainer.train().metrics["train_runtime"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--dataset", default=str(E2E) if E2E.exists() else "embedded:e2e-sample")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"], help="for both trainers")
    parser.add_argument("--padding_free", action="store_true", help="also ask TRL for padding-free batches")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, not the speed")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.batch_size = 2, 1, 2
    from databricks_llm import data

    print(f"[trl] model {args.model}, data {args.dataset}, batch {args.batch_size}, {args.steps} steps, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.attn_implementation} attention, {torch.get_num_threads()} threads",
          flush=True)
    setup = training_setup(args, args.steps * args.batch_size, shuffle=True)
    tokenizer, task, rows, ours_rows, model = setup.tokenizer, setup.task, setup.raw, setup.tokenized, setup.model
    model.get_base_model().set_attn_implementation(args.attn_implementation)
    useful = sum(sum(1 for label in r["labels"] if label != -100) for r in ours_rows)
    collate = data.collator(model, tokenizer)
    train_seconds(model, ours_rows.select(range(args.batch_size)), collate, args)  # warm-up, untimed
    trl_seconds(args.model, rows.select(range(args.batch_size)), task, tokenizer, args)
    ours, trl = [], []
    for _ in range(args.repeats):
        trl.append(trl_seconds(args.model, rows, task, tokenizer, args))
        ours.append(train_seconds(model, ours_rows, collate, args))
    summary("useful_tokens_per_s", [useful / s for s in ours], [useful / s for s in trl], " tok/s")
    summary("seconds_per_step", [s / args.steps for s in ours], [s / args.steps for s in trl], " s",
            higher_is_better=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
