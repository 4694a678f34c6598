"""The dataset doctor: duplicates, leaks between splits, likely wrong labels and outliers, found before training.

Everything comes from what feature extraction already computes: each file's content hash and its frozen-backbone
embedding (both cached), so a folder already used for feature extraction is checked in seconds.

* ``duplicate``: byte-identical files in the same split (content hash);
* ``near-duplicate``: the same picture resized, re-compressed, lightly cropped or brightened, in the same split:
  two signals must agree, the embeddings (cosine >= ``NEAR_EMBEDDING``) and the layout (correlation of 16x16 grey
  thumbnails, brightness and contrast removed, >= ``NEAR_LAYOUT``). Either alone failed on test pictures: two
  different busy pictures of one kind had embeddings at 0.95 while a copy resized to 80% and re-saved at JPEG
  quality 60 had 0.85; their thumbnails correlated at most 0.49 against 0.9998 (a 5% crop: 0.87);
* ``leak``: an exact or near copy across splits (train vs validation/test): it flatters the reported accuracy;
* ``label``: an image whose given class is probably wrong, with the class it more likely belongs to: calibrated
  out-of-sample probabilities put another class first and the given one under a level chosen per folder so that at
  least half of such findings are estimated true; on a folder the features find hard, none (engine/doctor/labels.py);
* ``outlier``: an image far from every other one (a screenshot, a blank frame, something else): the nearest-
  neighbour distance of engine/trust/familiarity.py (the same distance marks ``unfamiliar`` predictions), beyond
  Tukey's far-out fence (Q3 + 3 IQR) of the folder's own distances.

cleanlab is not a dependency: the rule used here is two lines of NumPy, and cleanlab would bring pandas and its own
model wrappers into the app and its bundle. ``python -m benchmarks doctor`` runs cleanlab beside it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from dataclasses import dataclass, field

import numpy as np

from engine.config import TrainConfig, option
from engine.data.folder import Dataset, scan
from engine.data.splits import _key
from engine.doctor import labels, same_picture
from engine.events import Callbacks, Cancelled, CancelToken, Phase, Progress
from engine.paths import default_cache_dir
from engine.runs import atomic_write_text
from engine.train.feature_extraction import embed_dataset
from engine.train.probe import Blocks
from engine.trust.familiarity import K, fence, knn_distance, normalise

ISSUES = ("duplicate", "near-duplicate", "leak", "label", "outlier")
NEAR_EMBEDDING = 0.80  # cosine similarity of the embeddings ...
NEAR_LAYOUT = 0.80  # ... and correlation of the thumbnails, both at least this: the same picture
FOLDS = 5
CSV_HEADER = ["issue", "path", "other_path", "label", "suggested_label", "score", "precision"]

_SHARED = (
    "data",
    "backbone",
    "weights",
    "download",
    "val_split",
    "test_split",
    "seed",
    "device",
    "engine",
    "precision",
    "cache",
    "cache_dir",
    "exclude",
)
# The doctor takes train's options for the folder, backbone, split and cache: the same fields, declared once.
DoctorConfig = dataclasses.make_dataclass(
    "DoctorConfig",
    [
        (f.name, f.type, field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(TrainConfig)
        if f.name in _SHARED
    ]
    + [
        ("csv", "str | None", option(None, "also write the findings to this CSV file", parse=str)),
        (
            "run",
            "str | None",
            option(None, "a run of this folder: its accuracy re-scored without leaked images", parse=str),
        ),
    ],
    namespace={"__doc__": "``python -m engine doctor DATA``: train's folder, backbone, split and cache options."},
)


@dataclass(frozen=True)
class Finding:
    issue: str
    path: str
    other_path: str = ""
    label: str = ""
    suggested_label: str = ""
    score: float = 0.0  # higher: more certainly a problem (for sorting)
    precision: float | None = None  # wrong labels: the estimated share of such findings that are true

    def row(self) -> list[str]:
        p = "" if self.precision is None else f"{self.precision:.3f}"
        return [self.issue, self.path, self.other_path, self.label, self.suggested_label, f"{self.score:.4f}", p]


class DetailThumbnails:
    """engine/doctor/same_picture.py's thumbnails of the images in candidate pairs, decoded once and kept in the
    cache."""

    def __init__(self, paths: list[str], hashes: list[str], cache_dir: str | None) -> None:
        from engine.embed.cache import DetailCache

        self.paths, self.hashes, self.cache = paths, hashes, DetailCache(cache_dir)
        self.memo: dict[int, np.ndarray] = {}

    def get(self, i: int) -> np.ndarray:
        if i not in self.memo:
            v = self.cache.get(self.hashes[i])
            if v is None:
                v = same_picture.detail_thumbnail(self.paths[i]).astype(np.float32).ravel()
                if v.any():
                    self.cache.put(self.hashes[i], v)
            self.memo[i] = v.reshape(same_picture.SIZE, same_picture.SIZE)
        return self.memo[i]

    def save(self) -> None:
        self.cache.save()


@dataclass
class DoctorResult:
    findings: list[Finding] = field(default_factory=list)
    dataset: Dataset | None = None
    features: np.ndarray | None = None  # (N, D) embeddings of dataset.samples' kept images (for the map)
    paths: list[str] = field(default_factory=list)  # the images those rows belong to
    leaked_eval: int = 0  # validation/test images with a copy in train
    rescored: dict | None = None  # {"accuracy", "accuracy_without_leaks", "removed"} for config.run
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False
    label_agreement: float | None = None  # out-of-sample heads vs the given labels
    label_note: str = ""  # why labels were not checked ("" when they were)
    label_precision: float | None = None  # estimated share of the wrong-label findings that are wrong labels
    label_expected: float | None = None  # how many the rule would list even if every label were right

    def counts(self) -> dict[str, int]:
        return {k: sum(f.issue == k for f in self.findings) for k in ISSUES}

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(f.row() for f in self.findings)
        return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the checks


def thumbnail(path: str, size: int = 16) -> np.ndarray:
    """A picture's layout: its size x size grey thumbnail with mean and scale removed (zeros when unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("L", (4 * size, 4 * size))  # JPEG: decode at 1/2..1/8 scale, much faster
            a = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32).ravel()
    except Exception:
        return np.zeros(size * size, np.float32)
    a -= a.mean()
    return a / max(float(np.linalg.norm(a)), 1e-6)


