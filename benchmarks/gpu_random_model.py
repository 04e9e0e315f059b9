"""Build a randomly initialised model of a given config folder, so that speed can be measured
where the real weights cannot travel (a GPU machine without network access, say).

    python benchmarks/gpu_random_model.py --shapes_only embedded:smollm2-135m-instruct .gpu/smollm2-135m   # here
    python benchmarks/gpu_random_model.py .gpu/smollm2-135m /tmp/smollm2                                   # there
    MODEL=/tmp/smollm2 bash benchmarks/gpu.sh

The config folder holds a model's config.json and tokenizer files, no weights (for SmolLM2-135M-
Instruct: its config and tokenizer saved from the embedded model, 3.4 MB instead of ~100 MB). The
output is a complete model folder (model.safetensors, config, tokenizer) that `--model` accepts.

Time per step depends on the shapes (layers, widths, vocabulary, sequence lengths) and the dtype,
not on the weights' values: the same matrix products run whatever numbers they hold. So training
and forward-pass timings on this model stand for the real one. Not so for anything that depends on
what the model says: generation here runs to --max_tokens (random weights seldom emit EOS), so a
real model that stops early would be faster there, and losses and scores mean nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)


# Real models' shapes, as in their config.json (benchmarks/gpu.sh builds them on the GPU). Llama-2-7B
# takes SmolLM2's vocabulary (49,152, as in issue #30's table) so that one tokenizer serves every
# trainer; Llama-3-8B keeps its 128,256 (larger than the tokenizer's: ids stay in range).
SHAPES = {
    "smollm2-1.7b": dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         tie_word_embeddings=True, rope_theta=130000.0, max_position_embeddings=8192),
    "llama-2-7b": dict(model_type="llama", vocab_size=49152, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       tie_word_embeddings=False, max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),  # CPU smoke test
}


def save_shape(name: str, output: str) -> Path:
    """A folder holding only the config.json of `SHAPES[name]` (a few hundred bytes)."""
    target = Path(output)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps({**SHAPES[name], "architectures": ["LlamaForCausalLM"]}))
    return target


def save_shapes(model: str, output: str) -> Path:
    """Save only the config, tokenizer and generation config of any `--model` source to `output`."""
    from databricks_llm import models

    source, target = models.resolve(model), Path(output)
    AutoConfig.from_pretrained(source).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    GenerationConfig.from_pretrained(source).save_pretrained(target)
    print(f"[random model] config and tokenizer of {model} in {target}", flush=True)
    return target


def build(config_dir: str, output: str, seed: int = 0) -> Path:
    """Save a random-weight causal LM of `config_dir`'s config, with its tokenizer, to `output`."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target = Path(output)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(target)
    if (Path(config_dir) / "generation_config.json").exists():
        GenerationConfig.from_pretrained(config_dir).save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    print(f"[random model] {config.model_type}, {params / 1e6:.1f}M parameters, random weights, in {target}", flush=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config_dir", help="folder with config.json and the tokenizer files (with --shapes_only: any --model source)")
    parser.add_argument("output", help="folder to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes_only", action="store_true", help="save the source's config and tokenizer only (no weights)")
    args = parser.parse_args()
    if args.shapes_only:
        save_shapes(args.config_dir, args.output)
    else:
        build(args.config_dir, args.output, args.seed)


if __name__ == "__main__":
    main()
