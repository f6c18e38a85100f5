"""The task-family contract: what the run side needs from a kind of task (GLUE classification, instruction tuning, ...).

A family is a module implementing `TaskFamily` (lora_sweep.glue, lora_sweep.instruct, lora_sweep.text). It reads its data, builds the
model with the right head, tokenizes, and turns a model's outputs into metrics; everything else (splits, batching,
training, records, statistics) is shared. Adding a family is writing one such module and naming it in FAMILIES."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import datasets
import numpy as np
import torch

from lora_sweep import glue, instruct, text
from lora_sweep.errors import UserError
from lora_sweep.settings import Settings, TaskSettings


@runtime_checkable
class TaskFamily(Protocol):
    TASK_TYPE: str  # PEFT's task type (SEQ_CLS, CAUSAL_LM): which head PEFT keeps trainable beside the adapter

    def resolve_source(self, task: TaskSettings) -> str:
        """Where the data comes from ("local:<folder>" or "hub:<id>"); a clear error when it is nowhere."""

    def data_identity(self, task: TaskSettings, source: str) -> dict:
        """What the data is, for the run's identity: a content hash of the files read, or a hub revision."""

    def load_model(self, path: str, settings: Settings, meta: bool = False) -> torch.nn.Module:
        """The model with this family's head, from a local folder; on the meta device (shapes only) when `meta`."""

    def build(self, settings: Settings, source: str, tokenizer) -> datasets.DatasetDict:
        """Tokenized train, tune and dev splits, every example with its `id`."""

    def collator(self, tokenizer) -> Callable[[list[dict]], dict]:
        """Pads a micro-batch of tokenized examples into tensors."""

    def batch_outputs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """One output per example (a logit row, a regression value, a per-example loss): what the metrics read."""

    def split_metrics(self, outputs: np.ndarray, labels: Any, settings: Settings) -> tuple[dict[str, float], str]:
        """The split's metrics from its outputs, and which one is primary."""

    def extra_metrics(self, accelerator, model: torch.nn.Module, tokenizer, dev: datasets.Dataset,
                      settings: Settings) -> dict[str, float]:
        """Metrics beyond the outputs' (generation-based scores); empty where there are none."""


FAMILIES: dict[str, TaskFamily] = {"glue": glue, "instruct": instruct, "text": text}


def family_for(settings: Settings) -> TaskFamily:
    """The family of `settings.task`."""
    if settings.task.family not in FAMILIES:
        raise UserError(f"task family {settings.task.family!r} is unknown; use one of {', '.join(FAMILIES)}")
    return FAMILIES[settings.task.family]