def layouts(
    paths: list[str], hashes: list[str] | None = None, cache_dir: str | None = None, progress=None
) -> np.ndarray:
    """:func:`thumbnail` of each path; with ``hashes`` and ``cache_dir``, kept in the cache's layout file."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.data.decode import decode_workers
    from engine.embed.cache import LayoutCache

    cache = LayoutCache(cache_dir) if cache_dir and hashes is not None else LayoutCache(None)
    out = [cache.get(h) for h in hashes] if hashes is not None else [None] * len(paths)
    todo = [i for i, v in enumerate(out) if v is None]
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for n, (i, v) in enumerate(zip(todo, pool.map(thumbnail, [paths[i] for i in todo]))):
            out[i] = v
            if hashes is not None and v.any():  # (an unreadable file's zeros are not kept)
                cache.put(hashes[i], v)
            if progress is not None and n % 256 == 255:
                progress(n + 1, len(todo))
    cache.save()
    return np.stack(out).astype(np.float32) if paths else np.zeros((0, 256), np.float32)


def copies(
    ds: Dataset,
    hashes: list[str],
    feats: np.ndarray,
    layout: np.ndarray | None = None,
    cache_dir: str | None = None,
    step=None,
) -> list[Finding]:
    """Exact and near copies: ``duplicate`` / ``near-duplicate`` in one split, ``leak`` across splits (the copy in
    validation or test is the finding; its train original is ``other_path``). Near copies are decided by
    engine/doctor/same_picture.py. ``layout``: :func:`layouts` of the samples (computed when not given); ``cache_dir``:
    where the detail thumbnails of candidate pairs are kept; ``step(message)``: a ``(done, total)`` progress reporter
    for each stage."""
    samples = ds.samples
    out: list[Finding] = []
    first: dict[str, int] = {}
    exact: set[tuple[int, int]] = set()
    for i, h in enumerate(hashes):
        if h in first:
            exact.add((first[h], i))
        else:
            first[h] = i
    pairs = [(i, j, 1.0, True) for i, j in sorted(exact)]
    lay = layouts([s.path for s in samples]) if layout is None else layout
    candidates = sorted(
        p
        for p in same_picture.candidate_pairs(normalise(feats), lay, progress=_report(step, "looking for copies"))
        if p not in exact and hashes[p[0]] != hashes[p[1]]
    )
    details = DetailThumbnails([s.path for s in samples], hashes, cache_dir)
    compare = _report(step, "comparing the pictures of candidate copies")
    pairs += [(i, j, v, False) for i, j, v in same_picture.same_pictures(candidates, details.get, progress=compare)]
    details.save()
    for i, j, sim, is_exact in pairs:
        a, b = samples[i], samples[j]
        if a.split != b.split:
            keep, copy_ = (a, b) if a.split == "train" else (b, a)
            issue = "leak"
        else:
            keep, copy_ = a, b
            issue = "duplicate" if is_exact else "near-duplicate"
        other_cls = ds.classes[keep.label] if keep.label != copy_.label else ""
        out.append(Finding(issue, copy_.path, keep.path, ds.classes[copy_.label], other_cls, 2.0 if is_exact else sim))
    return out


def outliers(feats: np.ndarray, progress=None) -> tuple[np.ndarray, float]:
    """Each image's k-th nearest-neighbour distance to the others, and the far-out fence (what marks an image
    ``unfamiliar`` at prediction time, applied to the folder itself)."""
    d = knn_distance(feats, feats, K, exclude_self=True, progress=progress)
    return d, fence(d)


# ------------------------------------------------------------------------------------------------ the job


def check(
    ds: Dataset,
    hashes: list[str],
    feats: np.ndarray,
    seed: int = 0,
    cancel: CancelToken | None = None,
    cache_dir: str | None = None,
    notes: dict | None = None,
    blocks: Blocks | None = None,
    progress=None,
) -> list[Finding]:
    """Every finding for the dataset's kept samples (``hashes``/``feats`` aligned with ``ds.samples``), worst first
    within each issue type. ``feats``: the final features, then (``blocks``) the earlier layers' (the label check
    may read them; copies and outliers compare the final ones). ``cache_dir``: where the layout and detail
    thumbnails are kept (None: computed each time); ``notes`` receives ``label_agreement``, ``label_precision``,
    ``label_expected`` and, when the labels could not be checked, ``label_note``."""
    blocks = blocks or Blocks([feats.shape[1]])
    final = feats[:, : blocks.final]
    y = np.array([s.label for s in ds.samples], dtype=np.int64)
    step = (lambda message: _report_to(progress, message)) if progress else None
    paths = [s.path for s in ds.samples]
    found = copies(ds, hashes, final, layouts(paths, hashes, cache_dir, _report(step, "reading thumbnails")), cache_dir,
                   step)  # fmt: skip
    if cancel is not None:
        cancel.raise_if_cancelled()
    if len(ds.classes) >= 2 and len(y) >= 2 * FOLDS:
        keys = [_key(s.path, ds.root) for s in ds.samples]
        judged = _report(step, "judging every label out of sample")
        probs = labels.out_of_sample_probs(feats, y, len(ds.classes), seed, keys, blocks, cancel,
                                           (lambda p: judged(p.done, p.total)) if judged else None)  # fmt: skip
        result = labels.check_labels(probs, y)
        if notes is not None:
            notes.update(label_agreement=result.agreement, label_precision=result.precision,
                         label_expected=result.expected_if_right, label_note=result.note)  # fmt: skip
        for i, k, score in result.listed:
            s = ds.samples[i]
            found.append(Finding("label", s.path, "", ds.classes[s.label], ds.classes[k], score, result.precision))
    d, fence = outliers(final, _report(step, "looking for outliers"))
    for i in np.flatnonzero(d > fence):
        s = ds.samples[i]
        found.append(Finding("outlier", s.path, "", ds.classes[s.label], "", float(d[i] - fence)))
    order = {k: n for n, k in enumerate(ISSUES)}
    return sorted(found, key=lambda f: (order[f.issue], -f.score, f.path))


def _report_to(progress, message: str):
    """A ``(done, total)`` reporter of one step of the check, as Progress events carrying what the step does."""
    return lambda done, total: progress(Progress(Phase.CHECKING, int(done), int(total), message=message))


def _report(step, message: str):
    return step(message) if step is not None else None


def doctor(config, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> DoctorResult:
    """Scan, embed (what the cache lacks) and check a folder; optionally write the CSV and re-score a run."""
    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    try:
        cb.on_log(f"Scanning {config.data}")
        ds = scan(
            config.data,
            config.val_split,
            config.test_split,
            config.seed,
            cancel,
            cb.on_progress,
            exclude=config.exclude,
        )
        emb = embed_dataset(config, ds, cb, cancel, taps=True)
        cache_dir = (config.cache_dir or default_cache_dir()) if config.cache else None
        notes: dict = {}
        findings = check(
            ds, emb.hashes, emb.features, config.seed, cancel, cache_dir, notes, emb.blocks, cb.on_progress
        )
        feats = emb.final
    except Cancelled:
        return DoctorResult(cancelled=True, seconds=time.perf_counter() - t0)
    res = DoctorResult(
        findings,
        ds,
        feats,
        [s.path for s in ds.samples],
        skipped=ds.skipped,
        label_agreement=notes.get("label_agreement"),
        label_note=notes.get("label_note", ""),
        label_precision=notes.get("label_precision"),
        label_expected=notes.get("label_expected"),
    )
    res.leaked_eval = len({f.path for f in findings if f.issue == "leak"})
    if config.run:
        res.rescored = rescore_without_leaks(config.run, {f.path for f in findings if f.issue == "leak"})
    if config.csv:
        atomic_write_text(config.csv, res.csv_text())
    res.seconds = time.perf_counter() - t0
    cb.on_progress(Progress(Phase.CHECKING, 1, 1))
    counts = res.counts()
    cb.on_log(
        f"Checked {len(ds.samples)} images in {res.seconds:.1f} s: "
        + (", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no problems found")
        + (f". {res.label_note}" if res.label_note else "")
    )
    return res


def rescore_without_leaks(run_dir: str, leaked: set[str]) -> dict | None:
    """A run's validation accuracy, and the same without the images that have a copy in train."""
    from engine.runs import read_predictions

    rows = [r for r in read_predictions(run_dir) if r.get("split") == "val"]
    if not rows:
        return None
    norm = {os.path.abspath(p) for p in leaked}
    kept = [r for r in rows if os.path.abspath(r["path"]) not in norm]
    acc = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    acc_kept = sum(r["label"] == r["prediction"] for r in kept) / len(kept) if kept else None
    return {"accuracy": acc, "accuracy_without_leaks": acc_kept, "removed": len(rows) - len(kept), "n": len(rows)}


