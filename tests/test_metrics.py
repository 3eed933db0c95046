"""GLUE metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsparse.data.glue import main_metric
from fedsparse.training.metrics import compute_metrics


def test_accuracy_and_f1():
    pred, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    # tp=2 fp=1 fn=1 -> precision 2/3, recall 2/3, f1 2/3; 3 of 5 correct
    assert compute_metrics("mrpc", pred, gold) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert compute_metrics("sst2", pred, gold) == pytest.approx({"accuracy": 0.6})


def test_matthews_by_the_formula():
    pred, gold = np.array([1, 1, 1, 0, 0, 0, 1, 0]), np.array([1, 1, 0, 0, 0, 1, 1, 1])
    tp, tn, fp, fn = 3, 2, 1, 2
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics("cola", pred, gold)["matthews_correlation"] == pytest.approx(mcc)


def test_pearson_and_spearman_by_hand():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    xc, yc = x - x.mean(), y - y.mean()
    pearson = (xc * yc).sum() / math.sqrt((xc**2).sum() * (yc**2).sum())
    # ranks of y: 1, 3, 2, 4 -> d^2 = 0 + 1 + 1 + 0
    spearman = 1 - 6 * 2 / (4 * (16 - 1))
    assert compute_metrics("stsb", x, y) == pytest.approx({"pearson": pearson, "spearmanr": spearman})


def test_main_metric_per_task():
    assert [main_metric(t) for t in ("sst2", "cola", "mrpc", "stsb", "rte", "qqp")] == [
        "accuracy",
        "matthews_correlation",
        "f1",
        "pearson",
        "accuracy",
        "f1",
    ]
    with pytest.raises(ValueError, match="Unknown task"):
        main_metric("squad")
