"""Speed benchmarks: our pipeline against seed-style baselines, side by side in one process.

    python benchmarks/speed.py                    # SmolLM2-135M-Instruct + LoRA, real E2E data, 3 repeats
    python benchmarks/speed.py --quick            # a few steps, one repeat: keeps the script working (CI)
    python benchmarks/speed.py --model=meta-llama/Llama-2-7b-hf --bf16 --batch_size=16   # GPU, same script

Each measure prints one line `name: ours X, baseline Y, ratio R` (medians over the repeats, with
min..max). Timings are per process, never asserted anywhere; docs/benchmarks.md records results.

1. useful_tokens_per_s   target tokens trained per second: dynamic padding, loss and logits only at
                         target positions (ours) vs padding every row to 256 tokens
                         with a full-sequence loss (the seed).
2. step_time_tracking    seconds per step with our MLflow callback, system metrics and a checkpoint
                         logged as a model every --save_steps, vs report_to=none (both save to disk).
3. checkpoint_log_s/_mb  one LoRA checkpoint logged as our MLflow model vs the stock
                         HF_MLFLOW_LOG_ARTIFACTS behaviour (the whole checkpoint folder as artifacts).
4. mfu                   achieved training FLOP/s (LoRA: 4N, full: 6N per token, the vocabulary
                         projection per target token, + attention) vs this machine's matmul peak,
                         measured here with the same dtype.
5. generation_examples_per_s  batched generation (the pyfunc/evaluate path) vs one prompt at a time;
                         pass a fine-tuned --generation_model: a base model answers in long prose.
6. lever_<name>          (--measures=levers) one change to the training step against today's default,
                         the same rows, alternated: fused AdamW, torch.compile, bf16 autocast (bf16
                         frozen weights, as fine_tune --bf16 loads them) with SDPA and with eager
                         attention (fine_tune's choice for bf16 on a CPU), micro-batches of 16 and 32,
                         the prompt start shared by every row run once per batch (bf16, eager, 8/16/32),
                         packing (each batch's rows end to end in one row, attention kept within
                         rows by transformers' packed-sequence mask) and fine_tune's --batch_tokens
                         (token-budget micro-batches in length order, packed: databricks_llm/batching.py;
                         budget --batch_tokens, default the rows' mean length x --batch_size).
                         Useful tokens/s and MFU, each against the matmul peak of its own dtype.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
E2E = REPO.parent / "shared" / "data" / "e2e_nlg" / "cleaned"
SEED_LENGTH = 256


def summary(name: str, ours: list[float], baseline: list[float], unit: str = "", higher_is_better: bool = True) -> None:
    o, b = statistics.median(ours), statistics.median(baseline)
    ratio = o / b if higher_is_better else b / o
    print(f"{name}: ours {o:.4g}{unit}, baseline {b:.4g}{unit}, ratio {ratio:.2f} "
          f"(ours {min(ours):.4g}..{max(ours):.4g}, baseline {min(baseline):.4g}..{max(baseline):.4g}, n={len(ours)})",
          flush=True)


LORA = dict(r=8, lora_alpha=16, target_modules="all-linear")  # the benchmarks' adapters


def training_setup(args, rows: int, shuffle: bool = False, lora: bool = True, lora_dropout: float = 0.0):
    """What fine_tune builds before training, for the benchmarks: the tokenizer, the dataset's splits
    and task, its first `rows` training rows raw and tokenized (after a seeded shuffle if asked), and
    the model in the benchmark's dtype, LoRA-wrapped (`LORA`) unless `lora` is false."""
    from types import SimpleNamespace

    import datasets

    from databricks_llm import data, models

    datasets.disable_progress_bars()
    tokenizer = models.load_tokenizer(args.model)
    splits, task = data.load(args.dataset)
    raw = data.head(splits["train"].shuffle(seed=0) if shuffle else splits["train"], rows)
    tokenized = data.tokenize_splits(datasets.DatasetDict(train=raw), tokenizer, 256, task)["train"]
    model = benchmark_model(args.model, torch.bfloat16 if args.bf16 else None, lora, lora_dropout)
    return SimpleNamespace(tokenizer=tokenizer, splits=splits, task=task, raw=raw, tokenized=tokenized, model=model)


