"""The training and evaluation loop: accelerate + AdamW with linear warmup/decay, nothing home-made beyond the loop.

An explicit loop (rather than transformers' Trainer) because the memory probe has to wrap exactly one
optimizer step and the divergence guard has to see every loss; it stays short and reads top to bottom.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from lora_sweep import memory
from lora_sweep.settings import MethodSettings, TrainSettings


@dataclass
class TrainResult:
    steps: int = 0  # optimizer steps completed
    diverged_at: int | None = None  # optimizer step whose loss was NaN or infinite
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0  # non-padding tokens seen
    memory: memory.MemoryProbe | None = None


def make_accelerator(train: TrainSettings, device: str) -> Accelerator:
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision="bf16" if device == "cuda" else "no",
        gradient_accumulation_steps=train.grad_accum,
    )


def total_steps(train: TrainSettings, batches_per_epoch: int) -> int:
    if train.max_steps > 0:
        return train.max_steps
    return max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


def _batches(loader: DataLoader):
    """Batches forever, epoch after epoch (the sampler reshuffles each epoch)."""
    while True:
        yield from loader


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    method: MethodSettings,
    train: TrainSettings,
    on_log: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model` in place for the configured number of optimizer steps."""
    steps = total_steps(train, len(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=method.lr, weight_decay=train.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(train.warmup_ratio * steps), steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    probe_step = min(2, steps)  # step 2 has optimizer state allocated: the steady-state peak
    result = TrainResult()
    window: list[float] = []
    model.train()
    batches = _batches(loader)
    progress = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, disable=not accelerator.is_local_main_process)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        probing = train.memory_probe and step == probe_step
        with memory.probe(model, optimizer, accelerator.device) if probing else nullcontext() as probe:
            step_loss = 0.0
            for _ in range(train.grad_accum):
                batch = next(batches)
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.item() / train.grad_accum
                result.samples += batch["input_ids"].shape[0]
                result.tokens += int(batch["attention_mask"].sum())
        if probing:
            result.memory = probe
        if not math.isfinite(step_loss):
            result.diverged_at = step
            break
        result.steps = step
        window.append(step_loss)
        if step % train.log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            result.loss_curve.append((step, mean))
            window.clear()
            if on_log:
                on_log(step, mean)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        progress.update()
    result.seconds = time.perf_counter() - start
    progress.close()
    return result
