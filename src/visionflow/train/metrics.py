"""Classification metrics from logits and labels: accuracy, top-k, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are the true class, columns the predicted one."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    num_classes = len(classes)
    y = labels.numpy().astype(np.int64)
    predicted = logits.argmax(1).numpy()
    k = 5 if num_classes >= 5 else max(1, num_classes - 1)
    top = logits.topk(k, dim=1).indices.numpy()
    confusion = confusion_matrix(y, predicted, num_classes)
    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(1)
    predicted_count = confusion.sum(0)
    precision = np.divide(true_pos, predicted_count, out=np.zeros(num_classes), where=predicted_count > 0)
    recall = np.divide(true_pos, support, out=np.zeros(num_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=(precision + recall) > 0)
    per_class = {
        name: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
               "f1": round(float(f1[i]), 6), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    # As scikit-learn's f1_score(average="macro"): over the classes in the labels or in the predictions, so
    # predicting a class the data does not hold counts against it.
    present = (support > 0) | (predicted_count > 0)
    return {
        "n": int(len(y)),
        "accuracy": round(float((predicted == y).mean()), 6) if len(y) else 0.0,
        "top_k": k,
        "top_k_accuracy": round(float((top == y[:, None]).any(1).mean()), 6) if len(y) else 0.0,
        "macro_f1": round(float(f1[present].mean()), 6) if present.any() else 0.0,
        "loss": round(float(torch.nn.functional.cross_entropy(logits, labels).item()), 6) if len(y) else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def worst_mistakes(logits: torch.Tensor, labels: torch.Tensor, count: int = 16) -> list[tuple[int, int, float]]:
    """The most confidently wrong items: (index, predicted class, its probability), most confident first."""
    probs = torch.softmax(logits, 1)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:count]
    return [(int(i), int(predicted[i]), float(confidence[i])) for i in order]
