"""One run across several processes (train.distributed=ddp|fsdp), started by torchrun, `accelerate launch` or SLURM.

Everything a run does differently when it has several processes is here; with one process every function is
the identity, so a single-process run computes exactly what it did before. The rules:

- the processes are found in the environment: torchrun and `accelerate launch` set RANK and WORLD_SIZE; the tasks
  of a submitit job (Hydra's SLURM launcher, or its local executor) get them from submitit, which reads SLURM's;
- process 0 alone holds the run's lock, decides whether the run is skipped, and writes the record;
- each micro-batch of the plan (the global sequence, drawn up front from the seed) is split across the
  processes, and each process's loss is weighted by its share of what the loss averages over (examples, or a
  causal LM's predicted tokens), so the gradients DDP/FSDP average are those of the
  global batch's mean loss: the same optimisation as one process, up to floating-point summation order;
- each process draws its own dropout masks (seed + rank);
- every process evaluates its part of each evaluation batch and accelerate's gather_for_metrics collects the
  outputs, put back by example index so each example counts once, in the split's order;
- a process stopped by its launcher because another one failed (SIGTERM) fails its run the ordinary way, so the
  run leaves a `failed` record, never a `done` one.
"""

from __future__ import annotations

import os
import signal
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from lora_sweep.errors import UserError
from lora_sweep.settings import TrainSettings

T = TypeVar("T")


class Stopped(Exception):
    """The launcher stopped this process: another process of the run failed."""


def world_size() -> int:
    """How many processes this run was started as: WORLD_SIZE (torchrun, accelerate launch), else the tasks of the
    submitit job it runs in (Hydra's SLURM and local launchers with tasks_per_node > 1), else 1."""
    if "WORLD_SIZE" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's (or submitit's)
            # variables; every GPU of the node stays visible, as accelerate puts process k on cuda:LOCAL_RANK
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(train: TrainSettings, device: str, generate_examples: int = 0) -> None:
    """Join the run's other processes (before anything is decided for the run); check the settings fit the launch."""
    size = world_size()
    if size > 1 and generate_examples:
        raise UserError(f"task.generate_examples={generate_examples} is not supported with several processes (each would "
                        f"generate on its own clock; under FSDP they would wait on each other); set task.generate_examples=0")
    if size > 1 and train.distributed == "none":
        raise UserError(f"this run was started as {size} processes but train.distributed=none; "
                        f"set train.distributed=ddp or fsdp, or start one process")
    if size == 1 and train.distributed != "none" and "LOCAL_RANK" not in os.environ:  # torchrun --nproc-per-node=1 is a launch
        raise UserError(f"train.distributed={train.distributed} but this run is one process: start it with torchrun "
                        f"--nproc-per-node=N (CPU or GPU) or accelerate launch --multi_gpu --num_processes=N (GPU), or set "
                        f"train.distributed=none")
    if size > 1 and train.distributed == "fsdp" and device == "cpu":
        raise UserError("train.distributed=fsdp needs GPUs: accelerate shards a model only on accelerator devices (on CPU it "
                        "would run plain DDP under the name FSDP); use train.distributed=ddp on CPU")
    if train.batch_size % size:
        raise UserError(f"train.batch_size={train.batch_size} cannot be shared out evenly among {size} processes; "
                        f"use a multiple of {size}")
    if size > 1:
        PartialState(cpu=device == "cpu")
        signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Stopped("stopped by the launcher (SIGTERM): another process of this run failed; see its output")


def processes() -> tuple[int, int]:
    """(this process's rank, the number of processes)."""
    if world_size() == 1:
        return 0, 1
    state = PartialState()
    return state.process_index, state.num_processes


def is_main() -> bool:
    return processes()[0] == 0


def main_only(context: AbstractContextManager) -> AbstractContextManager:
    """`context` (the run's lock) in process 0, nothing in the others."""
    return context if is_main() else nullcontext()


def from_main(value: T) -> T:
    """Process 0's `value` in every process (a decision process 0 made alone, such as skipping the run)."""
    if world_size() == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def seed_dropout(seed: int) -> None:
    """Give each process its own dropout masks (seed + rank, as accelerate's device_specific seeding does), once the
    model is initialised alike everywhere. Masks drawn per process differ from those one process draws for the whole
    batch: with dropout, a run of several processes equals one process's in distribution, not example by example."""
    if world_size() > 1:
        set_seed(seed, device_specific=True)


def make_accelerator(device: str, mode: str) -> Accelerator:
    """CUDA runs in bf16 autocast; FSDP shards parameters, gradients and optimizer state across the processes."""
    fsdp = fsdp_plugin() if mode == "fsdp" and world_size() > 1 else None
    return Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no", fsdp_plugin=fsdp)


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """FSDP2: each process keeps 1/N of the parameters, gradients and AdamW state, gathers a layer's weights for its
    forward and backward and frees them after; the full weights are gathered once more to save the model."""
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")


def shard(batch: list[int], units: list[int] | None = None, total: float | None = None) -> tuple[list[int], float]:
    """This process's contiguous part of one micro-batch, and the weight of its mean loss: the part's share of what the
    optimizer step's loss averages over (`units`, one number per example of the micro-batch: 1 for a loss averaged
    over examples, the default; the predicted tokens for one averaged over tokens; `total`, the step's sum of them,
    by default the micro-batch's own) times the number of processes, so the sum over the step's micro-batches of the
    mean over processes of the weighted losses (what DDP and FSDP average the gradients of) is the step's mean loss.
    A micro-batch that is the whole step on one process gets weight 1 exactly. A process left with no example
    computes the first one at weight 0, because every process must take part in every forward and backward."""
    rank, size = processes()
    units = units or [1] * len(batch)
    total = total or sum(units)
    low, high = rank * len(batch) // size, (rank + 1) * len(batch) // size
    return (batch[low:high], sum(units[low:high]) * size / total) if high > low else (batch[:1], 0.0)


def weighted(loss, weight: float):
    """`loss` times `weight`, untouched where the weight is 1 (one process: the computation as it always was)."""
    return loss if weight == 1 else loss * weight


def mean(accelerator: Accelerator, value: float) -> float:
    """The mean of `value` over the processes (the global batch's loss from the weighted per-process losses)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="mean").item()


def total(accelerator: Accelerator, value: int) -> int:
    """The sum of `value` over the processes (samples and tokens trained on)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum").item())


def everyone(value: T) -> list[T]:
    """`value` from every process, in rank order (the memory each one measured)."""
    return gather_object([value])