def benchmark_model(source: str, dtype: torch.dtype | None, lora: bool, lora_dropout: float):
    """The model as fine_tune loads it: frozen weights in `dtype`, LoRA-wrapped (`LORA`) unless not `lora`;
    attention is transformers' default (SDPA) throughout, as when the figures in docs/benchmarks.md were
    measured (fine_tune --bf16 on a CPU trains with eager attention: measure 6's bf16_eager_attention)."""
    from databricks_llm import models

    model = models.load_model(source, dtype=dtype)
    if lora:
        model = models.add_lora(model, r=LORA["r"], alpha=LORA["lora_alpha"], dropout=lora_dropout,
                                target_modules=LORA["target_modules"], gradient_checkpointing=False, use_4bit=False)
    return model


def seed_style(row: dict, pad: int) -> dict:
    """The original pipeline's row: padded to 256 tokens, loss on every real token."""
    ids = row["input_ids"][:SEED_LENGTH]
    padding = SEED_LENGTH - len(ids)
    return {"input_ids": ids + [pad] * padding, "labels": ids + [-100] * padding,
            "attention_mask": [1] * len(ids) + [0] * padding}


def trainer(model, rows, collator, args, out: str, batch_tokens: int | None = None, **overrides):
    from transformers import TrainingArguments

    from transformers import DynamicCache

    from databricks_llm.batching import TokenBudgetBatches
    from databricks_llm.generation import cache_argument

    def prefix_cache(model, prefix: torch.Tensor):
        """Keys and values of `prefix` (token ids, 1 x P), for the rows that start with it."""
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix, use_cache=True, **{cache_argument(model): cache})
        return cache

    class PrefixSharingTrainer(TokenBudgetBatches):
        """Takes `shared_prefix_batch`'s batches too: their prefix runs once, with gradients, and
        every row attends to its keys and values."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            prefix = inputs.pop("prefix_ids", None)
            if prefix is not None:
                cache = prefix_cache(model, prefix)
                cache.batch_repeat_interleave(len(inputs["input_ids"]))
                inputs = {**inputs, cache_argument(model): cache, "use_cache": True}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    settings = dict(output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=1, learning_rate=2e-4,
                    report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, bf16=args.bf16,
                    use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, seed=0)
    settings.update(overrides)
    return PrefixSharingTrainer(model=model, args=TrainingArguments(**settings), train_dataset=rows,
                                data_collator=collator, batch_tokens=batch_tokens)


def train_seconds(model, rows, collator, args, batch_tokens: int | None = None, **overrides) -> float:
    with tempfile.TemporaryDirectory() as out:
        return trainer(model, rows, collator, args, out, batch_tokens, **overrides).train().metrics["train_runtime"]


def matmul_peak(dtype: torch.dtype, device: str, sizes: tuple[int, ...] = (1024, 2048), seconds: float = 3.0) -> float:
    """Best FLOP/s of square matmuls on this machine, in the training dtype."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 2:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


