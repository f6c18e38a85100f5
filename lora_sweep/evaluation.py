"""Per-example outputs on an evaluation split, computed in length-sorted batches and returned in the split's order.

With several processes each evaluates its part of every batch and the outputs are gathered (lora_sweep.distributed).

Sorting changes only how much padding is computed, never which output belongs to which example; the
outputs are kept in the record (with the examples' ids) so any two runs on one split can be compared
example by example after the fact, and the metrics are computed from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lora_sweep import batching, distributed


@torch.no_grad()
def predict(accelerator, model: torch.nn.Module, family, dataset, collate, batch_size: int) -> tuple[np.ndarray, dict[str, float]]:
    """Outputs (one row per example, in the dataset's order) and the split's real and padded token counts."""
    model.eval()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    batches = batching.eval_order(lengths, batch_size)
    computed: list[tuple[int, np.ndarray]] = []
    for indices in batches:
        part, weight = distributed.shard(indices)  # every process takes part in every batch (FSDP needs it)
        out = family.batch_outputs(model, batching.load_batch(dataset, part, collate, accelerator.device)).cpu().numpy()
        if weight:
            computed += zip(part, out)
    rows: list[np.ndarray | None] = [None] * len(lengths)
    for i, row in accelerator.gather_for_metrics(computed, use_gather_object=True):
        rows[i] = row  # each example's index is in exactly one process's part: it counts once, in the split's order
    return np.stack(rows), batching.token_counts(batches, lengths)


def evaluate_split(accelerator, model, family, dataset, collate, settings) -> dict[str, Any]:
    """Metrics, per-example outputs (6 significant digits) and token counts of one split."""
    outputs, tokens = predict(accelerator, model, family, dataset, collate, settings.train.eval_batch_size)
    kept = [[float(f"{v:.6g}") for v in row] for row in outputs]  # the metrics are computed from what is kept
    labels = np.asarray(dataset["label"]) if "label" in dataset.column_names else None
    metrics, primary = family.split_metrics(np.asarray(kept), labels, settings)
    examples = {"ids": list(dataset["id"]), "labels": None if labels is None else labels.tolist(), "outputs": kept}
    return {"metrics": metrics, "primary_metric": primary, "tokens": tokens, "examples": examples}
