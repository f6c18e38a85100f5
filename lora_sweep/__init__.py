"""lora-sweep: measure which LoRA rank, alpha and targets a model and task need, against full fine-tuning."""

__version__ = "0.1.0"
