"""Peak tensor memory of one training step and its split, on CPU and CUDA alike.

Uses torch's own MemTracker (a dispatch mode that sees every tensor allocation and labels it
parameter, gradient, optimizer state or activation). It counts tensor bytes, not process RSS,
which on CPU adds some 400 MiB of interpreter and libraries that are not the model's memory.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

# How MemTracker's categories add up to the split we report.
SPLIT = {
    "weights": (_MemRefType.PARAM, _MemRefType.BUFFER),
    "gradients": (_MemRefType.GRAD,),
    "optimizer": (_MemRefType.OPT,),
    "activations": (_MemRefType.ACT, _MemRefType.TEMP),
    "other": (_MemRefType.OTH,),
}
# At a peak inside optimizer.step(), MemTracker's optimizer category also holds the update's scratch
# tensors (e.g. AdamW's denominator); those are reported under "other" and "optimizer" keeps the state.


class _FrozenAwareTracker(MemTracker):
    """MemTracker registers a gradient hook on every parameter, which torch refuses for frozen ones
    (a LoRA model's base weights). Track frozen parameters as weights without hooks."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for parameter in frozen:
            self._update_and_maybe_create_winfos(parameter, _MemRefType.PARAM)
            self._param_to_grad_hook_handles.setdefault(parameter, ())
        try:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        finally:
            for parameter in frozen:
                if self._param_to_grad_hook_handles.get(parameter) == ():
                    del self._param_to_grad_hook_handles[parameter]


class MemoryProbe:
    """Filled in when the `probe` context exits: `peak_bytes` and `split` (bytes per category, at the peak)."""

    peak_bytes: int = 0
    split: dict[str, int] = {}


@contextmanager
def probe(model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device) -> Iterator[MemoryProbe]:
    """Measure the peak of live tensor bytes on `device` while the body runs (one optimizer step; or, without an
    optimizer, one forward, such as EVA's pass makes before training)."""
    result = MemoryProbe()
    tracker = _FrozenAwareTracker()
    tracker.track_external(model, *([optimizer] if optimizer else []))
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")  # MemTracker's note on PEFT's wrapped modules
        yield result
    snapshot = tracker.get_tracker_snapshot("peak")
    dev_snap = next((snap for dev, snap in snapshot.items() if dev.type == device.type), {})
    split = {name: int(sum(dev_snap.get(kind, 0) for kind in kinds)) for name, kinds in SPLIT.items()}
    state = min(split["optimizer"], _state_bytes(optimizer, device) if optimizer else 0)
    split["other"] += split["optimizer"] - state
    split["optimizer"] = state
    result.split = split
    result.peak_bytes = int(sum(result.split.values()))


def _state_bytes(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes of the optimizer's persistent state (AdamW: two moments and a step count per parameter)."""
    return sum(
        t.untyped_storage().nbytes()
        for state in optimizer.state.values() for t in state.values()
        if torch.is_tensor(t) and t.device.type == device.type
    )
