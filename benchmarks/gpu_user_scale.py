"""One training-speed measurement at user scale on a GPU: a random-weight model of a real shape,
one trainer, timed windows; appends one JSON line to --results (benchmarks/gpu.sh prints the table).

    python benchmarks/gpu_user_scale.py --shape=llama-2-7b --trainer=ours --results=/tmp/r.jsonl
    python benchmarks/gpu_user_scale.py --shape=llama-3-8b --trainer=ours --memory_gb=24 --max_seq_length=512 ...

Trainers, all LoRA r 8 on every linear layer (or --use_4bit QLoRA), bf16, the same rows (real
cleaned E2E from ../shared/data/e2e_nlg beside the repository, or --dataset, else the embedded sample):
  ours              fine_tune's pieces: the memory plan's token budget and checkpointing for this GPU,
                    packed padding-free batches (databricks_llm/batching.py), FlashAttention varlen
                    where installed else FlexAttention, logits at target positions only
  seed              the seed pipeline: rows padded to 256 tokens, loss on every token, batch 16
  trl               TRL's SFTTrainer with its defaults (prompt-completion rows, batch 8)
  trl_packing       SFTTrainer with packing=True (its BFD packing, padding-free), same attention as ours
  trl_padding_free  SFTTrainer with padding_free=True, same attention as ours
Time per step depends on shapes, not weight values (benchmarks/gpu_random_model.py). Each repeat
trains until --warmup_steps are done, then times a window of at least --seconds; useful tokens are
target tokens (what the task learns), counted from the batches each trainer builds. MFU counts 4N
(LoRA) FLOPs per non-pad token plus attention and the vocabulary projection at target positions
(benchmarks/speed.py `flops_of`), against --peak_tflops (measured by `gpu.sh part peak`).
Without CUDA it stops at once with one `error:` line, exit 2 (`--allow_cpu` with --shape=tiny: the
CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_random_model import SHAPES, save_shape  # noqa: E402  (sibling scripts)
from speed import E2E, LORA, flops_of, seed_style  # noqa: E402

TRAINERS = ("ours", "seed", "trl", "trl_packing", "trl_padding_free")


class Window:
    """Counts what each collated batch holds and times a window of optimizer steps after a warm-up."""

    def __init__(self, warmup_steps: int, seconds: float, cuda: bool) -> None:
        self.warmup_steps, self.seconds, self.cuda = warmup_steps, seconds, cuda
        self.useful = self.tokens = self.squares = 0
        self.start: tuple[float, int, int, int] | None = None
        self.result: dict | None = None

    def counting(self, collate, useful_of=None):
        """`collate` that also counts target, non-pad and squared example lengths of its batches."""
        def wrapped(features):
            extra = [f.pop("n_target", None) for f in features]
            batch = collate(features)
            labels = batch["labels"]
            if "position_ids" in batch and "attention_mask" not in batch:  # packed: examples restart at 0
                starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
                lengths = [b - a for a, b in zip(starts, starts[1:])]
            else:
                lengths = batch["attention_mask"].sum(1).tolist()
            self.useful += sum(extra) if extra[0] is not None else int((batch.get("shift_labels", labels) != -100).sum())
            self.tokens += sum(lengths)
            self.squares += sum(n * n for n in lengths)
            return batch
        return wrapped

    def callback(self):
        from transformers import TrainerCallback

        window = self

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if window.cuda:
                    torch.cuda.synchronize()
                now = (time.perf_counter(), window.useful, window.tokens, window.squares)
                if state.global_step == window.warmup_steps:
                    window.start = now
                elif window.start and now[0] - window.start[0] >= window.seconds:
                    seconds = now[0] - window.start[0]
                    window.result = {"seconds": seconds, "steps": state.global_step - window.warmup_steps,
                                     **{k: now[i] - window.start[i] for i, k in
                                        ((1, "useful"), (2, "tokens"), (3, "squares"))}}
                    control.should_training_stop = True
        return Timer()


def build_model(shape: str, attention: str, device: str, use_4bit: bool, folder: Path):
    """A random-weight bf16 model of `shape` built on `device` (or, for 4-bit, saved once and loaded
    quantized by bitsandbytes), LoRA-wrapped as fine_tune does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from databricks_llm import models

    config = AutoConfig.from_pretrained(save_shape(shape, str(folder / "config")), attn_implementation=attention)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if use_4bit:
        model.save_pretrained(folder / "weights")
        del model
        torch.cuda.empty_cache()
        model = models.load_model(str(folder / "weights"), use_4bit=True, dtype=torch.bfloat16, attn_implementation=attention)
    return model


def lora_model(model, checkpointing: bool, use_4bit: bool):
    from databricks_llm import models

    return models.add_lora(model, r=LORA["r"], alpha=LORA["lora_alpha"], dropout=0.0, target_modules=LORA["target_modules"],
                           gradient_checkpointing=checkpointing, use_4bit=use_4bit)


