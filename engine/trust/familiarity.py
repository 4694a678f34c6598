"""How unlike the training images an image is: the one distance behind "unfamiliar" (predict) and "outlier"
(the dataset doctor).

Embeddings are L2-normalised; an image's distance is ``1 - cosine similarity`` to its nearest training embedding:
the deep nearest-neighbour score of Sun et al. 2022, which needs no training and no assumption about class shapes
(k = 1 separated best on the shared folders: a hymenoptera model flagged 87% of flower photos at 3.7% of its own
unseen test images, against 79% at 5.0% with k = 5 and 68% at 6.2% with k = 20; docs/benchmarks.md).

For a fine-tuning run the embeddings compared are the output of the stages it left frozen, averaged over the
picture (engine/train/fine_tuning/inputs.py): the tuned network's own embedding pulls every image towards some class
and flagged
none of 400 photos of another folder.

"Unfamiliar" threshold: the conformal 95% quantile of held-out distances (the validation images', and each training
image's to the other training images: :func:`familiarity_block`; the ceil((n + 1) 0.95)-th smallest, the largest
when n is small), so that new images like the training ones are flagged at most about 5% of the time. The dataset
doctor's outliers use the same distance (leave-one-out within the folder) with Tukey's far-out fence, Q3 + 3 IQR:
a folder's own odd images are rarer than 5%. Flag rates are reported cross-fitted (threshold from one half of those
distances, rate measured on the other, and the reverse).
"""

from __future__ import annotations

import numpy as np

K = 1
QUANTILE = 0.95
FENCE_IQR = 3.0  # Tukey's "far out"


def normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_distance(
    queries: np.ndarray, reference: np.ndarray, k: int = K, exclude_self: bool = False, progress=None
) -> np.ndarray:
    """Distance (1 - cosine) from each query to its k-th nearest reference embedding (both normalised).
    ``exclude_self``: queries are the reference itself (each image's own zero distance is skipped). Exact up to
    engine/neighbours.py's ``EXACT_UP_TO`` references, through its k-means partition above (a far image's
    distance can come out larger, never smaller)."""
    from engine.neighbours import most_similar

    q, r = normalise(queries), normalise(reference)
    k = max(1, min(k, len(r) - (1 if exclude_self else 0)))
    sims, _ = most_similar(q, r, k, exclude_self=exclude_self, progress=progress)
    return np.where(np.isfinite(sims[:, k - 1]), 1.0 - sims[:, k - 1], 2.0).astype(np.float32)


def threshold(distances: np.ndarray, quantile: float = QUANTILE) -> float:
    """The conformal ``quantile`` of held-out ``distances`` (infinite for none)."""
    if not len(distances):
        return float("inf")
    d = np.sort(np.asarray(distances, dtype=np.float64))
    rank = int(np.ceil((len(d) + 1) * quantile))
    return float(d[min(rank, len(d)) - 1])


def fence(distances: np.ndarray) -> float:
    """Tukey's far-out fence: Q3 + 3 IQR (the doctor's outliers)."""
    if not len(distances):
        return float("inf")
    q1, q3 = np.quantile(distances, [0.25, 0.75])
    return float(q3 + FENCE_IQR * (q3 - q1))


def cross_fitted_rate(distances: np.ndarray, seed: int = 0) -> float | None:
    """Share of held-out images flagged when the threshold comes from the other half of them."""
    if len(distances) < 4:
        return None
    idx = np.random.default_rng(seed).permutation(len(distances))
    a, b = idx[: len(idx) // 2], idx[len(idx) // 2 :]
    flagged = (distances[b] > threshold(distances[a])).sum() + (distances[a] > threshold(distances[b])).sum()
    return float(flagged / len(distances))


COPY_DISTANCE = 0.01  # a training image this close to another one is a copy of it (the doctor's duplicates)


def leave_one_out(train_features: np.ndarray, progress=None) -> np.ndarray:
    """Each training image's distance to its k-th nearest other training image (copies included): what
    :func:`familiarity_block` reads; it depends on these features alone (a rerun may keep it)."""
    train_features = np.asarray(train_features, dtype=np.float32)
    if len(train_features) < 2:
        return np.zeros(0, np.float32)
    return knn_distance(train_features, train_features, exclude_self=True, progress=progress)


def familiarity_block(
    train_features: np.ndarray,
    val_features: np.ndarray | None,
    seed: int = 0,
    loo: np.ndarray | None = None,
) -> dict:
    """model.json/metrics.json's ``unfamiliar`` block: k, the threshold, and the cross-fitted flag rate.

    The threshold's held-out distances are the validation images' and the training images' own leave-one-out
    distances (each to its nearest other training image; copies left out, or their near-zero distances would pull
    the quantile down). A quantile of only the validation distances swung with the split: over 10 random 60/20/20
    splits of hymenoptera (84 validation images) it marked 5.0% of unseen same-class images on average but up to
    12.5%, and 80% of flower photos but as few as 57% in one split; with the training distances added, 4.6% (at
    most 10.0%) and 85% (at least 64%); on flowers the figures moved by under half a point (docs/benchmarks.md).
    ``loo``: the training images' :func:`leave_one_out` distances, when the caller has them (a rerun keeps them:
    engine/train/fit.py); else searched here.
    """
    train_features = np.asarray(train_features, dtype=np.float32)
    loo = leave_one_out(train_features) if loo is None else loo
    loo = loo[loo > COPY_DISTANCE]
    if val_features is None or not len(val_features):
        d, source = loo, "training images (leave-one-out, copies left out; no validation split)"
    else:
        d = np.concatenate([knn_distance(val_features, train_features), loo])
        source = "validation images and the training images' leave-one-out distances (copies left out)"
    return {
        "k": min(K, len(train_features)),
        "rule": f"conformal {QUANTILE:.0%} quantile",
        "threshold": threshold(d),
        "threshold_from": source,
        "familiar_flag_rate": cross_fitted_rate(d, seed),
    }
