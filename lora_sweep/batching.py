"""Which examples go into which optimizer step and micro-batch (train.batching), and length-sorted evaluation.

With dynamic padding a micro-batch costs its size x its longest example. On SST-2 random batches of 32 compute
three padded tokens for every real one. Three ways to draw a run's batches:

- random: a fresh seeded permutation per epoch, cut into batches.
- sorted (the default): exactly random's examples for every optimizer step; inside the step they are sorted by
  length and cut into micro-batches at the points that compute the fewest padded tokens (no micro-batch smaller
  than `min_micro_batch`, none larger than `batch_size`). The training loop weights each micro-batch's loss by its
  share of what the step's loss averages over, so the step's gradient is the random batch's: the same
  optimisation, with most of the padding gone (tests/test_batching.py checks the gradients agree).
- grouped: transformers' LengthGroupedSampler (random mega-batches of 50 batches, each sorted longest first).
  Less padding still, but it changes which examples share a step and walks from long to short sentences every
  50 steps: on the main job it cost 1.7 dev points against random batches (docs/benchmarks.md). Kept for comparison only.

The whole plan is drawn up front from the seed, so a LoRA run and its baseline see the same examples in the same
order, and the step with the most computed tokens is known before training (the memory probe measures that step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler


@dataclass(frozen=True)
class Plan:
    """Each optimizer step's micro-batches (lists of example indices) in training order, and the step the memory
    probe wraps (its micro-batch with the most computed tokens comes last)."""

    steps: list[list[list[int]]]
    probe_step: int  # 1-based optimizer step holding the most computed (padded) tokens, never step 1

    @property
    def batches(self) -> list[list[int]]:
        """Every micro-batch of the run, in order."""
        return [micro for step in self.steps for micro in step]


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    """Tokens a batch computes when padded to its longest example."""
    return len(batch) * max(lengths[i] for i in batch)


def cut_sorted(examples: list[int], lengths: list[int], smallest: int, largest: int) -> list[list[int]]:
    """`examples` sorted longest first and cut into consecutive micro-batches of `smallest`..`largest` examples at
    the points that compute the fewest padded tokens (ties: fewer micro-batches). Exact, by dynamic programming
    over the cut points: O(n x largest), n = a step's examples. Where no cut fits the sizes (a short last step of
    an epoch under gradient accumulation), fixed chunks of `largest`."""
    order = sorted(examples, key=lambda i: -lengths[i])
    n, smallest = len(order), min(smallest, len(order))
    best: list[tuple[int, int] | None] = [(0, 0)] + [None] * n  # (padded tokens, micro-batches) of the first j examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - largest), j - smallest + 1):
            if best[i] is not None:
                cost = (best[i][0] + (j - i) * lengths[order[i]], best[i][1] + 1)
                if best[j] is None or cost < best[j]:
                    best[j], cut[j] = cost, i
    if best[n] is None:
        return [order[i:i + largest] for i in range(0, n, largest)]
    micros, j = [], n
    while j:
        micros.append(order[cut[j]:j])
        j = cut[j]
    return micros[::-1]


def train_plan(lengths: list[int], batch_size: int, steps: int, grad_accum: int, seed: int, batching: str,
               min_micro_batch: int) -> Plan:
    """`steps` optimizer steps of `grad_accum` batches drawn epoch after epoch, each epoch a fresh permutation from
    `seed` (random and sorted draw the same permutations), sorted steps re-cut by length.

    The step whose micro-batches compute the most tokens is the step whose activations peak. It is moved
    to step 2 when it falls on step 1 (the grouped sampler puts the longest batch first), because AdamW allocates
    its state during step 1: only from step 2 on does one step hold weights, state and activations at once.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = (LengthGroupedSampler(batch_size, lengths=lengths, generator=generator) if batching == "grouped"
               else RandomSampler(range(len(lengths)), generator=generator))
    needed = steps * grad_accum
    batches: list[list[int]] = []
    while len(batches) < needed:
        order = list(sampler)  # each pass draws a new permutation from the generator
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    plan = [batches[s * grad_accum:(s + 1) * grad_accum] for s in range(steps)]
    if batching == "sorted":
        plan = [cut_sorted([i for b in step for i in b], lengths, min_micro_batch, batch_size) for step in plan]
    cost = [max(padded_tokens(b, lengths) for b in step) for step in plan]
    longest = max(range(steps), key=cost.__getitem__)
    if longest == 0 and steps > 1:
        plan[0], plan[1] = plan[1], plan[0]
        longest = 1
    plan[longest] = sorted(plan[longest], key=lambda b: padded_tokens(b, lengths))  # its longest last: the probe wraps it
    return Plan(plan, probe_step=longest + 1)


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
