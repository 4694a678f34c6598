"""Nearest neighbours among embeddings at any folder size: exact below ``EXACT_UP_TO`` references, through a k-means
partition above it.

Every image compared with every other grows with the square of the folder: the dataset doctor's copy search and
its outliers, and feature extraction's "unfamiliar" threshold, took 284 s in silence on 60,000 cached images. Above
``EXACT_UP_TO`` the references are partitioned by k-means into cells of about ``CELL`` images (the centres fitted on
a sample), and each query is compared with the centres and then only with the members of its ``PROBES`` nearest
cells (an inverted file, as faiss's IVF does): the work per query is the number of cells plus ``PROBES`` cells, so
the whole search grows as n^1.5 with a small constant instead of n^2. Neighbours close enough to matter (copies,
the nearest image) share a cell or a neighbouring one; a far query's distance can only come out larger, never
smaller, than the exact one (on 30,000 clustered vectors every nearest neighbour was found, in a quarter of the
exact search's time). The k-means is NumPy (engine/labelling/picks.py clusters with the same one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

EXACT_UP_TO = 12_000  # references: below this the exact search is quick enough (12,000^2 x 1,280: ~4 s on 2 cores)
CELL = 256  # images per cell on average (cells = n / CELL, at least sqrt(n))
PROBES = 8  # cells searched per query
SAMPLE = 20_000  # rows the centres are fitted on


def kmeans(X: np.ndarray, k: int, seed: int, iterations: int = 50, weight: np.ndarray | None = None) -> np.ndarray:
    """Each row's cluster of ``k`` (k-means: greedy k-means++ start, then Lloyd's iterations, scikit-learn's stopping
    rule); ``weight``: how many copies each row stands for (default 1 each)."""
    X = np.asarray(X, np.float32)
    n = len(X)
    unweighted = weight is None
    weight = np.ones(n, np.float32) if weight is None else np.asarray(weight, np.float32)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", X, X)
    trials = 2 + int(np.log(k))  # greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's choice): best of a few
    centres = np.empty((k, X.shape[1]), np.float32)
    first = int(rng.choice(n, p=weight / weight.sum()))
    centres[0] = X[first]
    d2 = np.maximum(sq - 2 * (X @ X[first]) + sq[first], 0)  # each row's squared distance to its nearest centre
    for j in range(1, k):
        pot = d2 * weight
        total = float(pot.sum())
        cand = rng.choice(n, size=trials, p=pot / total) if total > 0 else rng.integers(n, size=1)
        dc = np.minimum(d2[None], np.maximum(sq[None] - 2 * (X[cand] @ X.T) + sq[cand, None], 0))
        best = int((dc * weight).sum(1).argmin())
        centres[j], d2 = X[cand[best]], dc[best]
    tol = 1e-4 * float(X.var(0).mean())  # (scikit-learn's: stop once the centres move less than this in all)
    for _ in range(iterations):
        lab, dist = _assign(X, centres)
        counts = np.bincount(lab, weights=weight, minlength=k)
        present = counts > 0
        moved = centres.copy()
        weighted = X if unweighted else X * weight[:, None]
        centres[present] = _sums(weighted, lab, k)[present] / counts[present, None].astype(np.float32)
        empty = np.flatnonzero(~present)
        if len(empty):  # an empty cluster starts again at the rows farthest from their own centre
            centres[empty] = X[np.argsort(-(dist + sq))[: len(empty)]]
        if float(((centres - moved) ** 2).sum()) <= tol:
            break
    return _assign(X, centres)[0]


def _sums(X: np.ndarray, lab: np.ndarray, k: int) -> np.ndarray:
    """Each cluster's sum of its rows (sorted once, then each run of rows summed: no dense membership matrix).
    ``np.add.reduceat`` along the rows took 206 ms on 20,000 x 1,280 in 141 clusters, a sum per run 8 ms."""
    order = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[order], np.arange(k + 1))
    Xs = X[order]
    out = np.zeros((k, X.shape[1]), np.float32)
    for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
        out[c] = Xs[bounds[c] : bounds[c + 1]].sum(0)
    return out


def _assign(X: np.ndarray, centres: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre and that squared distance less the row's own |x|^2 (in chunks: bounded memory)."""
    cc = np.einsum("ij,ij->i", centres, centres)
    lab = np.empty(len(X), np.int64)
    dist = np.empty(len(X), np.float32)
    for s in range(0, len(X), chunk):
        d = (X[s : s + chunk] @ centres.T) * -2 + cc[None]
        lab[s : s + chunk] = d.argmin(1)
        dist[s : s + chunk] = d[np.arange(len(d)), lab[s : s + chunk]]
    return lab, dist


