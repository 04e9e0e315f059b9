"""Fine-tune open LLMs with transformers + PEFT + DeepSpeed and track everything in MLflow."""

__version__ = "0.1.0"