# ------------------------------------------------------------------------------------------------ the map


def pca_2d(feats: np.ndarray) -> np.ndarray:
    """A first 2-D map of the embeddings in milliseconds: their two principal components."""
    x = normalise(feats)
    x = x - x.mean(0)
    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32)
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 2000)], full_matrices=False)  # axes from up to ~2,000 images
    return (x @ vt[:2].T).astype(np.float32)


@dataclass
class MapConfig:
    """The neighbourhood-preserving map of a folder's embeddings (t-SNE; not a command-line job)."""

    features: np.ndarray
    seed: int = 0


def tsne_map(config: MapConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> np.ndarray:
    """t-SNE (scikit-learn) of the normalised embeddings, started from their PCA map so the points move little.

    scikit-learn is the kept library for it (UMAP would bring numba and llvmlite, ~150 MB); it cannot be
    interrupted, so a cancel is honoured before it starts.
    """
    from sklearn.manifold import TSNE

    (cancel or CancelToken()).raise_if_cancelled()
    x = normalise(config.features)
    if len(x) < 5:
        return pca_2d(config.features)
    init = pca_2d(config.features)
    init = init / max(float(init[:, 0].std()), 1e-6) * 1e-4  # scikit-learn's own PCA init uses this scale
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    return (
        TSNE(2, perplexity=perplexity, init=init, random_state=config.seed, metric="cosine", n_jobs=1)
        .fit_transform(x)
        .astype(np.float32)
    )