def training_flops(model, rows, lora: bool, shared_prefix_batch_size: int = 1) -> float:
    """Matmul FLOPs of one pass over `rows` (non-pad tokens only): 2N forward, 2N backward to the
    activations, plus 2N for weight gradients of what is trained; attention scores on top. The
    vocabulary projection counts only where the loss needs it: one position per target token.
    With `shared_prefix_batch_size` > 1 the prompt start all rows share runs once per batch of that
    size (`shared_prefix_batch`; batches whose rows share a longer start do a little less)."""
    shared = len(common_prompt_start(rows)) if shared_prefix_batch_size > 1 else 0
    reused = len(rows) - -(-len(rows) // shared_prefix_batch_size)  # rows that reuse their batch's prefix
    tokens = sum(len(r["input_ids"]) for r in rows) - reused * shared
    targets = sum(sum(1 for label in r["labels"] if label != -100) for r in rows)
    squares = sum(len(r["input_ids"]) ** 2 for r in rows) - reused * shared ** 2
    return flops_of(model, tokens, targets, squares, lora)


def flops_of(model, tokens: int, targets: int, squares: int, lora: bool) -> float:
    """Training FLOPs of `tokens` non-pad tokens, `targets` of them predicted, in examples whose
    squared lengths sum to `squares` (attention): see `training_flops`."""
    config, head = model.config, model.get_output_embeddings()
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n and m is not head)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    per_token = (4 * linear + 6 * adapters) if lora else 6 * linear
    per_target = (4 if lora else 6) * head.weight.numel()
    attention = 3 * 4 * config.num_hidden_layers * config.hidden_size * squares / 2  # causal: half the scores
    return per_token * tokens + per_target * targets + attention


