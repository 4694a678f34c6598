"""The figures a run reports: accuracy with a 95% interval, balanced accuracy, per-class precision/recall/F1 and
the confusion matrix, for a set of predictions (``classification_metrics``) or a trained run's held-out splits
(``split_report``). NumPy only."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy: honest on small validation sets, unlike +-1.96*sqrt(p(1-p)/n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_accuracy_difference(right_a: np.ndarray, right_b: np.ndarray, z: float = 1.96) -> dict:
    """Accuracy of b minus accuracy of a on the same images (``right_*``: each image right or not), with Newcombe's
    hybrid score interval for paired proportions (Newcombe 1998, method 10: Wilson intervals of both accuracies,
    combined with the correlation of the pairs). Unlike the normal approximation it never has zero width when the two
    agree on every image of a handful (3 images, both right on all: -0.56 to +0.56), and it stays within -1..1.
    Returns ``difference``, ``ci95``, ``n`` and the discordant counts ``b_only`` / ``a_only``."""
    a = np.asarray(right_a, bool)
    b = np.asarray(right_b, bool)
    n = len(a)
    if n == 0:
        return {"difference": 0.0, "ci95": [float("nan"), float("nan")], "n": 0, "b_only": 0, "a_only": 0}
    both, b_only, a_only = int((a & b).sum()), int((b & ~a).sum()), int((a & ~b).sum())
    neither = n - both - b_only - a_only
    p_a, p_b = (both + a_only) / n, (both + b_only) / n
    la, ua = wilson_interval(both + a_only, n, z)
    lb, ub = wilson_interval(both + b_only, n, z)
    # the correlation of the pairs, as Newcombe corrects it (0 where a margin is empty; a positive cross-product less
    # n / 2, floored at 0)
    margins = (both + a_only) * (neither + b_only) * (both + b_only) * (neither + a_only)
    cross = both * neither - a_only * b_only
    cross = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
    phi = cross / math.sqrt(margins) if margins else 0.0
    d = p_b - p_a
    lo = d - math.sqrt(max((p_b - lb) ** 2 - 2 * phi * (p_b - lb) * (ua - p_a) + (ua - p_a) ** 2, 0.0))
    hi = d + math.sqrt(max((ub - p_b) ** 2 - 2 * phi * (ub - p_b) * (p_a - la) + (p_a - la) ** 2, 0.0))
    return {"difference": d, "ci95": [max(-1.0, lo), min(1.0, hi)], "n": n, "b_only": b_only, "a_only": a_only}


def paired_mean_difference(x: np.ndarray, z_or_t: float | None = None) -> tuple[float, tuple[float, float]]:
    """The mean of paired per-image differences ``x`` (say one model's log-loss minus another's on the same images)
    and its 95% interval from Student's t with n - 1 degrees of freedom (on 5 images t is 2.78, not 1.96); no
    interval (infinite) under 2 images."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 2:
        return (float(x.mean()) if n else 0.0), (-math.inf, math.inf)
    half = (z_or_t or t_quantile_975(n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    m = float(x.mean())
    return m, (m - half, m + half)


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile: from its expansion about the normal's (Abramowitz & Stegun 26.7.5; within 1e-6 of
    the exact value from 30 degrees of freedom), from SciPy below that (importing scipy.special costs a cached
    rerun 0.2 s)."""
    if df < 30:
        from scipy.special import stdtrit

        return float(stdtrit(df, 0.975))
    x = 1.959963984540054
    g1 = (x**3 + x) / 4
    g2 = (5 * x**5 + 16 * x**3 + 3 * x) / 96
    g3 = (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384
    g4 = (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160
    return x + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Plain-dict metrics (JSON-ready; None where undefined)."""
    k = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    per_class = {}
    for i, c in enumerate(classes):
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {"precision": round(prec, 6), "recall": round(rec, 6), "f1": round(f1, 6), "support": support}
    lo, hi = wilson_interval(correct, n)
    supported = [v for v in per_class.values() if v["support"]]
    return {
        "accuracy": round(correct / n, 6) if n else None,
        "accuracy_ci95": [round(lo, 6), round(hi, 6)] if n else None,
        "n": n,
        "correct": correct,
        "macro_f1": round(float(np.mean([v["f1"] for v in supported])), 6) if supported else None,
        # each class counts the same, whatever its size: the honest figure for unbalanced classes
        "balanced_accuracy": round(float(np.mean([v["recall"] for v in supported])), 6) if supported else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def split_report(classes: list[str], held: dict, probs: dict) -> tuple[dict, list[list]]:
    """metrics.json entries for the held-out splits ("val", "test") of a trained run, and its
    val_predictions.csv rows (path, split, label, prediction, confidence, p_<class>...). ``held``: each split's
    samples in the order of ``probs`` (a cross-fitted run's "val" is every labelled image, judged out of fold)."""
    metrics: dict = {}
    rows: list[list] = []
    for split in ("val", "test"):
        p = probs.get(split)
        items = held.get(split) or []
        if p is None or not items:
            metrics[f"{split}_accuracy"] = None
            continue
        y = np.array([s.label for s in items], dtype=np.int64)
        m = classification_metrics(y, p.argmax(1), classes)
        metrics[f"{split}_accuracy"] = m["accuracy"]
        metrics[f"{split}_accuracy_ci95"] = m["accuracy_ci95"]
        metrics[f"{split}_macro_f1"] = m["macro_f1"]
        metrics[f"{split}_balanced_accuracy"] = m["balanced_accuracy"]
        metrics[f"{split}_n"] = m["n"]
        metrics[f"{split}_per_class" if split == "test" else "per_class"] = m["per_class"]
        metrics[f"{split}_confusion_matrix" if split == "test" else "confusion_matrix"] = m["confusion_matrix"]
        for s, pr in zip(items, p):
            j = int(pr.argmax())
            rows.append([s.path, split, classes[s.label], classes[j], f"{pr[j]:.6f}"] + [f"{v:.6f}" for v in pr])
    return metrics, rows
