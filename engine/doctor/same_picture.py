"""Whether two pictures are *the same picture* (resized, re-compressed, lightly cropped or brightened, a frame of the
same shot), decided on their detail, not on how alike they look overall.

The dataset doctor used to call two pictures copies when their ImageNet embeddings and their 16x16 grey layouts were
both alike. On folders of one kind of picture (scans, X-rays, products on one background, hand signs on one wall)
almost every pair is alike in both, and on the tests' one-kind folders a copy resized to 80% and re-saved at JPEG
quality 60 had an embedding cosine of only 0.70-0.82 with its original (ranked 67th to 310th of its neighbours), so
the old rule both flooded such folders with false copies and missed real ones. Even on flowers most of its pairs were
different photos (docs/benchmarks.md, "Near copies on folders of one kind").

Here the candidates are the pairs alike in embedding or in layout (each image's nearest few by either, so a folder
of N images gives at most a few N pairs), and a candidate is the same picture when its band-passed 64x64 grey
detail correlates at ``SAME`` or more once aligned: one picture's centre crop (the scale and direction whose 16x16
layout fits best, of ``SCALES`` either way round) against the other, at the best shift up to ``MAX_SHIFT`` pixels
(cross-correlation by FFT), and that score stands out from the image's other candidates (:func:`standing_out`).
Two different photos of one kind share their layout but not their detail (texture, noise, the exact outline); a
copy keeps its detail through resizing and JPEG. Small pictures of one outline (clothing at 28 px) have little detail
but their outline: there, different pictures score as high as copies, and only a pair far above the rest is kept.
"""

from __future__ import annotations

import numpy as np

SIZE = 64  # detail thumbnails are SIZE x SIZE grey
SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # centre crops tried (a 5%-per-side crop is 0.9)
MAX_SHIFT = 10  # pixels of SIZE: off-centre crops
BAND = (6, 32)  # cycles per SIZE: without the overall layout (what one kind of picture shares) and JPEG's losses
SAME = 0.92  # aligned detail: one-kind planted copies >= 0.979, different shots <= 0.912 (product folder)
NEIGHBOURS = 5  # candidates per image, by embedding and by layout
LAYOUT_CANDIDATE = 0.90  # a layout neighbour is a candidate from this correlation on
EMBEDDING_CANDIDATE = 0.80  # an embedding neighbour when both its cosine and its layout correlation reach this,
EMBEDDING_ALONE = 0.95  # or its cosine this (a crop of a fine periodic texture: layout 0.50, cosine 0.97)
RATIO = 0.35  # a copy's detail distance is at most this share of the next picture's (standing_out)


def detail_thumbnail(path: str) -> np.ndarray:
    """The SIZE x SIZE grey picture (uint8; zeros when unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("L", (2 * SIZE, 2 * SIZE))  # JPEG: decode at a reduced scale, much faster
            return np.asarray(im.convert("L").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)
    except Exception:
        return np.zeros((SIZE, SIZE), np.uint8)


def _crop_matrix(scale: float, n: int = SIZE) -> np.ndarray:
    """(n, n) bilinear resampling of the centred ``scale`` crop of an n-pixel axis back to n pixels."""
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        x = 0.5 * (1 - scale) * n + (i + 0.5) * scale - 0.5
        x0 = int(np.floor(x))
        for xx, w in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            m[i, min(max(xx, 0), n - 1)] += w
    return m


_CROPS = [_crop_matrix(s) for s in SCALES]
_R = np.sqrt((np.fft.fftfreq(SIZE)[:, None] * SIZE) ** 2 + (np.fft.rfftfreq(SIZE)[None, :] * SIZE) ** 2)
_BAND = ((_R >= BAND[0]) & (_R <= BAND[1])).astype(np.float32)
_HANN = np.outer(np.hanning(SIZE), np.hanning(SIZE)).astype(np.float32)


def _spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Band-passed spectra of (P, SIZE, SIZE) pictures and their energies."""
    from scipy import fft

    x = (x - x.mean((1, 2), keepdims=True)) * _HANN
    f = fft.rfft2(x, workers=-1) * _BAND
    w = np.ones(f.shape[-1], np.float32)
    w[1:-1] = 2  # the half spectrum stands for both halves (SIZE is even)
    return f, (np.abs(f) ** 2 * w).sum((1, 2))


def _unit(x: np.ndarray) -> np.ndarray:
    """Each picture of (P, ...) as a vector with its mean removed, unit length (what correlations compare)."""
    p = x.reshape(len(x), -1)
    p = p - p.mean(1, keepdims=True)
    return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-6)