def run_once(args, rows, raw, task, tokenizer, device: str) -> dict:
    """One timed window of `args.trainer`; returns its counts, seconds and peak memory."""
    from databricks_llm import batching, memory_plan, models
    from databricks_llm.data import collator

    cuda = device == "cuda"
    window = Window(args.warmup_steps, args.seconds, cuda)
    packed_attention = models.training_attention("auto", True, packed=True) if cuda else "sdpa"
    attention = "sdpa" if args.trainer in ("seed", "trl") else packed_attention
    settings = dict(num_train_epochs=100, max_steps=100_000, learning_rate=2e-4, report_to="none", save_strategy="no",
                    logging_steps=100_000, disable_tqdm=True, bf16=cuda, use_cpu=not cuda, seed=0,
                    remove_unused_columns=False, gradient_checkpointing=False)
    with tempfile.TemporaryDirectory() as scratch:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model = build_model(args.shape, attention, device, args.use_4bit, Path(scratch))
        shape = memory_plan.Shape.of(model.config.to_dict())
        if args.trainer == "ours":
            hardware = memory_plan.Hardware.current() if cuda else memory_plan.Hardware(gpu_free=0.2e9, host_ram=8e9)
            plan = memory_plan.plan(shape, hardware, memory_plan.Request(seq_len=args.max_seq_length,
                                                                         use_4bit=args.use_4bit or None))
            print(*("[memory plan] " + line for line in plan.lines), sep="\n", flush=True)
            model = lora_model(model, plan.gradient_checkpointing, args.use_4bit)
            from transformers import TrainingArguments

            trainer = batching.TokenBudgetBatches(
                model=model, args=TrainingArguments(output_dir=scratch, per_device_train_batch_size=1, **{
                    **settings, "gradient_checkpointing": plan.gradient_checkpointing}),
                train_dataset=rows, data_collator=collator(model, tokenizer), batch_tokens=plan.batch_tokens,
                callbacks=[window.callback()])
            trainer.pack = window.counting(batching.packed_batch)
        elif args.trainer == "seed":
            from transformers import Trainer, TrainingArguments, default_data_collator

            model = lora_model(model, False, args.use_4bit)
            seeded = rows.map(lambda r: {**seed_style(r, tokenizer.pad_token_id),
                                         "n_target": sum(1 for label in r["labels"] if label != -100)})
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=scratch, per_device_train_batch_size=16,
                                                                  **settings),
                              train_dataset=seeded.remove_columns(["length"]),
                              data_collator=window.counting(default_data_collator), callbacks=[window.callback()])
        else:
            trainer = trl_trainer(args, model, raw, task, tokenizer, scratch, settings, window)
        trainer.train()
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        if window.result is None:
            raise SystemExit(f"error: {args.trainer}: training ended before a {args.seconds} s window (more rows needed)")
        flops = flops_of(trainer.model, window.result["tokens"], window.result["useful"], window.result["squares"], lora=True)
        return {**window.result, "peak_memory_gb": peak / 1e9, "flops": flops}


def trl_trainer(args, model, raw, task, tokenizer, scratch: str, settings: dict, window: Window):
    """TRL's SFTTrainer on prompt-completion conversational rows (its documented format for this task)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    conversational = Dataset.from_list([
        {"prompt": [{"role": "system", "content": task.instruction}, {"role": "user", "content": r["input"]}],
         "completion": [{"role": "assistant", "content": r["output"]}]} for r in raw])
    defaults = args.trainer == "trl"  # its defaults: batch 8, gradient checkpointing on
    settings = {k: v for k, v in settings.items() if k != "remove_unused_columns" and not (defaults and k == "gradient_checkpointing")}
    config = SFTConfig(output_dir=scratch, per_device_train_batch_size=8 if defaults else 16,
                       # padding-free without packing: TRL truncates nothing and wants no max_length (E2E rows are short)
                       max_length=None if args.trainer == "trl_padding_free" else args.max_seq_length,
                       completion_only_loss=True,
                       packing=args.trainer == "trl_packing", padding_free=args.trainer == "trl_padding_free", **settings)
    trainer = SFTTrainer(model=model, args=config, train_dataset=conversational, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **LORA),
                         callbacks=[window.callback()])
    trainer.data_collator = window.counting(trainer.data_collator)
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    parser.add_argument("--trainer", choices=TRAINERS, default="ours")
    parser.add_argument("--dataset", default=str(E2E) if E2E.exists() else "embedded:e2e-sample")
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=20000, help="training rows (cycled epochs if the window needs more)")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--use_4bit", action="store_true", help="QLoRA: the base quantized by bitsandbytes")
    parser.add_argument("--memory_gb", type=float, default=None, help="cap this process's GPU memory (set_per_process_memory_fraction)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed window per repeat")
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=None, help="measured bf16 matmul peak (gpu.sh part peak)")
    parser.add_argument("--results", default=None, help="append one JSON line here")
    parser.add_argument("--label", default=None)
    parser.add_argument("--allow_cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.allow_cpu and args.shape == "tiny"):
        print("error: benchmarks/gpu_user_scale.py needs a CUDA GPU and this machine has none", file=sys.stderr)
        return 2
    if args.memory_gb and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 1e9 / total))
    import datasets

    from databricks_llm import data, models

    datasets.disable_progress_bars()
    tokenizer = models.load_tokenizer(args.tokenizer)
    splits, task = data.load(args.dataset)
    raw = data.head(splits["train"].shuffle(seed=0), args.rows)
    rows = data.tokenize_splits(datasets.DatasetDict(train=raw), tokenizer, args.max_seq_length, task)["train"]
    runs = [run_once(args, rows, raw, task, tokenizer, device) for _ in range(args.repeats)]
    useful = [r["useful"] / r["seconds"] for r in runs]
    achieved = [r["flops"] / r["seconds"] for r in runs]
    result = {"label": args.label or f"{args.shape} {args.trainer}{' 4-bit' if args.use_4bit else ''}",
              "shape": args.shape, "trainer": args.trainer, "use_4bit": args.use_4bit, "memory_gb": args.memory_gb,
              "useful_tokens_per_s": statistics.median(useful), "useful_min": min(useful), "useful_max": max(useful),
              "tflops": statistics.median(achieved) / 1e12, "window_s": min(r["seconds"] for r in runs),
              "repeats": len(runs), "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda}
    if args.peak_tflops:
        result["mfu"] = result["tflops"] / args.peak_tflops
    print(json.dumps(result), flush=True)
    if args.results:
        with open(args.results, "a") as out:
            out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
