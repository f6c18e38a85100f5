"""The process a run lives in: which device, how many torch threads, and the libraries' logging kept quiet.

Set up by the entry points (`lora-sweep`'s job, `lora-deploy`, the benchmarks), never on import: importing a module
of this package changes no global state."""

from __future__ import annotations

import os

import datasets
import torch
from transformers.utils import logging as hf_logging

from lora_sweep.errors import UserError


def resolve_device(requested: str) -> str:
    """train.device as a torch device name: `auto` is CUDA where one is visible, else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_threads(requested: int, parallel_jobs: int = 1) -> int:
    """Torch threads for this process: as asked, or the cores shared out among parallel jobs."""
    return requested or max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))


def quiet_libraries() -> None:
    """Errors only from transformers, and no progress bars but the training loop's: one bar per run."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
