"""Official GLUE metrics, computed with scikit-learn and scipy (evaluate fetches its metric code from the hub)."""

from __future__ import annotations

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
