import numpy as np
import pytest

from lora_sweep.metrics import glue_metrics


def one_hot_logits(predictions):
    logits = np.zeros((len(predictions), 2))
    logits[np.arange(len(predictions)), predictions] = 1.0
    return logits


def test_accuracy_and_f1_on_hand_computed_inputs():
    # predictions 1 1 0 0 1 vs labels 1 0 0 1 1: TP=2 FP=1 FN=1 TN=1
    metrics = glue_metrics(("f1", "accuracy"), one_hot_logits([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_matthews_on_hand_computed_inputs():
    # TP=2 TN=1 FP=1 FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    metrics = glue_metrics(("matthews",), one_hot_logits([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert metrics["matthews"] == pytest.approx(1 / 6)


def test_pearson_and_spearman_use_the_single_regression_output():
    logits = np.array([[1.0], [2.0], [3.0], [4.0]])
    metrics = glue_metrics(("pearson", "spearman"), logits, np.array([2.0, 4.0, 6.0, 9.0]))
    x, y = np.array([1, 2, 3, 4.0]), np.array([2, 4, 6, 9.0])
    expected = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert metrics["pearson"] == pytest.approx(expected)
    assert metrics["spearman"] == pytest.approx(1.0)