def measure_tokens_and_mfu(model, tokenizer, train, args) -> None:
    from transformers import default_data_collator

    from databricks_llm.data import collator

    rows = train.select(range(args.steps * args.batch_size))
    seed_rows = rows.map(lambda r: seed_style(r, tokenizer.pad_token_id))
    useful = sum(sum(1 for label in r["labels"] if label != -100) for r in rows)
    collate = collator(model, tokenizer)
    train_seconds(model, rows.select(range(args.batch_size)), collate, args)  # warm-up, untimed
    ours, seed = [], []
    for _ in range(args.repeats):
        seed.append(useful / train_seconds(model, seed_rows, default_data_collator, args))
        ours.append(useful / train_seconds(model, rows, collate, args))
    summary("useful_tokens_per_s", ours, seed, " tok/s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak(torch.bfloat16 if args.bf16 else torch.float32, device, args.peak_sizes)
    lora = hasattr(model, "peft_config")
    flops = [training_flops(model, rows, lora) * t / useful for t in ours]  # FLOP/s of each repeat
    summary("mfu", [f / 1e12 for f in flops], [peak / 1e12], " TFLOP/s")


def common_prompt_start(rows: list[dict], minimum: int = 16) -> list[int]:
    """The prompt tokens every row starts with, less one so each row keeps a token of its own;
    empty when shorter than `minimum` (not worth a cache)."""
    from databricks_llm.data import first_target

    prompts = [r["input_ids"][:first_target(r["labels"])] for r in rows]
    length = min(map(len, prompts)) - 1
    for prompt in prompts[1:]:
        length = next((i for i in range(length) if prompt[i] != prompts[0][i]), length)
    return prompts[0][:length] if length >= minimum and len(prompts) > 1 else []


def shared_prefix_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Our batch with the prompt tokens every row starts with (chat template and instruction: 27 of an
    E2E row's ~91) taken out of the rows and sent once as `prefix_ids`; the attention mask covers
    prefix and rows (each row's padding between the two), positions continue after the prefix."""
    from databricks_llm.data import pad_batch

    prefix = common_prompt_start(features)
    batch = pad_batch([{k: f[k][len(prefix):] for k in ("input_ids", "labels")} for f in features], pad_token_id,
                      target_logits_only=True)
    if prefix:
        batch["prefix_ids"] = torch.tensor([prefix])
        batch["attention_mask"] = torch.cat([torch.ones(len(features), len(prefix), dtype=torch.long),
                                             batch["attention_mask"]], 1)
        batch["position_ids"] = batch["position_ids"] + len(prefix)
    return batch


LEVERS = {  # name -> (TrainingArguments overrides, batches: ours, shared (prefix once), packed, budget (packed
    # token-budget batches), or ours without a KV cache, attention)
    "fused_adamw": ({"optim": "adamw_torch_fused"}, "ours", "sdpa"),
    "torch_compile": ({"torch_compile": True}, "ours", "sdpa"),
    "bf16_autocast": ({"bf16": True}, "ours", "sdpa"),
    "bf16_eager_attention": ({"bf16": True}, "ours", "eager"),  # what fine_tune --bf16 trains with on a CPU
    "bf16_eager_shared_prefix": ({"bf16": True}, "shared", "eager"),
    "bf16_eager_batch_16": ({"bf16": True, "per_device_train_batch_size": 16}, "ours", "eager"),
    "bf16_eager_batch_16_shared_prefix": ({"bf16": True, "per_device_train_batch_size": 16}, "shared", "eager"),
    "bf16_eager_batch_32": ({"bf16": True, "per_device_train_batch_size": 32}, "ours", "eager"),
    "bf16_eager_batch_32_shared_prefix": ({"bf16": True, "per_device_train_batch_size": 32}, "shared", "eager"),
    "batch_16": ({"per_device_train_batch_size": 16}, "ours", "sdpa"),
    "batch_32": ({"per_device_train_batch_size": 32}, "ours", "sdpa"),
    "packing": ({}, "packed", "sdpa"),
    "batch_tokens": ({}, "budget", "sdpa"),
    "no_kv_cache": ({}, "no_cache", "sdpa"),
}


def measure_levers(model, tokenizer, train, args) -> None:
    """Each lever against the default step, same rows, alternated over the repeats; a lever's first
    run (compilation, first shapes) is warm-up. bf16 trains a second model whose frozen weights are bf16."""
    from databricks_llm.batching import packed_batch
    from databricks_llm.data import collator

    rows = train.select(range(args.steps * args.batch_size))
    useful = sum(sum(1 for label in r["labels"] if label != -100) for r in rows)
    lora = hasattr(model, "peft_config")
    half = benchmark_model(args.model, torch.bfloat16, lora, args.lora_dropout)
    ours = collator(model, tokenizer)
    budget = args.batch_tokens or round(sum(rows["length"]) / len(rows) * args.batch_size)
    batches = {"ours": ours, "packed": packed_batch, "budget": None,
               "no_cache": lambda features: {**ours(features), "use_cache": False},
               "shared": lambda features: shared_prefix_batch(features, tokenizer.pad_token_id)}
    levers = {"default": ({}, "ours", "sdpa"), **{name: LEVERS[name] for name in args.levers.split(",")}}

    def run(name: str) -> float:
        overrides, kind, attention = levers[name]
        trained = half if "bf16" in overrides else model
        (trained.get_base_model() if lora else trained).set_attn_implementation(attention)
        return train_seconds(trained, rows, batches[kind], args, budget if kind == "budget" else None, **overrides)

    for name in levers:  # warm-up, untimed
        run(name)
    seconds = {name: [] for name in levers}
    for _ in range(args.repeats):
        for name in levers:
            seconds[name].append(run(name))
    peaks = {dtype: matmul_peak(dtype, "cuda" if torch.cuda.is_available() else "cpu", args.peak_sizes)
             for dtype in (torch.float32, torch.bfloat16)}
    default = [useful / t for t in seconds["default"]]
    for name in levers:
        dtype = torch.bfloat16 if name == "bf16_autocast" or args.bf16 else torch.float32
        summary(f"lever_{name}", [useful / t for t in seconds[name]], default, " tok/s")
        overrides, kind, _ = levers[name]
        flops = training_flops(model, rows, lora, overrides.get("per_device_train_batch_size", args.batch_size)
                               if kind == "shared" else 1)
        mfu = [flops / t / peaks[dtype] for t in seconds[name]]
        print(f"  MFU {statistics.median(mfu):.2f} ({min(mfu):.2f}..{max(mfu):.2f}) of the {dtype} peak "
              f"{peaks[dtype] / 1e12:.3f} TFLOP/s", flush=True)


def profile_training(model, tokenizer, train, args) -> None:
    """Where a training step's time goes: torch profiler over `--steps` steps, top operators."""
    from torch.profiler import ProfilerActivity, profile

    from databricks_llm.data import collator

    rows = train.select(range(args.steps * args.batch_size))
    collate = collator(model, tokenizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = train_seconds(model, rows, collate, args)
    print(f"[profile] {args.steps} steps in {seconds:.1f} s", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def warm_inference_model(source: str, args):
    """The model the pyfunc/evaluate path generates with, in evaluate's `--dtype`, warmed up."""
    from databricks_llm.generation import generate
    from databricks_llm.models import load_for_inference

    model, tokenizer = load_for_inference(source)
    model = model.to(getattr(torch, args.generation_dtype or ("bfloat16" if args.bf16 else "float32")))
    generate(model, tokenizer, ["The Punter is a coffee shop."], max_tokens=4)
    return model, tokenizer


def profile_generation(source: str, inputs: list[str], args) -> None:
    """Where generation time goes, one prompt at a time and batched: torch profiler, top operators."""
    from torch.profiler import ProfilerActivity, profile

    from databricks_llm.generation import generate

    model, tokenizer = warm_inference_model(source, args)
    for size in (1, args.generation_batch_size):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            generate(model, tokenizer, inputs, max_tokens=args.max_tokens, batch_size=size)
        print(f"[profile] generation, batch {size}: {len(inputs)} rows in {time.perf_counter() - start:.1f} s", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10), flush=True)


def measure_tracking(model, tokenizer, train, args) -> str:
    """Returns a checkpoint folder for the logging measure."""
    import mlflow

    from databricks_llm.callbacks import MLflowLogger
    from databricks_llm.data import collator

    rows = train.select(range(args.tracking_steps * args.tracking_batch_size))
    collate = collator(model, tokenizer)
    from databricks_llm import tracking

    os.environ.update({k: os.environ.get(k, v) for k, v in tracking.ASYNC_LOGGING_DEFAULTS.items()})  # as a job has
    store = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    experiment = mlflow.create_experiment("speed", artifact_location=Path(store, "artifacts").as_uri())
    steps = {"logging_steps": 1, "save_strategy": "steps", "save_steps": args.save_steps,
             "per_device_train_batch_size": args.tracking_batch_size}
    plain, tracked = [], []
    out = tempfile.mkdtemp()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            t = trainer(model, rows, collate, args, scratch, **steps)
            plain.append(t.train().metrics["train_runtime"] / args.tracking_steps)
        with mlflow.start_run(experiment_id=experiment, log_system_metrics=True):
            t = trainer(model, rows, collate, args, out, **steps)
            t.add_callback(MLflowLogger())
            tracked.append(t.train().metrics["train_runtime"] / args.tracking_steps)
    summary("step_time_tracking", tracked, plain, " s", higher_is_better=False)
    print(f"  (tracking overhead: {100 * (statistics.median(tracked) / statistics.median(plain) - 1):.1f}% "
          f"with a checkpoint model every {args.save_steps} steps)", flush=True)
    return str(Path(out) / f"checkpoint-{args.save_steps}")


def folder_mb(uri: str) -> float:
    from mlflow.artifacts import download_artifacts

    path = Path(download_artifacts(uri))
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def measure_checkpoint_logging(checkpoint: str, args) -> None:
    import mlflow

    from databricks_llm import tracking

    ours_s, stock_s, ours_mb, stock_mb = [], [], [], []
    with mlflow.start_run():
        for i in range(args.repeats):
            start = time.perf_counter()
            info = tracking.log_model_folder(checkpoint, name=f"ours-{i}", step=i)
            ours_s.append(time.perf_counter() - start)
            ours_mb.append(folder_mb(mlflow.get_logged_model(info.model_id).artifact_location))
            start = time.perf_counter()  # transformers' MLflowCallback.on_save with HF_MLFLOW_LOG_ARTIFACTS=1
            info = mlflow.pyfunc.log_model(name=f"stock-{i}", artifacts={"model_path": checkpoint},
                                           python_model=mlflow.pyfunc.PythonModel())
            stock_s.append(time.perf_counter() - start)
            stock_mb.append(folder_mb(mlflow.get_logged_model(info.model_id).artifact_location))
    summary("checkpoint_log_s", ours_s, stock_s, " s", higher_is_better=False)
    summary("checkpoint_log_mb", ours_mb, stock_mb, " MB", higher_is_better=False)


def measure_generation(source: str, inputs: list[str], args) -> None:
    from databricks_llm.generation import generate

    model, tokenizer = warm_inference_model(source, args)
    batched, single = [], []
    for _ in range(args.repeats):
        for size, times in ((1, single), (args.generation_batch_size, batched)):
            start = time.perf_counter()
            generate(model, tokenizer, inputs, max_tokens=args.max_tokens, batch_size=size)
            times.append(len(inputs) / (time.perf_counter() - start))
    summary("generation_examples_per_s", batched, single, " ex/s")


def main() -> int:
    from databricks_llm.config import ModelArguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--generation_model", default=None, help="default: --model (e.g. a fine-tuned final_model)")
    parser.add_argument("--dataset", default=str(E2E) if E2E.exists() else "embedded:e2e-sample")
    parser.add_argument("--full_fine_tune", action="store_true", help="train every weight instead of LoRA")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora_dropout", type=float, default=ModelArguments.lora_dropout, help="default: fine_tune's")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batch_tokens", type=int, default=None, help="token budget of the batch_tokens lever")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed run of measures 1 and 4 (enough to amortise the Trainer start)")
    parser.add_argument("--tracking_steps", type=int, default=25, help="steps per timed run of measure 2")
    parser.add_argument("--tracking_batch_size", type=int, default=2, help="small: short steps make the overhead show")
    parser.add_argument("--save_steps", type=int, default=25, help="checkpoint interval of measure 2 (fine_tune: 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generation_rows", type=int, default=16)
    parser.add_argument("--generation_batch_size", type=int, default=16)
    parser.add_argument("--generation_dtype", choices=("float32", "bfloat16"), default=None,
                        help="evaluate's --dtype for measure 5 (default: bfloat16 with --bf16, else float32)")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--measures", default="tokens,tracking,generation",
                        help="comma list of tokens (1 and 4), tracking (2 and 3), generation (5), levers (6), profile")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma list for measure 6, of {', '.join(LEVERS)}")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, not the speed")
    args = parser.parse_args()
    args.peak_sizes = (1024, 2048)  # the MFU's matmul peak: square products of these sizes
    if unknown := sorted(set(args.levers.split(",")) - set(LEVERS)):
        parser.error(f"unknown lever {', '.join(unknown)} (see --help)")
    if args.quick:
        args.steps, args.tracking_steps, args.save_steps, args.repeats, args.tracking_batch_size = 2, 2, 2, 1, 1
        args.batch_size, args.generation_rows, args.max_tokens = 2, 4, 8
        args.peak_sizes = (256,)  # a 2048-wide bf16 product takes minutes on a CPU without bf16 instructions

    from databricks_llm import data

    print(f"[speed] model {args.model}, data {args.dataset}, batch {args.batch_size}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads", flush=True)
    needed = max(args.steps * args.batch_size, args.tracking_steps * args.tracking_batch_size)
    setup = training_setup(args, needed, lora=not args.full_fine_tune, lora_dropout=args.lora_dropout)
    tokenizer, splits, train, model = setup.tokenizer, setup.splits, setup.tokenized, setup.model
    measures = args.measures.split(",")
    if "tokens" in measures:
        measure_tokens_and_mfu(model, tokenizer, train, args)
    if "tracking" in measures:
        checkpoint = measure_tracking(model, tokenizer, train, args)
        measure_checkpoint_logging(checkpoint, args)
    if "levers" in measures:
        measure_levers(model, tokenizer, train, args)
    if "profile" in measures:
        profile_training(model, tokenizer, train, args)
        profile_generation(args.generation_model or args.model, splits["test"][data.INPUT][:args.generation_rows], args)
    if "generation" in measures:
        measure_generation(args.generation_model or args.model, splits["test"][data.INPUT][:args.generation_rows], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
