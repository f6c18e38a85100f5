"""Linear algebra on weight updates: what an adapter (or full fine-tuning) changed, and how many directions it used.

- ΔW of a LoRA module is PEFT's own `get_delta_weight` (scale · B · A, as merging would add it), never re-derived.
- Effective rank at an energy level: the fewest singular values whose squares hold that share of ‖ΔW‖²_F.
- Subspace similarity (LoRA paper §7.2): φ(i, j) = ‖V₁[:, :i]ᵀ V₂[:, :j]‖²_F / min(i, j), with V the right singular
  vectors of the two adapters' A matrices, ordered by A's singular values, as the paper defines it: 1 when one
  subspace contains the other, about max(i, j) / d for unrelated random subspaces of a d-dimensional space.
- Amplification factor (§7.3): ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F with U, V the top-r singular vectors of ΔW: how much ΔW
  amplifies directions that W₀ itself barely uses.
"""

from __future__ import annotations

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"  # PEFT's name for the one adapter a run trains


def _lora_layers(model: nn.Module, adapter: str):
    """(module name as `adapted_modules` lists it, LoRA layer) for every module of a PEFT model carrying `adapter`."""
    return [(name.removeprefix("base_model.model."), module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A]


@torch.no_grad()
def lora_deltas(model: nn.Module, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module of a PEFT model, by module name."""
    return {name: module.get_delta_weight(adapter).detach().double() for name, module in _lora_layers(model, adapter)}


@torch.no_grad()
def lora_a(model: nn.Module, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """A (r × fan-in) of every LoRA module of a PEFT model, by module name: the matrix whose row space φ compares."""
    return {name: module.lora_A[adapter].weight.detach().double().flatten(1) for name, module in _lora_layers(model, adapter)}


def effective_rank(sigma: np.ndarray, level: float) -> int:
    """The fewest singular values holding `level` (e.g. 0.9) of the energy; 0 for a zero update."""
    energy = np.square(np.sort(np.asarray(sigma, dtype=float))[::-1])
    total = energy.sum()
    if total == 0:
        return 0
    shares = np.cumsum(energy) / total
    return int(np.searchsorted(shares, level - 1e-12) + 1)


def svd(delta: torch.Tensor):
    """ΔW's thin SVD in float64 (U, S, Vh), computed once and shared by the measures below."""
    return torch.linalg.svd(delta.detach().double(), full_matrices=False)


def right_directions(a: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of an adapter's A (r × d_in) as columns (d_in × k): what φ compares."""
    return svd(a).Vh[:k].T


def phi_grid(v1: torch.Tensor, v2: torch.Tensor) -> np.ndarray:
    """φ(i, j) for every i ≤ v1's columns and j ≤ v2's (index [i-1, j-1]), from orthonormal columns v1, v2."""
    overlap = np.square((v1.T @ v2).numpy())
    cumulative = overlap.cumsum(axis=0).cumsum(axis=1)
    i, j = np.meshgrid(np.arange(1, overlap.shape[0] + 1), np.arange(1, overlap.shape[1] + 1), indexing="ij")
    return cumulative / np.minimum(i, j)


def amplification(factors, w0: torch.Tensor, r: int) -> float:
    """‖ΔW‖_F / ‖U_rᵀ W₀ V_r‖_F with U_r, V_r the top-r singular vectors of ΔW (from `svd`; LoRA paper §7.3)."""
    u, sigma, vh = factors
    projected = u[:, :r].T @ w0.double() @ vh[:r].T
    return float(torch.linalg.norm(sigma) / torch.linalg.norm(projected))