def most_similar(
    queries: np.ndarray,
    reference: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    exact: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar references of each query by inner product (unit-length rows: cosine), best first:
    (similarities (m, k), indices (m, k); -inf / -1 where fewer exist). ``exclude_self``: the queries are the
    reference itself (an image is never its own neighbour). ``exact``: force the exact search (None: by size).
    ``progress(done, total)`` per chunk of queries."""
    q = np.asarray(queries, np.float32)
    r = np.asarray(reference, np.float32)
    if exact if exact is not None else len(r) <= EXACT_UP_TO:
        return _exact(q, r, k, exclude_self, progress)
    return _partitioned(q, r, k, exclude_self, seed, progress)


def _top(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k == 1 and sim.shape[1]:  # (the nearest alone: argmax is 3x cheaper than a partition)
        idx = sim.argmax(1)[:, None]
        return np.take_along_axis(sim, idx, 1), idx
    kk = min(k, sim.shape[1])
    idx = np.argpartition(-sim, kk - 1, axis=1)[:, :kk] if kk < sim.shape[1] else np.tile(np.arange(kk), (len(sim), 1))
    val = np.take_along_axis(sim, idx, 1)
    order = np.argsort(-val, axis=1)
    idx, val = np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
    if kk < k:
        idx = np.hstack([idx, np.full((len(sim), k - kk), -1)])
        val = np.hstack([val, np.full((len(sim), k - kk), -np.inf, np.float32)])
    return val, idx


def _exact(q, r, k, exclude_self, progress, chunk: int = 1024):
    sims = np.full((len(q), k), -np.inf, np.float32)
    idx = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(q), chunk):
        sim = q[s : s + chunk] @ r.T
        if exclude_self:
            sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        sims[s : s + chunk], idx[s : s + chunk] = _top(sim, k)
        if progress is not None:
            progress(min(s + chunk, len(q)), len(q))
    return sims, idx


def _partitioned(q, r, k, exclude_self, seed, progress):
    """The inverted-file search, cell by cell: every query that probes a cell is compared with its members in one
    product, and each query keeps its best ``k`` so far."""
    n = len(r)
    cells = max(int(math.sqrt(n)), n // CELL)
    rng = np.random.default_rng(seed)
    fit = r[rng.choice(n, min(n, SAMPLE), replace=False)] if n > SAMPLE else r
    lab = kmeans(fit, cells, seed, iterations=20)
    counts = np.bincount(lab, minlength=cells)
    centres = np.where(counts[:, None] > 0, _sums(fit, lab, cells) / np.maximum(counts, 1)[:, None], fit[0])
    where, _ = _assign(r, centres)
    order = np.argsort(where, kind="stable")
    starts = np.searchsorted(where[order], np.arange(cells + 1))
    probes = min(PROBES, cells)
    near = np.empty((len(q), probes), np.int64)
    for s in range(0, len(q), 4096):
        near[s : s + 4096] = np.argpartition(-(q[s : s + 4096] @ centres.T), probes - 1, axis=1)[:, :probes]
    asked = np.argsort(near.ravel(), kind="stable") // probes  # queries grouped by the cell they probe
    bounds = np.searchsorted(np.sort(near.ravel()), np.arange(cells + 1))
    sims = np.full((len(q), k), -np.inf, np.float32)
    idx = np.full((len(q), k), -1, np.int64)
    for c in range(cells):
        who = asked[bounds[c] : bounds[c + 1]]
        members = order[starts[c] : starts[c + 1]]
        if not len(who) or not len(members):
            continue
        sim = q[who] @ r[members].T
        if exclude_self:
            sim[who[:, None] == members[None, :]] = -np.inf
        both_v = np.hstack([sims[who], sim])
        both_i = np.hstack([idx[who], np.broadcast_to(members, sim.shape)])
        v, j = _top(both_v, k)
        sims[who], idx[who] = v, np.take_along_axis(both_i, np.maximum(j, 0), 1)
        if progress is not None and c % 64 == 0:
            progress(c, cells)
    if progress is not None:
        progress(cells, cells)
    idx[~np.isfinite(sims)] = -1
    return sims, idx
