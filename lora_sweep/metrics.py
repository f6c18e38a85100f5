"""Metrics: the official GLUE ones, computed with scikit-learn and scipy (evaluate fetches its metric code
from the hub), and what every metric means to the analysis (direction, display scale, default tolerance)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_METRICS = {
    "accuracy": lambda pred, ref: accuracy_score(ref, pred),
    "f1": lambda pred, ref: f1_score(ref, pred),
    "matthews": lambda pred, ref: matthews_corrcoef(ref, pred),
    "pearson": lambda pred, ref: pearsonr(pred, ref)[0],
    "spearman": lambda pred, ref: spearmanr(pred, ref)[0],
}


def glue_metrics(names: tuple[str, ...], logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metric values from raw model outputs: argmax for classification, the single output for regression."""
    predictions = logits[:, 0] if logits.shape[1] == 1 else logits.argmax(axis=1)
    return {name: float(_METRICS[name](predictions, labels)) for name in names}


@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool = True
    scale: float = 100.0  # display scale: fractions are shown in points
    unit: str = "points"
    tolerance: float = 1.0  # default "as good as full FT" margin, in display units


METRIC_INFO = {
    "loss": MetricInfo(higher_is_better=False, scale=1.0, unit="nats/token", tolerance=0.02),
    "perplexity": MetricInfo(higher_is_better=False, scale=1.0, unit="", tolerance=0.1),
}


def metric_info(name: str) -> MetricInfo:
    return METRIC_INFO.get(name, MetricInfo())
