"""Which examples go into which batch: length-grouped training batches and length-sorted evaluation.

With dynamic padding a batch costs batch size x its longest example. On SST-2 random batches of 32 compute
three padded tokens for every real one; grouping by length (transformers' LengthGroupedSampler: sorted within
random mega-batches of 50 batches) makes nearly every computed token real, while keeping the order random
across mega-batches. The whole plan of a run's batches is drawn up front from the seed, so a LoRA run and
its baseline see the same batches in the same order, and the step with the longest batch is known before
training (the memory probe measures that step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler


@dataclass(frozen=True)
class Plan:
    """Micro-batches (lists of example indices) in training order and the optimizer step to probe for memory
    (the longest of its micro-batches comes last)."""

    batches: list[list[int]]
    probe_step: int  # 1-based optimizer step holding the most computed (padded) tokens, never step 1


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    """Tokens a batch computes when padded to its longest example."""
    return len(batch) * max(lengths[i] for i in batch)


def train_plan(lengths: list[int], batch_size: int, steps: int, grad_accum: int, seed: int, group_by_length: bool) -> Plan:
    """`steps * grad_accum` micro-batches drawn epoch after epoch, each epoch a fresh permutation from `seed`.

    The step whose micro-batches compute the most tokens is the step whose activations peak. It is moved
    to step 2 when it falls on step 1 (the sampler puts the longest batch first), because AdamW allocates
    its state during step 1: only from step 2 on does one step hold weights, state and activations at once.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = (LengthGroupedSampler(batch_size, lengths=lengths, generator=generator) if group_by_length
               else RandomSampler(range(len(lengths)), generator=generator))
    needed = steps * grad_accum
    batches: list[list[int]] = []
    while len(batches) < needed:
        order = list(sampler)  # each pass draws a new permutation from the generator
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = batches[:needed]
    cost = [max(padded_tokens(b, lengths) for b in batches[s * grad_accum:(s + 1) * grad_accum]) for s in range(steps)]
    longest = max(range(steps), key=cost.__getitem__)
    if longest == 0 and steps > 1:
        first, second = batches[:grad_accum], batches[grad_accum:2 * grad_accum]
        batches[:2 * grad_accum] = second + first
        longest = 1
    probed = slice(longest * grad_accum, (longest + 1) * grad_accum)
    batches[probed] = sorted(batches[probed], key=lambda b: padded_tokens(b, lengths))  # its longest last: the probe wraps it
    return Plan(batches, probe_step=longest + 1)


def eval_order(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of examples sorted by length (longest first); outputs are put back in the original
    order by the caller, so sorting changes only the padding, never which output belongs to which example."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def token_counts(batches: list[list[int]], lengths: list[int]) -> dict[str, float]:
    """Real and computed (padded) tokens of a list of batches, and the fraction of computed tokens that is padding."""
    return token_summary(sum(lengths[i] for b in batches for i in b), sum(padded_tokens(b, lengths) for b in batches))


def token_summary(real: int, computed: int) -> dict[str, float]:
    """Real and computed tokens and the share of computed tokens that is padding, as records keep them."""
    return {"real_tokens": real, "computed_tokens": computed, "padding_fraction": 1 - real / computed if computed else 0.0}


def load_batch(dataset, indices: list[int], collate, device) -> dict:
    """The examples at `indices`, padded by the task's collator and moved to `device` (one columnar read)."""
    rows = dataset[indices]
    return send_to_device(collate([dict(zip(rows, values)) for values in zip(*rows.values())]), device)