def _pool(x: np.ndarray, side: int = 16) -> np.ndarray:
    """(P, SIZE, SIZE) -> (P, side*side): block means as a unit vector, the coarse layout."""
    return _unit(x.reshape(len(x), side, SIZE // side, side, SIZE // side).mean((2, 4)))


_COARSE = [_crop_matrix(s, 16) for s in SCALES]
TRIED = 1  # alignments scored in full per pair: the best ones by coarse layout


def aligned_detail(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For pairs of (P, SIZE, SIZE) thumbnails: the best band-passed correlation over the centre crops of either
    one and the shifts up to MAX_SHIFT (1.0: the same detail). Of the 2 x len(SCALES) crops, the ``TRIED`` whose
    16x16 layout matches best are scored in full (the full search costs 12 FFT pairs per pair: 4x the time for the
    same findings on every folder measured)."""
    from scipy import fft

    a, b = a.astype(np.float32), b.astype(np.float32)
    ca, cb = _pool(a), _pool(b)
    coarse_a, coarse_b = ca.reshape(-1, 16, 16), cb.reshape(-1, 16, 16)
    fit = np.stack(
        [
            ((_unit(np.matmul(np.matmul(m, x16), m.T)) * y).sum(1))
            for m in _COARSE
            for x16, y in ((coarse_a, cb), (coarse_b, ca))
        ],
        1,
    )  # (P, 2 * len(SCALES))
    order = np.argsort(-fit, 1)[:, :TRIED]
    spectra = {0: _spectrum(b), 1: _spectrum(a)}  # the uncropped other picture, by direction
    best = np.full(len(a), -1.0, np.float32)
    s = MAX_SHIFT
    for v in np.unique(order):
        rows = np.flatnonzero((order == v).any(1))
        m, direction = _CROPS[v // 2], v % 2
        x = (a if direction == 0 else b)[rows]
        fy, ey = spectra[direction][0][rows], spectra[direction][1][rows]
        fc, ec = _spectrum(np.matmul(np.matmul(m, x), m.T))
        c = fft.irfft2(fc * np.conj(fy), s=(SIZE, SIZE), workers=-1) * (SIZE * SIZE)
        near = np.concatenate([c[:, : s + 1], c[:, -s:]], 1)
        near = np.concatenate([near[:, :, : s + 1], near[:, :, -s:]], 2)
        best[rows] = np.maximum(best[rows], near.max((1, 2)) / np.sqrt(np.maximum(ec * ey, 1e-12)))
    return best


def candidate_pairs(emb: np.ndarray, layout: np.ndarray, k: int = NEIGHBOURS, progress=None) -> set[tuple[int, int]]:
    """(i, j), i < j: each image's ``k`` nearest by embedding cosine among those whose cosine and layout correlation
    reach ``EMBEDDING_CANDIDATE`` (or whose cosine reaches ``EMBEDDING_ALONE``), and its ``k`` nearest by layout
    correlation (whole, or its 5% crop against the other whole) among those reaching ``LAYOUT_CANDIDATE``. ``emb``
    rows unit length, ``layout`` rows as engine/doctor/findings.py's thumbnails. Every pair is compared up to
    engine/neighbours.py's ``EXACT_UP_TO`` images; above, each image's nearest few by either are found through its
    partition and the same rules applied to them (the work grows as n^1.5, not n^2). ``progress(done, total)``."""
    from engine.neighbours import EXACT_UP_TO

    out: set[tuple[int, int]] = set()
    n = len(emb)
    if n < 2:
        return out
    side = int(round(np.sqrt(layout.shape[1])))
    m = _crop_matrix(0.9, side)  # a 5%-per-side crop's layout, to match cropped copies too
    cropped = _unit(np.matmul(np.matmul(m, layout.reshape(-1, side, side)), m.T))
    if n > EXACT_UP_TO:
        return _partitioned_pairs(emb, layout, cropped, k, progress)
    for start in range(0, n, 1024):
        rows = np.arange(start, min(n, start + 1024))
        # this image cropped against every other one whole; the other way round is that image's own row
        lay = np.maximum(layout[rows] @ layout.T, cropped[rows] @ layout.T)
        sim = emb[rows] @ emb.T
        lay[np.arange(len(rows)), rows] = sim[np.arange(len(rows)), rows] = -np.inf  # never oneself
        # embedding neighbours alike in layout too (the old rule, now only a gate), and close layout neighbours
        for rank, ok in (
            (sim, (sim >= EMBEDDING_CANDIDATE) & ((lay >= EMBEDDING_CANDIDATE) | (sim >= EMBEDDING_ALONE))),
            (lay, lay >= LAYOUT_CANDIDATE),
        ):
            r, c = np.nonzero(ok)  # sparse on everyday photos: rank only those
            order = np.lexsort((-rank[r, c], r))
            r, c = r[order], c[order]
            first = np.searchsorted(r, r)  # where each row's run starts
            keep = np.arange(len(r)) - first < k
            out.update((min(a, b), max(a, b)) for a, b in zip((r[keep] + start).tolist(), c[keep].tolist()))
        if progress is not None:
            progress(rows[-1] + 1, n)
    return out


def _partitioned_pairs(emb, layout, cropped, k, progress) -> set[tuple[int, int]]:
    """:func:`candidate_pairs` above the exact search's size: each image's 4k nearest by embedding and by layout
    (whole and cropped) from the partitioned search, then the same gates and the best k of each."""
    from engine.neighbours import most_similar

    n, wide = len(emb), 4 * k
    step = (lambda done, total: progress(done, 3 * total)) if progress else None
    sim, near = most_similar(emb, emb, wide, exclude_self=True, progress=step)
    safe = np.maximum(near, 0)
    lay = np.maximum(np.einsum("id,ijd->ij", layout, layout[safe]), np.einsum("id,ijd->ij", cropped, layout[safe]))
    ok = (near >= 0) & (sim >= EMBEDDING_CANDIDATE) & ((lay >= EMBEDDING_CANDIDATE) | (sim >= EMBEDDING_ALONE))
    out = _best_k(near, sim, ok, k)
    whole, wi = most_similar(layout, layout, wide, exclude_self=True)
    if progress:
        progress(2 * n, 3 * n)
    crop, ci = most_similar(cropped, layout, wide, exclude_self=True)
    both_i, both_v = np.hstack([wi, ci]), np.hstack([whole, crop])
    out |= _best_k(both_i, both_v, (both_i >= 0) & (both_v >= LAYOUT_CANDIDATE), k)
    if progress:
        progress(3 * n, 3 * n)
    return out


def _best_k(near: np.ndarray, value: np.ndarray, ok: np.ndarray, k: int) -> set[tuple[int, int]]:
    """Each row's best ``k`` distinct neighbours among those ``ok``, as (i, j) pairs with i < j."""
    out: set[tuple[int, int]] = set()
    rank = np.where(ok, value, -np.inf)
    order = np.argsort(-rank, axis=1)
    for i, (row_j, row_v) in enumerate(zip(np.take_along_axis(near, order, 1), np.take_along_axis(rank, order, 1))):
        seen: list[int] = []
        for j, v in zip(row_j.tolist(), row_v.tolist()):
            if v == -np.inf or len(seen) == k:
                break
            if j not in seen:
                seen.append(j)
                out.add((min(i, j), max(i, j)))
    return out


def same_pictures(
    pairs: list[tuple[int, int]], thumbs, chunk: int = 256, progress=None
) -> list[tuple[int, int, float]]:
    """The candidate pairs that are the same picture, with their aligned detail; ``thumbs(i)`` gives image i's
    thumbnail. Every pair is scored, then :func:`standing_out` keeps those that stand out."""
    scores = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), chunk):
        if progress is not None:
            progress(s, len(pairs))
        part = pairs[s : s + chunk]
        a = np.stack([thumbs(i) for i, _ in part])
        b = np.stack([thumbs(j) for _, j in part])
        scores[s : s + len(part)] = aligned_detail(a, b)
    return standing_out(pairs, scores)


def standing_out(pairs: list[tuple[int, int]], scores: np.ndarray) -> list[tuple[int, int, float]]:
    """The pairs whose aligned detail reaches ``SAME`` and stands out from each image's other candidates: each image's
    copies are its best-scoring candidates up to the first gap where the detail distance (1 - score) at least
    triples (``RATIO``), and a pair is kept when each image is among the other's copies. Where many pictures share
    one outline (trousers on black at 28 px, where different pictures reach 0.92-0.98) nothing stands out; a copy
    stands out from the next picture by 10 to 300 times its distance (docs/benchmarks.md, "Near copies at low
    resolution"). An image with no other candidate is compared with a distance of 1."""
    by_image: dict[int, list[tuple[float, int]]] = {}
    for (i, j), v in zip(pairs, scores):
        by_image.setdefault(i, []).append((float(v), j))
        by_image.setdefault(j, []).append((float(v), i))
    copies: dict[int, set[int]] = {}
    for i, row in by_image.items():
        row.sort(reverse=True)
        dist = [1.0 - v for v, _ in row] + [1.0]
        for k, (v, _) in enumerate(row):
            if v < SAME:
                break
            if dist[k] <= RATIO * dist[k + 1]:
                copies[i] = {j for _, j in row[: k + 1]}
                break
    return [
        (i, j, float(v))
        for (i, j), v in zip(pairs, scores)
        if v >= SAME and j in copies.get(i, ()) and i in copies.get(j, ())
    ]
