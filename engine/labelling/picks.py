"""Which images to ask about next.

Before any label, the typical and diverse ones (TypiClust, Hacohen et al. 2022): the folder's embeddings cut into as
many clusters as images to ask, and from each cluster its most typical image (the densest: nearest, on average, to
its own nearest neighbours), so every kind of picture in the folder is seen in the first picks, and none of them is
an odd one out. Label Studio's users found pure uncertainty sampling no better than random at small budgets; the
typical-and-diverse start is what beats random there.

With a few labels (under 3 a class: ``session.TYPICAL_UNTIL``), TypiClust's later rounds: every image cut into as
many clusters as labels so far plus the batch, and the most typical unlabelled image of each cluster the labels cover
least (:func:`uncovered_typical`). After that, a batch is mostly the images the model is least sure of (smallest
margin between its two likeliest classes), spread across the folder (the 5x least certain cut into clusters, the
most typical of each), plus a few typical images of the regions no label is near ("unfamiliar") when those are a
group rather than a few odd pictures, so a kind of picture nobody labelled yet is asked about too.

One image in ten of every batch is a random check (``CHECK_SHARE``, engine/data/labels.py): the only labels the
estimated accuracy is measured on, since the others were chosen for being hard. The picks never see the checks'
answers (``session.suggest`` chooses them with a head trained without the checks, and only the other labels cover
the folder), so the picks do not steer clear of the checks and each check stays what a random image is to the model.
"""

from __future__ import annotations

import numpy as np

from engine.data.labels import CHECK_SHARE
from engine.neighbours import kmeans
from engine.trust.familiarity import normalise

NEIGHBOURS = 20  # typicality: mean distance to this many nearest neighbours in the cluster
# Unfamiliar images are asked about (a fifth of a batch) only when they are at least this share of the unlabelled
# ones. On the digits and flowers they were 0.2-0.9% (a few odd pictures, nearly all suggested wrong), and asking
# two of them every round cost 4.4 points at 10 labels a class on the digits (0.655 -> 0.699 without; three seeds;
# flowers 12/cl 0.549 -> 0.585): a kind of picture nobody labelled is a larger group than that.
UNFAMILIAR_GROUP = 0.02


def _clusters(X: np.ndarray, k: int, seed: int, iterations: int = 50) -> np.ndarray:
    """Each row's cluster of ``k`` (engine/neighbours.py's k-means), copies of one row always in one cluster (so a
    folder with fewer distinct pictures than ``k`` gets fewer clusters).

    scikit-learn's ``KMeans(n_init=1)`` does the same (its inertia and ours within 1% on four folders, three seeds,
    at 10 and 310 clusters, in the same time), but importing ``sklearn.cluster`` took 1.1-1.6 s: most of a ``python
    -m engine label`` round on 5,000 cached images (2.3-2.4 s against the issue's 2 s)."""
    X, inverse, weight = _distinct(np.asarray(X, np.float32))
    return kmeans(X, k, seed, iterations, weight)[inverse]


