"""Training FLOPs of a model, read off one forward pass: the one definition shared by benchmarks/throughput.py and
the step-time estimate (lora_sweep.estimate).

Only matrix products are counted. Per token, forward: 2 x the weights of every linear layer the token passes through
(with LoRA also the adapter's A and B), plus attention 2 x 2 x seq x hidden per layer (QK^T and AV). Per example: 2 x
the weights of linear layers that see one row per example (BERT's pooler and classifier on [CLS]). Backward, per
linear layer: 1x forward for the input gradient when its input needs one, plus 1x for the weight gradient when its
weight is trained (read from the model: a forward hook records both). Attention backward = 2x its forward. Not
counted: embeddings (lookups), biases, softmax, normalisation, activations, dropout, the loss, the optimizer. The
forward pass may run on the meta device (shapes only, no weights): then give no attention mask.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lora_sweep import batching


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Training (forward + backward) FLOPs of one model: per token, per example, and attention per token per key."""

    token_train: float  # linear layers applied to every token (encoder, adapter)
    example_train: float  # linear layers applied once per example (pooler, classifier on [CLS])
    token_fwd: float  # the same, forward only (evaluation)
    example_fwd: float
    attention_fwd: float  # per token and per attended position: 2 x 2 x hidden x layers
    attention_train: float
    groups: dict[str, tuple[int, float, float]]  # kind of linear -> (weights per token or example, fwd, train FLOPs)

    def batch(self, lengths: list[int], padded: bool) -> float:
        """Training FLOPs of one batch: at each example's own length, or every example at the batch's longest."""
        if padded:
            lengths = [max(lengths)] * len(lengths)
        return sum(n * (self.token_train + self.attention_train * n) + self.example_train for n in lengths)

    def forward(self, lengths: list[int]) -> float:
        """Forward FLOPs of examples at their own lengths (evaluation without padding)."""
        return sum(n * (self.token_fwd + self.attention_fwd * n) + self.example_fwd for n in lengths)

    def plan(self, plan: batching.Plan, all_lengths: list[int]) -> tuple[float, float]:
        """(useful, computed) training FLOPs of a whole plan."""
        per_batch = [[all_lengths[i] for i in b] for b in plan.batches]
        return sum(self.batch(b, False) for b in per_batch), sum(self.batch(b, True) for b in per_batch)


LAYERS = ("layer linears", "LoRA adapter")  # what the model's layers compute (gradient checkpointing recomputes these)


def _kind(name: str) -> str:
    if "lora_" in name:
        return "LoRA adapter"
    if "pooler" in name or "classifier" in name:
        return "task head"
    if name.endswith("lm_head"):
        return "LM head"
    return "layer linears"


def flop_model(model: nn.Module, batch: dict) -> FlopModel:
    """Read the FLOP model off one forward pass: every nn.Linear that runs, how many rows it sees (every token, or
    one per example), and whether its input and weight need gradients (which decides its backward's cost)."""
    seen: list[tuple[str, int, bool, int]] = []  # (name, weights, per token (else per example), training / forward)
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Linear, inputs, _output) -> None:
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        per_token = rows == batch["input_ids"].numel()
        if not per_token and rows != batch["input_ids"].shape[0]:
            raise RuntimeError(f"{names[module]}: {rows} rows are neither every token nor one per example")
        train = 1 + int(x.requires_grad) + int(module.weight.requires_grad)  # forward, input grad, weight grad
        seen.append((names[module], module.in_features * module.out_features, per_token, train))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.enable_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, list[float]] = {}
    for name, weights, per_token, mult in seen:
        g = groups.setdefault(_kind(name), [0, 0.0, 0.0])
        g[0] += weights
        g[1] += 2 * weights
        g[2] += 2 * weights * mult
    config = model.config
    attention = 2 * 2 * config.hidden_size * config.num_hidden_layers
    return FlopModel(
        token_train=sum(2 * w * k for _, w, t, k in seen if t), example_train=sum(2 * w * k for _, w, t, k in seen if not t),
        token_fwd=sum(2 * w for _, w, t, _ in seen if t), example_fwd=sum(2 * w for _, w, t, _ in seen if not t),
        attention_fwd=attention, attention_train=3 * attention,
        groups={k: (int(v[0]), v[1], v[2]) for k, v in groups.items()})
