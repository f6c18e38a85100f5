"""The training loop: accelerate + AdamW with linear warmup/decay, gradient clipping and a divergence guard.

An explicit loop (rather than transformers' Trainer) because the memory probe has to wrap exactly one
optimizer step, the divergence guard has to see every loss, and the batches come from a plan drawn up
front (lora_sweep.batching). Optimizer steps are counted here, not by accelerate's accumulation context
(which also steps at the end of every pass over a dataloader), so a run makes exactly `steps` updates.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Collection

import numpy as np
import torch
from accelerate import Accelerator
from scipy import stats
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import get_parameter_names

from lora_sweep import distributed, memory
from lora_sweep.batching import Plan, load_batch
from lora_sweep.settings import MethodSettings, TrainSettings

# Parameters that get no weight decay: biases and normalisation weights (the patterns of transformers' Trainer).
NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
DIVERGENCE_WINDOW = 10  # steps over which the training loss is averaged before it is compared with the first step's


@dataclass
class TrainResult:
    steps: int = 0  # optimizer steps completed
    diverged_at: int | None = None  # optimizer step at which the divergence guard stopped training
    divergence: str | None = None  # why
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training only: checkpoint evaluations are counted apart
    checkpoint_seconds: float = 0.0
    samples: int = 0
    real_tokens: int = 0  # non-padding tokens seen
    computed_tokens: int = 0  # tokens computed, padding included
    memory: memory.MemoryProbe | None = None
    grad_bytes_after_backward: int | None = None  # gradients held when the probed step's backward ends


def optimizer_for(model: nn.Module, method: MethodSettings, train: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on weight matrices only."""
    decay = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": train.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=method.lr)


def loss_units(dataset, indices: list[int]) -> list[int]:
    """What the model's mean loss averages over, per example: the tokens it predicts where labels are per token (a
    causal LM's response: transformers shifts labels by one and ignores -100), else the example itself."""
    if "labels" not in dataset.column_names:
        return [1] * len(indices)
    return [sum(label != -100 for label in labels[1:]) for labels in dataset.select(indices)["labels"]]


def divergence(losses: list[float], factor: float) -> str | None:
    """Why training has run away, or None: a NaN/inf loss, or the mean of the last steps' losses above
    `factor` times the first step's loss (the loss of the untrained model)."""
    if not math.isfinite(losses[-1]):
        return f"loss became NaN or infinite at step {len(losses)}"
    recent = float(np.mean(losses[-DIVERGENCE_WINDOW:]))
    if losses[0] > 0 and recent > factor * losses[0]:
        return (f"training loss ran away at step {len(losses)}: mean of the last {min(len(losses), DIVERGENCE_WINDOW)} "
                f"steps {recent:.4g} > {factor:g} x the first step's {losses[0]:.4g}")
    return None


def loss_trend(losses: list[float]) -> dict[str, float | bool | None]:
    """Slope of the training loss over the last quarter of training (per 100 steps) and its standard error:
    a loss still falling significantly at the end means the budget, not the rank, may limit the result."""
    tail = losses[-max(len(losses) // 4, 1):]
    ends = {"initial_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-DIVERGENCE_WINDOW:])) if losses else None, "tail_steps": len(tail)}
    if len(tail) < 3:
        return {**ends, "slope_per_100_steps": None, "slope_se": None, "still_improving": None}
    fit = stats.linregress(np.arange(len(tail)), tail)
    slope, se = 100 * fit.slope, 100 * fit.stderr
    return {**ends, "slope_per_100_steps": slope, "slope_se": se, "still_improving": bool(slope + 1.96 * se < 0)}


def fit(
    accelerator: Accelerator,
    model: nn.Module,
    dataset,
    collate: Callable,
    plan: Plan,
    method: MethodSettings,
    train: TrainSettings,
    on_log: Callable[[int, float], None] | None = None,
    checkpoints: Collection[int] = (),
    on_checkpoint: Callable[[int], None] | None = None,
    after_update: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` in place: one optimizer step per step of the plan, whatever its number of micro-batches.

    Each micro-batch's mean loss is weighted by its share of what the step's loss averages over (examples, or a
    causal LM's predicted tokens), so the step's gradient is that of the step's whole batch however it was cut.
    `on_checkpoint(step)` is called after each step in `checkpoints` (the learning curve evaluates there); training
    resumes in train mode, and since evaluation draws no random numbers it does not change the run. Its time is
    kept apart from training's. `after_update(step)` runs after each update while the gradients are still there
    (AdaLoRA's reallocation reads them); its time is training's."""
    steps = len(plan.steps)
    optimizer = optimizer_for(model, method, train)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(train.warmup_ratio * steps), steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult()
    window: list[float] = []
    model.train()
    progress = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, disable=not accelerator.is_local_main_process)

    def forward_backward(micro: list[int], units: list[int], total: int) -> float:
        part, weight = distributed.shard(micro, units, total)
        batch = load_batch(dataset, part, collate, accelerator.device)
        loss = distributed.weighted(model(**batch).loss, weight)
        accelerator.backward(loss)
        if weight:
            result.samples += len(part)
            result.real_tokens += int(batch["attention_mask"].sum())
            result.computed_tokens += batch["input_ids"].numel()
        return distributed.mean(accelerator, loss.item())

    start = time.perf_counter()
    for step, micros in enumerate(plan.steps, start=1):
        probing = train.memory_probe and step == plan.probe_step
        units = [loss_units(dataset, micro) for micro in micros] if len(micros) > 1 or accelerator.num_processes > 1 else [None]
        total = sum(map(sum, units)) if units[0] else None
        step_loss = sum(forward_backward(micro, u, total) for micro, u in zip(micros[:-1], units))
        # The probe wraps the step's last micro-batch (the plan puts its longest there) and the update: the
        # gradients accumulated before it are live and counted. MemTracker follows one forward per module only.
        with memory.probe(model, optimizer, accelerator.device) if probing else nullcontext() as probe:
            step_loss += forward_backward(micros[-1], units[-1], total)
            if probing:
                result.grad_bytes_after_backward = sum(p.grad.nbytes for p in params if p.grad is not None)
            if train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            if after_update:
                after_update(step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if probing:
            result.memory = probe
        result.step_losses.append(step_loss)
        why = divergence(result.step_losses, train.divergence_factor)
        if why:
            result.diverged_at, result.divergence = step, why
            break
        result.steps = step
        window.append(step_loss)
        if step % train.log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            result.loss_curve.append((step, mean))
            window.clear()
            if on_log:
                on_log(step, mean)
        if on_checkpoint and step in checkpoints:
            started = time.perf_counter()
            on_checkpoint(step)
            model.train()
            result.checkpoint_seconds += time.perf_counter() - started
        progress.set_postfix(loss=f"{step_loss:.4f}")
        progress.update()
    result.seconds = time.perf_counter() - start - result.checkpoint_seconds
    progress.close()
    result.samples, result.real_tokens, result.computed_tokens = (
        distributed.total(accelerator, n) for n in (result.samples, result.real_tokens, result.computed_tokens))
    return result
