"""The memory plan of a GPU job: what fits on the GPUs at hand, decided before any weight loads.

From the model's config.json (parameter count from its widths, layers and vocabulary; nothing else
is read), the dtype, LoRA or a full fine-tune, the sequence length, the GPUs' free memory, the
host's RAM and the number of GPUs, `plan` picks, in this order of preference:

    LoRA, bf16 weights, one copy per GPU      (fastest; the default)
    LoRA + ZeRO-3                             (several GPUs: the frozen weights sharded)
    QLoRA 4-bit                               (one GPU too small for bf16 weights; needs bitsandbytes)
    full fine-tune, no DeepSpeed              (asked for with --use_lora=false)
    full fine-tune + ZeRO-3                   (several GPUs)
    full fine-tune + ZeRO-3 + CPU offload     (host RAM holds the optimizer and fp32 weights)

then gradient checkpointing (off when at least `MIN_TOKENS` tokens fit without it: recomputing
costs a third of a step) and the micro-batch's token budget (`--batch_tokens`, at most
`MAX_TOKENS`) with, for padded batches, the rows that fit at full length. A job nothing fits is
refused with one line naming what would. Every choice given as a flag is kept as given
(`FIXED_BY`); the plan then only checks it.

The estimates (bytes per GPU) are deliberately simple and on the safe side; docs/gpu.md lists them:
weights (bf16: 2 bytes a parameter; 4-bit: 0.55 for the decoder's linear layers), trainable
state (16 bytes a trained parameter: fp32 weight, gradient and two Adam moments), and per token of a
micro-batch its activations (2 * (34 h + 8 i) bytes per layer, or 4 h per layer plus one layer's
with checkpointing) and its logits (5 * vocabulary bytes: half the tokens are targets, whose logits
are kept in bf16 and float32 with their gradient).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from databricks_llm.errors import InputError

log = logging.getLogger(__name__)

GB = 1e9
MIN_TOKENS = 4096  # a micro-batch this large keeps a GPU busy; below it, checkpointing buys a larger one
MAX_TOKENS = 16384  # beyond this a larger micro-batch no longer speeds a step up, it only delays the next
RESERVE = 0.1  # of the free memory, left to the allocator's fragmentation and the CUDA kernels' workspace
STATE_BYTES = 16  # per trained parameter: fp32 weight, gradient, Adam's two moments
FOUR_BIT_BYTES = 0.55  # per 4-bit parameter, with bitsandbytes' quantization constants
ZERO3_LIVE = 1e9  # ds_configs' stage3_max_live_parameters: gathered bf16 parameters at once
CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
ZERO_FILES = {"zero3": "ds_zero_3.json", "zero3_offload": "ds_zero_3_cpu_offloading.json"}
FIXED_BY = {  # the plan's choices and the flags that fix them
    "use_4bit": "use_4bit", "zero": "deepspeed_config", "gradient_checkpointing": "gradient_checkpointing",
    "batch_tokens": "batch_tokens", "micro_batch": "per_device_train_batch_size",
}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes, read from its config."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        """From a config.json dict (Llama, Mistral, Qwen and their kin name these fields alike)."""
        config = {**config, **config.get("text_config", {})}
        try:
            heads = config["num_attention_heads"]
            return cls(vocab=config["vocab_size"], hidden=config["hidden_size"],
                       intermediate=config.get("intermediate_size", 4 * config["hidden_size"]),
                       layers=config["num_hidden_layers"], heads=heads,
                       kv_heads=config.get("num_key_value_heads") or heads,
                       tied=bool(config.get("tie_word_embeddings", False)))
        except KeyError as err:
            raise InputError(f"the model's config has no {err.args[0]}: cannot plan its memory") from None

    @property
    def layer_linear(self) -> int:
        """Weights of one decoder layer's linear maps: q and o, k and v (grouped heads), gate, up, down."""
        kv = self.kv_heads * (self.hidden // self.heads)
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def embeddings(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * (self.layer_linear + 2 * self.hidden) + self.embeddings + self.hidden

    def lora_params(self, r: int) -> int:
        """LoRA on every linear map of every layer: r * (in + out) each."""
        kv = self.kv_heads * (self.hidden // self.heads)
        ins_outs = 2 * (2 * self.hidden) + 2 * (self.hidden + kv) + 3 * (self.hidden + self.intermediate)
        return self.layers * r * ins_outs

    def token_bytes(self, checkpointing: bool) -> int:
        """Memory per token of a micro-batch: activations kept for the backward pass, and logits."""
        layer = 2 * (34 * self.hidden + 8 * self.intermediate)
        activations = self.layers * 4 * self.hidden + layer if checkpointing else self.layers * layer
        return activations + 5 * self.vocab


@dataclass(frozen=True)
class Hardware:
    """The GPUs a job runs on (each with `gpu_free` bytes free), the host's RAM and bitsandbytes."""

    gpu_free: float
    host_ram: float
    world_size: int = 1
    gpus_per_node: int = 1
    bitsandbytes: bool = True

    @classmethod
    def current(cls) -> Hardware:
        import torch

        local = int(os.environ.get("LOCAL_RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or min(world, torch.cuda.device_count()) or 1)
        return cls(gpu_free=torch.cuda.mem_get_info(local)[0], host_ram=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                   world_size=world, gpus_per_node=per_node,
                   bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)


@dataclass(frozen=True)
class Request:
    """What the job asks for; None where the plan decides."""

    lora: bool = True
    dtype_bytes: int = 2
    seq_len: int = 256
    lora_r: int = 8
    use_4bit: bool | None = None
    zero: str | None = None  # "none", "zero2", "zero3" or "zero3_offload" when --deepspeed_config names a file
    gradient_checkpointing: bool | None = None
    batch_tokens: int | None = None
    micro_batch: int | None = None


@dataclass(frozen=True)
class Plan:
    method: str  # "LoRA", "QLoRA 4-bit" or "full fine-tune"
    use_4bit: bool
    zero: str  # "none", "zero2", "zero3" or "zero3_offload"
    gradient_checkpointing: bool
    batch_tokens: int | None  # None: padded batches of `micro_batch` rows
    micro_batch: int
    gpu_bytes: float  # estimated peak per GPU
    fits_tokens: int  # tokens per micro-batch the estimate leaves room for
    lines: tuple[str, ...] = ()

    @property
    def deepspeed_config(self) -> str | None:
        return str(CONFIGS / ZERO_FILES[self.zero]) if self.zero in ZERO_FILES else None


def _fixed_bytes(shape: Shape, method: str, zero: str, request: Request, world: int) -> float:
    """Per-GPU bytes that do not grow with the micro-batch: weights, trained state, ZeRO buffers."""
    n = shape.params
    if method == "QLoRA 4-bit":
        weights = shape.layers * shape.layer_linear * FOUR_BIT_BYTES + (n - shape.layers * shape.layer_linear) * 2
    else:
        weights = n * (2 if method == "full fine-tune" and zero != "none" else request.dtype_bytes)
    trained = STATE_BYTES * (n if method == "full fine-tune" else shape.lora_params(request.lora_r))
    if method == "full fine-tune" and zero == "none":
        return n * STATE_BYTES  # fp32 weights (autocast), gradients, Adam moments
    if zero == "zero3":
        return (weights + trained) / world + 2 * min(n, ZERO3_LIVE) + 8 * shape.hidden ** 2
    if zero == "zero3_offload":
        return 2 * min(n, ZERO3_LIVE) + 8 * shape.hidden ** 2  # the rest lives in host RAM
    if zero == "zero2" and method == "full fine-tune":
        return weights + (STATE_BYTES - 2) * n / world  # gradients and optimizer state sharded
    return weights + trained


def host_bytes(shape: Shape, hardware: Hardware) -> float:
    """Host RAM ZeRO-3 offload needs on each node: fp32 weights and Adam moments, bf16 weights and
    gradients of the node's share of the parameters."""
    return 18 * shape.params * hardware.gpus_per_node / hardware.world_size


def _candidates(request: Request, hardware: Hardware) -> list[tuple[str, str]]:
    """(method, ZeRO) pairs in order of preference, within what the request fixes."""
    world = hardware.world_size
    if request.lora:
        pairs = [("LoRA", "none"), ("LoRA", "zero3")] if world > 1 else [("LoRA", "none")]
        pairs.append(("QLoRA 4-bit", "none"))
        if request.use_4bit is not None:
            pairs = [p for p in pairs if (p[0] == "QLoRA 4-bit") == request.use_4bit]
    else:
        pairs = [("full fine-tune", "none")] + ([("full fine-tune", "zero3")] if world > 1 else [])
        pairs.append(("full fine-tune", "zero3_offload"))
    if request.zero is not None:
        pairs = list(dict.fromkeys((method, request.zero) for method, _ in pairs))
    return pairs


def _fit(shape: Shape, hardware: Hardware, request: Request, method: str, zero: str) -> Plan | None:
    """The plan for one (method, ZeRO) pair, or None where a row of `seq_len` tokens does not fit."""
    if method == "QLoRA 4-bit" and not hardware.bitsandbytes and request.use_4bit is None:
        return None
    if zero == "zero3_offload" and host_bytes(shape, hardware) > 0.9 * hardware.host_ram:
        return None
    usable = hardware.gpu_free * (1 - RESERVE)
    room = usable - _fixed_bytes(shape, method, zero, request, hardware.world_size)
    options = [request.gradient_checkpointing] if request.gradient_checkpointing is not None else [False, True]
    for checkpointing in options:
        tokens = int(room // shape.token_bytes(checkpointing)) if room > 0 else 0
        last = checkpointing == options[-1]
        if tokens >= MIN_TOKENS or (last and tokens >= request.seq_len):
            break
    else:
        return None
    budget = request.batch_tokens or max(request.seq_len, min(tokens, MAX_TOKENS) // 256 * 256)
    micro_batch = request.micro_batch or max(1, budget // request.seq_len)
    packed = request.batch_tokens is not None or request.micro_batch is None
    used = budget if packed else micro_batch * request.seq_len
    gpu = usable - room + used * shape.token_bytes(checkpointing) + hardware.gpu_free * RESERVE
    return Plan(method=method, use_4bit=method == "QLoRA 4-bit", zero=zero, gradient_checkpointing=checkpointing,
                batch_tokens=budget if packed else None, micro_batch=micro_batch, gpu_bytes=gpu, fits_tokens=tokens)


def plan(shape: Shape, hardware: Hardware, request: Request) -> Plan:
    """The first (method, ZeRO) pair that fits, with its checkpointing and budget, and the lines
    that say so; InputError, naming what would fit, when none does."""
    for method, zero in _candidates(request, hardware):
        chosen = _fit(shape, hardware, request, method, zero)
        if chosen is not None:
            return dataclasses.replace(chosen, lines=_lines(shape, hardware, request, chosen))
    raise InputError(_refusal(shape, hardware, request))


def _lines(shape: Shape, hardware: Hardware, request: Request, chosen: Plan) -> tuple[str, ...]:
    def given(choice: str) -> str:
        return " (as given)" if getattr(request, choice) is not None else ""

    batches = (f"micro-batches of up to {chosen.batch_tokens} tokens, packed{given('batch_tokens')}"
               if chosen.batch_tokens else f"micro-batches of {chosen.micro_batch} rows{given('micro_batch')}")
    lines = [
        f"{shape.params / 1e9:.2f}B parameters, vocabulary {shape.vocab}, sequences up to {request.seq_len} tokens; "
        f"{hardware.world_size} GPU(s) with {hardware.gpu_free / GB:.1f} GB free each, host RAM {hardware.host_ram / GB:.0f} GB",
        f"{chosen.method}{given('use_4bit')}, DeepSpeed {'off' if chosen.zero == 'none' else chosen.zero}{given('zero')}, "
        f"gradient checkpointing {'on' if chosen.gradient_checkpointing else 'off'}{given('gradient_checkpointing')}",
        f"{batches}; estimated peak {chosen.gpu_bytes / GB:.1f} GB per GPU (room for {chosen.fits_tokens} tokens)",
    ]
    used = chosen.batch_tokens or chosen.micro_batch * request.seq_len
    if used > chosen.fits_tokens:
        lines.append(f"warning: the micro-batch asked for ({used} tokens) is larger than the estimate leaves room for "
                     f"({chosen.fits_tokens}): it may run out of GPU memory")
    return tuple(lines)


def _refusal(shape: Shape, hardware: Hardware, request: Request) -> str:
    """One line: what the job needs, and the nearest settings that would fit."""
    asked = "full fine-tune" if not request.lora else "QLoRA 4-bit" if request.use_4bit else "LoRA"
    row = request.seq_len * shape.token_bytes(True)
    need = _fixed_bytes(shape, asked, request.zero or "none", request, hardware.world_size) + row
    options = [f"{label} on one GPU of >= {(_fixed_bytes(shape, method, 'none', request, 1) + row) / (1 - RESERVE) / GB:.0f} GB"
               for label, method in (("QLoRA (--use_4bit=true)", "QLoRA 4-bit"), ("LoRA", "LoRA"))]
    sharded, free = ("LoRA" if request.lora else "full fine-tune"), dataclasses.replace(request, gradient_checkpointing=None)
    roomy = dataclasses.replace(hardware, host_ram=float("inf"))
    gpus = next((g for g in (2, 4, 8, 16, 32, 64, 128)
                 if _fit(shape, dataclasses.replace(roomy, world_size=g, gpus_per_node=min(g, 8)), free, sharded, "zero3")), None)
    if gpus:
        options.append(f"{sharded} with ZeRO-3 on {gpus} GPUs like these")
    if not request.lora and _fit(shape, roomy, free, sharded, "zero3_offload"):
        options.append(f"full fine-tune with ZeRO-3 + CPU offload (--deepspeed_config=ds_configs/{ZERO_FILES['zero3_offload']}) "
                       f"and host RAM >= {host_bytes(shape, hardware) / 0.9 / GB:.0f} GB per node "
                       f"(this one has {hardware.host_ram / GB:.0f} GB)")
    return (f"{asked} of a {shape.params / 1e9:.1f}B-parameter model needs about {need / GB:.0f} GB per GPU "
            f"(sequences of {request.seq_len} tokens, gradient checkpointing on) and {hardware.world_size} GPU(s) "
            f"have {hardware.gpu_free / GB:.1f} GB free each; would fit: {'; or '.join(options)}")


def zero_of(path: str) -> str | None:
    """The ZeRO setting a DeepSpeed JSON asks for: zero2, zero3 or zero3_offload (stage 3 with
    parameters or optimizer offloaded to the CPU); None for a file that is not a readable JSON
    object (the job's checks refuse it, naming the problem)."""
    try:
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, ValueError, AttributeError):
        return None
    stage = int(zero.get("stage", 0))
    offload = any((zero.get(key) or {}).get("device", "none") != "none" for key in ("offload_param", "offload_optimizer"))
    return "zero3_offload" if stage == 3 and offload else f"zero{stage}" if stage in (2, 3) else "none"


def read_shape(model: str, trust_remote_code: bool = False) -> Shape:
    """The model's shape from its config.json (a local folder, the hub cache or a GGUF's metadata);
    no weights are read."""
    from databricks_llm.models import read_config

    return Shape.of(read_config(model, trust_remote_code).to_dict())


def given_flags(argv: list[str]) -> set[str]:
    """The flag names (without dashes) on a command line."""
    return {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def request_of(config: Any, given: set[str]) -> Request:
    """The plan's request from a parsed job: a flag on the command line fixes its choice."""
    data, model, job, training = config.data, config.model, config.job, config.training
    fixed = {choice: flag in given for choice, flag in FIXED_BY.items()}
    fixed["gradient_checkpointing"] |= "activation_checkpointing" in given  # transformers 5's name of the flag
    ds = job.deepspeed_config
    return Request(
        lora=model.use_lora, dtype_bytes=2 if (training.bf16 or training.fp16) else 4, seq_len=data.max_seq_length,
        lora_r=model.lora_r, use_4bit=model.use_4bit if fixed["use_4bit"] else None,
        zero=(zero_of(ds) if ds and ds != "auto" else "none" if ds is None and fixed["zero"] else None),
        gradient_checkpointing=training.gradient_checkpointing if fixed["gradient_checkpointing"] else None,
        batch_tokens=data.batch_tokens, micro_batch=training.per_device_train_batch_size if fixed["micro_batch"] else None)


def apply(config: Any, given: set[str], hardware: Hardware | None = None) -> Plan | None:
    """On a GPU job (or for `hardware` given), plan and set the job's flags (what a flag fixed
    stays); log the plan's lines. On a CPU job nothing changes, except that `--deepspeed_config=auto` means ds_zero_2.json there
    (as the fine-tuning notebook picks on a CPU)."""
    import torch

    if hardware is None:
        if config.training.use_cpu or not torch.cuda.is_available():
            if config.job.deepspeed_config == "auto":
                config.job.deepspeed_config = str(CONFIGS / "ds_zero_2.json")
            return None
        hardware = Hardware.current()
    chosen = plan(read_shape(config.model.model, config.model.trust_remote_code), hardware, request_of(config, given))
    for line in chosen.lines:
        (log.warning if line.startswith("warning:") else log.info)("[memory plan] %s", line)
    config.model.use_4bit = chosen.use_4bit
    config.data.batch_tokens = chosen.batch_tokens
    config.job.deepspeed_config = config.job.deepspeed_config if config.job.deepspeed_config not in (None, "auto") \
        else chosen.deepspeed_config
    # activation_checkpointing: transformers 5's name; its deprecated alias would be overwritten by it in a copy
    config.training = dataclasses.replace(config.training, activation_checkpointing=chosen.gradient_checkpointing,
                                          per_device_train_batch_size=chosen.micro_batch)
    return chosen
