"""``python -m engine label DATA --labels LABELS.csv --next N --csv OUT.csv``: one round of labelling a folder.

Every image under DATA is embedded once (the embedding cache, as for training; unreadable files are skipped and
reported). With at least two classes labelled, feature extraction's cross-fitted head (engine/train/crossfit.py)
trains on the labels so far: the fold heads judge every labelled image out of sample, which gives the temperature
and how often a suggestion at a given confidence was right; the final head suggests a class, with a calibrated
confidence, for every other image. Images far from every label are marked unfamiliar (engine/trust/familiarity.py).
Then :mod:`engine.labelling.picks` chooses the next images to ask about.
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
from engine.data.folder import Dataset, Sample
from engine.data.labels import classes_of, list_images, read_labels
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, Progress
from engine.labelling.picks import next_batch
from engine.runs import atomic_write_text
from engine.train.crossfit import cross_fit, fold_ids
from engine.train.feature_extraction import embed_dataset
from engine.trust.calibration import fit_temperature, probabilities
from engine.trust.familiarity import familiarity_block, knn_distance

ACCEPT_LEVEL = 0.95  # "Accept suggestions" offers the unlabelled images at least this confident
CSV_HEADER = ["path", "suggested_label", "confidence", "status", "ask"]
_SHARED = ("data", "backbone", "weights", "download", "seed", "device", "engine", "precision", "cache", "cache_dir")
LabelConfig = dataclasses.make_dataclass(
    "LabelConfig",
    [
        (f.name, f.type, field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(TrainConfig)
        if f.name in _SHARED
    ]
    + [
        (
            "labels",
            "str | None",
            option(None, "the labels so far (CSV: path, label, source); missing: none", parse=str),
        ),
        ("next", "int", option(10, "how many images to ask about next", parse=int)),
        ("csv", "str | None", option(None, "write one row per unlabelled image here", parse=str)),
        ("accept_level", "float", option(ACCEPT_LEVEL, "the confidence 'accept suggestions' takes", parse=float)),
    ],
    namespace={"__doc__": "``python -m engine label DATA``: train's folder, backbone and cache options, and labels."},
)


@dataclass
class Suggestions:
    """What the model trained on the labels so far says about every image (indices into the features)."""

    classes: list[str]
    probs: np.ndarray | None  # (n, C) calibrated, None without two classes
    unfamiliar: np.ndarray | None  # (n,) bool
    ask: list[int]  # the next images to ask about, in order
    accept: dict = field(default_factory=dict)  # level, unlabelled images it would label, how often right so far
    head: dict | None = None  # the final head ("weight", "bias") and its "temperature"


def suggest(
    X: np.ndarray, y: np.ndarray, classes: list[str], n_next: int, seed: int = 0, level: float = ACCEPT_LEVEL
) -> Suggestions:
    """``y``: each image's class index, -1 unlabelled, -2 "not a class". The pure core of a round, shared by the job
    and the labelling benchmark."""
    labelled = np.flatnonzero(y >= 0)
    unlabelled = np.flatnonzero(y == -1)
    present = np.unique(y[labelled])
    if len(present) < 2:
        return Suggestions(classes, None, None, next_batch(X, unlabelled, n_next, seed, None, None))
    yl = y[labelled]
    keys = [str(i) for i in labelled]
    k = int(min(5, len(labelled)))
    res = cross_fit(
        X[labelled], yl, fold_ids(yl, keys, seed, k), len(classes), k=k, extra={"final": np.ones(len(labelled), bool)},
        epochs=100, batch_size=64, lr=3e-3, weight_decay=1e-4, patience=15, seed=seed,
    )  # fmt: skip
    t = fit_temperature(res.oof_logits, yl)
    head = res.heads["final"]
    probs = probabilities(X @ head["weight"].T + head["bias"], t)
    oof = probabilities(res.oof_logits, t)
    sure = oof.max(1) >= level
    top2 = np.sort(probs, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    fam = familiarity_block(X[labelled], None, seed)
    unfamiliar = knn_distance(X, X[labelled], k=fam["k"]) > fam["threshold"]
    accept = {
        "level": level,
        "would_label": int((probs[unlabelled].max(1) >= level).sum()) if len(unlabelled) else 0,
        "right_so_far": float((oof.argmax(1) == yl)[sure].mean()) if sure.any() else None,
        "judged": int(sure.sum()),
        "temperature": t,
    }
    picks = next_batch(X, unlabelled, n_next, seed, margin, unfamiliar)
    return Suggestions(classes, probs, unfamiliar, picks, accept, {**head, "temperature": t})


@dataclass
class LabelResult:
    rows: list[list]  # CSV_HEADER rows, one per unlabelled image
    classes: list[str]
    n_images: int
    n_labelled: int
    accept: dict
    skipped: list[tuple[str, str]]
    seconds: float
    cancelled: bool = False


def label(config, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> LabelResult:
    cb, cancel = callbacks or Callbacks(), cancel or CancelToken()
    t0 = time.perf_counter()
    try:
        paths = list_images(config.data)
        if not paths:
            raise EngineError(f"No images under {config.data} (JPEG, PNG, BMP, GIF, WebP, TIFF).")
        given = read_labels(config.labels)
        cb.on_log(f"{len(paths)} images under {config.data}; {len(given)} labelled so far")
        ds = Dataset(config.data, "unsorted", [], [Sample(p, -1, "train") for p in paths])
        cb.on_progress(Progress(Phase.EMBEDDING, 0, len(paths)))
        feats, _ = embed_dataset(config, ds, cb, cancel)
        kept = [s.path for s in ds.samples]
        classes = classes_of(given)
        index = {c: i for i, c in enumerate(classes)}
        y = np.full(len(kept), -1, np.int64)
        for i, p in enumerate(kept):
            lab = given.get(os.path.abspath(p))
            if lab is not None:
                y[i] = index[lab[0]] if lab[0] else -2
        cancel.raise_if_cancelled()
        s = suggest(feats, y, classes, config.next, config.seed, config.accept_level)
    except Cancelled:
        return LabelResult([], [], 0, 0, {}, [], time.perf_counter() - t0, True)
    ask = {i: r + 1 for r, i in enumerate(s.ask)}
    rows = []
    for i in np.flatnonzero(y == -1):
        if s.probs is None:
            rows.append([kept[i], "", "", "", ask.get(i, "")])
            continue
        j = int(s.probs[i].argmax())
        conf = float(s.probs[i, j])
        status = "unfamiliar" if s.unfamiliar[i] else ("sure" if conf >= config.accept_level else "unsure")
        rows.append([kept[i], classes[j], f"{conf:.4f}", status, ask.get(i, "")])
    if config.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(rows)
        atomic_write_text(config.csv, buf.getvalue())
    return LabelResult(rows, classes, len(kept), int((y >= 0).sum()), s.accept, ds.skipped, time.perf_counter() - t0)
