"""GLUE's official metrics, computed with scikit-learn and SciPy (no hub downloads)."""

from __future__ import annotations

import numpy as np

from fedsparse.data.glue import main_metric


def compute_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Class ids (or scores for STS-B) against gold labels -> the task's GLUE metrics."""
    # imported here: ~1 s that a deployment ClientApp process, which only trains, never needs
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    main = main_metric(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if main == "pearson":
        return {
            "pearson": float(pearsonr(predictions, labels)[0]),
            "spearmanr": float(spearmanr(predictions, labels)[0]),
        }
    if main == "matthews_correlation":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    result = {"accuracy": float(accuracy_score(labels, predictions))}
    if main == "f1":
        result["f1"] = float(f1_score(labels, predictions))
    return result