def _distinct(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of ``X``, each row's index among them, and how many times each occurs."""
    rows = np.ascontiguousarray(X).view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(rows, return_index=True, return_inverse=True, return_counts=True)
    return X[first], inverse.ravel(), counts.astype(np.float32)


def _most_typical(X: np.ndarray, members: np.ndarray) -> int:
    """The member nearest, on average, to its nearest neighbours among the members (cosine on unit vectors)."""
    if len(members) <= 2:
        return int(members[0])
    f = X[members]
    d = 1.0 - f @ f.T
    np.fill_diagonal(d, np.inf)
    k = min(NEIGHBOURS, len(members) - 1)
    return int(members[np.argmin(np.sort(d, 1)[:, :k].mean(1))])


def typical_and_diverse(X: np.ndarray, n: int, seed: int, among: np.ndarray | None = None) -> list[int]:
    """``n`` indices into ``X`` (``among``: only these rows), one per cluster, each its cluster's most typical,
    the largest clusters first."""
    among = np.arange(len(X)) if among is None else np.asarray(among)
    if n <= 0 or not len(among):
        return []
    f = normalise(X[among])
    lab = _clusters(f, n, seed)
    sizes = np.bincount(lab)
    order = [c for c in np.argsort(-sizes, kind="stable") if sizes[c]]  # (copies of one picture: fewer clusters)
    return [int(among[_most_typical(f, np.flatnonzero(lab == c))]) for c in order]


def _reduced(X: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """Unit vectors through a fixed random projection to ``dims`` dimensions (Johnson-Lindenstrauss: distances
    kept to within a few percent), for k-means with dozens of clusters over thousands of images. PCA did the same
    in 0.7 s for 5,000 images (a third of a round); this takes milliseconds."""
    f = normalise(X)
    if f.shape[1] <= dims:
        return f
    R = np.random.default_rng(seed).standard_normal((f.shape[1], dims)).astype(np.float32) / np.sqrt(dims)
    return f @ R


def uncovered_typical(X: np.ndarray, labelled: np.ndarray, unlabelled: np.ndarray, n: int, seed: int) -> list[int]:
    """TypiClust's later rounds: every image cut into (labels so far + n) clusters; from the clusters holding the
    fewest labels (the largest first), each one's most typical unlabelled image. So the kinds of picture no label
    covers yet are asked about, by their most ordinary member rather than an odd one."""
    if n <= 0 or not len(unlabelled):
        return []
    f = _reduced(X, 128, seed)
    lab = _clusters(f, len(labelled) + n, seed)
    k = lab.max() + 1
    covered = np.bincount(lab[labelled], minlength=k) if len(labelled) else np.zeros(k, int)
    sizes = np.bincount(lab, minlength=k)
    free = np.zeros(len(X), bool)
    free[unlabelled] = True
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # (typicality is cosine)
    out = []
    for c in np.lexsort((-sizes, covered)):  # fewest labels first, then the largest
        members = np.flatnonzero((lab == c) & free)
        if len(members):
            out.append(_most_typical(f, members))
        if len(out) == n:
            break
    return out


def uncertain_and_diverse(X: np.ndarray, margin: np.ndarray, among: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` of ``among`` (indices into ``X``): from the ``5n`` with the smallest ``margin``, one per cluster, the
    most typical of each (the least certain of each was 1.7 points behind at 10 labels a class and 3.4 at 20 on
    the digits, three seeds: an odd one out teaches less than a doubt shared by its neighbours)."""
    if n <= 0 or not len(among):
        return []
    pool = among[np.argsort(margin[among], kind="stable")[: 5 * n]]
    f = normalise(X[pool])
    lab = _clusters(f, n, seed)
    out = [int(pool[_most_typical(f, np.flatnonzero(lab == c))]) for c in range(lab.max() + 1) if (lab == c).any()]
    return sorted(out, key=lambda i: margin[i])


def next_batch(
    X: np.ndarray,
    unlabelled: np.ndarray,
    n: int,
    seed: int,
    margin: np.ndarray | None,
    unfamiliar: np.ndarray | None,
    labelled: np.ndarray | None = None,
    typical_share: float = 0.0,
    draws: np.ndarray | None = None,
) -> list[int]:
    """The ``n`` unlabelled images (indices into ``X``) to ask about next. With ``draws`` (:func:`check_draws`, one
    per row), a tenth of them (at least one) are the next random checks, and the rest are chosen among the other
    images as :func:`chosen_batch` chooses."""
    unlabelled = np.asarray(unlabelled)
    if draws is None or n <= 0:
        return chosen_batch(X, unlabelled, n, seed, margin, unfamiliar, labelled, typical_share)
    is_check = draws[unlabelled] < CHECK_SHARE
    checks = unlabelled[is_check][np.argsort(draws[unlabelled][is_check], kind="stable")]
    checks = checks[: max(1, int(round(n * CHECK_SHARE)))]
    rest = unlabelled[~is_check]
    if len(rest) < n - len(checks):  # (nearly every other image labelled: the checks are all that is left)
        rest = np.setdiff1d(unlabelled, checks)
    picks = chosen_batch(X, rest, n - len(checks), seed, margin, unfamiliar, labelled, typical_share)
    return picks + [int(i) for i in checks]


def chosen_batch(
    X: np.ndarray,
    unlabelled: np.ndarray,
    n: int,
    seed: int,
    margin: np.ndarray | None,
    unfamiliar: np.ndarray | None,
    labelled: np.ndarray | None = None,
    typical_share: float = 0.0,
) -> list[int]:
    """The ``n`` images of ``unlabelled`` the app chooses: typical and diverse without a model (``margin`` None);
    else ``typical_share`` of them :func:`uncovered_typical` (given the ``labelled`` indices), and the rest uncertain
    and diverse, a fifth of those typical images of the unfamiliar ones when they are a group (at least
    ``UNFAMILIAR_GROUP`` of the unlabelled)."""
    unlabelled = np.asarray(unlabelled)
    if margin is None:
        return typical_and_diverse(X, n, seed, unlabelled)
    n_typical = int(round(n * typical_share)) if labelled is not None else 0
    picks = uncovered_typical(X, labelled, unlabelled, n_typical, seed) if n_typical else []
    strange = unlabelled[unfamiliar[unlabelled]] if unfamiliar is not None else unlabelled[:0]
    strange = np.setdiff1d(strange, picks)
    if len(strange) < UNFAMILIAR_GROUP * len(unlabelled):  # a few odd images, not a kind of picture nobody labelled
        strange = strange[:0]
    n_strange = min(len(strange), (n - len(picks)) // 5)
    picks += typical_and_diverse(X, n_strange, seed, strange) if n_strange else []
    rest = np.setdiff1d(unlabelled, picks)
    return uncertain_and_diverse(X, margin, rest, n - len(picks), seed) + picks
