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
from engine.data.labels import (
    CHECK_SHARE,
    MIN_CHECKS,
    check_draws,
    classes_of,
    folder_draws,
    folder_labels,
    list_images,
    read_labels,
    write_labels,
)
from engine.embed.spaces import SpaceStore
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, Progress
from engine.labelling.picks import next_batch
from engine.paths import default_cache_dir
from engine.runs import atomic_write_text
from engine.train.crossfit import fold_ids
from engine.train.feature_extraction import embed_dataset
from engine.train.probe import Blocks, fit_probe, mapped
from engine.trust.calibration import fit_temperature, probabilities
from engine.trust.familiarity import familiarity_block, knn_distance
from engine.trust.scores import wilson_interval

# Until this many labels per class the batches are TypiClust's (the typical images of the clusters the labels cover
# least), then the least certain images spread across the folder: at 2 labels per class on the digits uncertainty
# was no better than chance (docs/benchmarks.md), as published work finds at small budgets. 3 rather than 5: three
# seeds each, digits 10/cl 0.667 -> 0.674 and 20/cl 0.758 -> 0.770, flowers 16/cl 0.588 -> 0.612 and 20/cl 0.617 ->
# 0.637 (hymenoptera and the 4-class scans ask the same images either way).
TYPICAL_UNTIL = 3
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
        (
            "folder_classes",
            "bool",
            option(
                False,
                "a partly sorted folder: each image in a top-level subfolder takes the subfolder's name as its "
                "label (source 'folder', written into --labels; your own labels win); the loose ones are asked",
            ),
        ),
    ],
    namespace={"__doc__": "``python -m engine label DATA``: train's folder, backbone and cache options, and labels."},
)


@dataclass
class Suggestions:
    """What the model trained on the labels so far says about every image (indices into the features)."""

    classes: list[str]
    probs: np.ndarray | None  # (n, C) the fold heads' mean, calibrated; None without two classes
    unfamiliar: np.ndarray | None  # (n,) bool
    ask: list[int]  # the next images to ask about, in order
    accept: dict = field(default_factory=dict)  # level, unlabelled images it would label, how often right so far
    head: dict | None = None  # the final head ("weight", "bias": on probe.mapped features) and its "temperature"
    # accuracy on the random checks labelled so far (judged by the head trained on every other label, the one the
    # picks come from), and its 95% Wilson interval: the model's accuracy on the folder (None until MIN_CHECKS of them)
    estimate: float | None = None
    n_labelled: int = 0
    agreed: np.ndarray | None = None  # (n,) bool: every fold head and the final head suggest the same class
    estimate_range: tuple[float, float] | None = None
    checks: int = 0  # random checks labelled, of classes with at least two labels (what the estimate is on)


def suggest(
    X: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    n_next: int,
    seed: int = 0,
    level: float = ACCEPT_LEVEL,
    draws: np.ndarray | None = None,
    own: np.ndarray | None = None,
    blocks: Blocks | None = None,
    spaces: SpaceStore | None = None,
) -> Suggestions:
    """``y``: each image's class index, -1 unlabelled, -2 "not a class"; ``draws``: each image's check draw
    (:func:`engine.data.labels.check_draws` of its path; default: of its row number); ``own``: which labels are
    the user's own (default: all), the only ones a random check counts on (an accepted suggestion would only agree
    with the model). ``blocks``: how ``X``'s columns split into the final features and the earlier layers' (default:
    all final). ``spaces``: where the pile's feature spaces are kept (engine/embed/spaces.py; None: in memory). The
    pure core of a round, shared by the job and the labelling benchmark."""
    labelled = np.flatnonzero(y >= 0)
    unlabelled = np.flatnonzero(y == -1)
    present = np.unique(y[labelled])
    draws = check_draws([str(i) for i in range(len(X))]) if draws is None else draws
    if len(present) < 2:
        final = X[:, : blocks.final] if blocks else X
        return Suggestions(classes, None, None, next_batch(final, unlabelled, n_next, seed, None, None, draws=draws))
    yl = y[labelled]
    keys = [str(i) for i in labelled]
    k = int(min(5, len(labelled)))
    blocks = blocks or Blocks([X.shape[1]])
    final = X[:, : blocks.final]  # the final features as they are: what "unfamiliar" and TypiClust's picks compare
    # The random checks (the user's own labels of images drawn as checks) are kept from the picks: a head trained
    # without them chooses what to ask and is the one the estimate judges them with, so each check is what a random
    # test image is to the model, an image nobody chose to ask near.
    check = draws[labelled] < CHECK_SHARE
    if own is not None:
        check &= own[labelled]
    blind = ~check
    extra = {"final": np.ones(len(labelled), bool)}
    if check.any() and len(np.unique(yl[blind])) >= 2:
        extra["without checks"] = blind
    # The whole folder fixes the features' centring, scaling and axes (with 2-5 labels a class the labels' own
    # centre is noisy: hymenoptera 2/cl 0.757 against 0.809 with the folder's, random labels, 4 seeds); the
    # regularisation and the features are chosen by the other labels' out-of-fold loss alone, so the head the
    # checks judge was not chosen by them either.
    Xm = mapped(X, blocks.final)  # the features as the heads read them (the final ones raised to a power)
    res = fit_probe(
        Xm[labelled], yl, fold_ids(yl, keys, seed, k), len(classes), blocks, k=k, extra=extra, stats=Xm, seed=seed,
        judge=blind if "without checks" in extra else None, spaces=spaces,
    )  # fmt: skip
    Xh = Xm[:, : res.columns]  # what the chosen heads read
    t = fit_temperature(res.oof_logits, yl)
    head = res.heads["final"]
    # A suggestion's confidence is the k fold heads' mean calibrated probability: the temperature was fitted on those
    # heads judging images they never saw, which is what every unlabelled image is to them. The final head (trained
    # on every label, so sharper) is the model; with its own probabilities, the flowers it put at >= 95% after 150
    # labels were 0.885-0.928 right, with the fold heads' mean 0.917-1.000 over three runs, 86 of 89
    # (docs/benchmarks.md, label).
    folds = [probabilities(Xh @ fh["weight"].T + fh["bias"], t) for fh in res.fold_heads]
    probs = np.mean(folds, 0)
    oof = probabilities(res.oof_logits, t)
    picker = res.heads.get("without checks")
    top2 = np.sort(probs if picker is None else probabilities(Xh @ picker["weight"].T + picker["bias"], t), 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    unfamiliar = _far_from(final, final[labelled], seed)
    seen = labelled[blind]
    # (what the picks take as unfamiliar: far from every label but the checks)
    strange = _far_from(final, final[seen], seed) if picker is not None else unfamiliar
    agreed, accept = _acceptable(Xh, head, folds, probs, oof, yl, unlabelled, level)
    accept["temperature"] = t
    accept["features"] = res.features
    share = 1.0 if len(seen) < TYPICAL_UNTIL * len(np.unique(yl[blind])) else 0.0
    # TypiClust's rounds cover the pile's kinds on the features as they are; later picks spread the head's doubts over
    # the final features as it reads them (docs/benchmarks.md, "Picks on the head's view": hand signs +2.6 points)
    view = final if share else Xm[:, : blocks.final]
    picks = next_batch(view, unlabelled, n_next, seed, margin, strange, seen, share, draws)
    estimate, interval, n_checks = _check_estimate(picker, Xh[labelled], yl, check, len(classes))
    return Suggestions(
        classes, probs, unfamiliar, picks, accept, {**head, "temperature": t}, estimate, len(labelled), agreed,
        interval, n_checks,
    )  # fmt: skip


def _far_from(X: np.ndarray, ref: np.ndarray, seed: int) -> np.ndarray:
    """Which rows of ``X`` are unfamiliar to the labelled images ``ref`` (engine/trust/familiarity.py's rule)."""
    fam = familiarity_block(ref, None, seed)
    return knn_distance(X, ref, k=fam["k"]) > fam["threshold"]


def _acceptable(X, head, folds, probs, oof, yl, unlabelled, level: float) -> tuple[np.ndarray, dict]:
    """Which images *Accept suggestions* may take (every fold head and the final head suggest the same class; the
    level is applied on top), and what it says: how many unlabelled images it would label at ``level``, and how
    often the labelled images judged (out of fold) that sure were right."""
    top = probs.argmax(1)
    agreed = (X @ head["weight"].T + head["bias"]).argmax(1) == top
    for p in folds:
        agreed &= p.argmax(1) == top
    acceptable = (probs.max(1) >= level) & agreed
    sure = oof.max(1) >= level
    right = oof.argmax(1) == yl
    return agreed, {
        "level": level,
        "would_label": int(acceptable[unlabelled].sum()) if len(unlabelled) else 0,
        "right_so_far": float(right[sure].mean()) if sure.any() else None,
        # how low that could really be (95% Wilson): 28 of 28 right is "at least 88%", not "100%"; on flowers
        # accepted suggestions were 0.885 right while the labelled images judged that sure were all right
        "right_at_least": wilson_interval(int(right[sure].sum()), int(sure.sum()))[0] if sure.any() else None,
        "judged": int(sure.sum()),
    }


def _check_estimate(picker: dict | None, Xl: np.ndarray, yl: np.ndarray, check: np.ndarray, n_classes: int):
    """The estimate: the random checks only (the other labels are the images the picks chose for being hard),
    judged by the head that never saw them (``picker``), and of those only the ones whose class that head has seen.
    Returns (accuracy, its 95% Wilson interval, checks judged); the first two None under MIN_CHECKS."""
    if picker is None:
        return None, None, 0
    judged = check & (np.bincount(yl[~check], minlength=n_classes)[yl] >= 1)
    n = int(judged.sum())
    if n < MIN_CHECKS:
        return None, None, n
    right = int(((Xl @ picker["weight"].T + picker["bias"]).argmax(1) == yl)[judged].sum())
    return right / n, wilson_interval(right, n), n


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
    estimate: tuple[float, float, float, int] | None = None  # accuracy, its 95% range, on how many random checks
    checks: int = 0  # random checks labelled so far (of classes with two labels or more)


@dataclass
class Pile:
    """A folder opened for labelling: every readable image under it (as listed) and its embedding."""

    root: str
    paths: list[str]
    feats: np.ndarray  # (n, d), rows in the order of ``paths``: the final features, then the earlier layers'
    skipped: list[tuple[str, str]]
    cancelled: bool = False
    blocks: Blocks | None = None  # how ``feats``' columns split (None: all final)
    _draws: np.ndarray | None = field(default=None, repr=False, compare=False)

    def draws(self) -> np.ndarray:
        """Each image's random-check draw, from its path within the folder (the same checks wherever the folder
        is)."""
        if self._draws is None or len(self._draws) != len(self.paths):
            self._draws = folder_draws(self.root, self.paths)
        return self._draws

    def targets(self, given: dict[str, tuple[str, str]], classes: list[str] | None = None) -> np.ndarray:
        """Each image's class index in ``classes`` (default: the labels' own), -1 unlabelled, -2 "not a class"."""
        index = {c: i for i, c in enumerate(classes if classes is not None else classes_of(given))}
        y = np.full(len(self.paths), -1, np.int64)
        for i, p in enumerate(self.paths):
            lab = given.get(os.path.abspath(p))
            if lab is not None:
                y[i] = index[lab[0]] if lab[0] else -2
        return y


def open_pile(config, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> Pile:
    """The job that opens ``config.data`` for labelling: lists every image at any depth and embeds it (the
    embedding cache, as for training; unreadable files skipped and reported)."""
    cb, cancel = callbacks or Callbacks(), cancel or CancelToken()
    try:
        paths = list_images(config.data)
        if not paths:
            raise EngineError(f"No images under {config.data} (JPEG, PNG, BMP, GIF, WebP, TIFF).")
        cb.on_log(f"{len(paths)} images under {config.data}")
        ds = Dataset(config.data, "unsorted", [], [Sample(p, -1, "train") for p in paths])
        cb.on_progress(Progress(Phase.EMBEDDING, 0, len(paths)))
        emb = embed_dataset(config, ds, cb, cancel, taps=True)
    except Cancelled:
        return Pile(config.data, [], np.zeros((0, 0), np.float32), [], True)
    return Pile(config.data, [s.path for s in ds.samples], emb.features, ds.skipped, blocks=emb.blocks)


def next_round(
    pile: Pile,
    y: np.ndarray,
    classes: list[str],
    n_next: int = 10,
    level: float = ACCEPT_LEVEL,
    seed: int = 0,
    callbacks: Callbacks | None = None,
    cancel: CancelToken | None = None,
    own: np.ndarray | None = None,
) -> Suggestions:
    """A round on an opened pile (the app's labelling view runs one in the background after every few labels)."""
    return suggest(pile.feats, y, classes, n_next, seed, level, pile.draws(), own, pile.blocks)


def label(config, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> LabelResult:
    cb, cancel = callbacks or Callbacks(), cancel or CancelToken()
    t0 = time.perf_counter()
    given = read_labels(config.labels)
    pile = open_pile(config, cb, cancel)
    if pile.cancelled:
        return LabelResult([], [], 0, 0, {}, [], time.perf_counter() - t0, True)
    if config.folder_classes:  # as the Label tab's "Subfolders are classes": never over the user's own labels
        found = {p: v for p, v in folder_labels(pile.root, pile.paths).items() if p not in given}
        given.update(found)
        cb.on_log(f"{len(found)} image(s) labelled by their subfolder's name")
        if config.labels and found:
            write_labels(config.labels, given)
    cb.on_log(f"{len(given)} labelled so far")
    kept, feats = pile.paths, pile.feats
    classes = classes_of(given)
    y = pile.targets(given, classes)
    own = np.array([given.get(os.path.abspath(p), ("", ""))[1] == "user" for p in kept], bool)
    cache_dir = (config.cache_dir or default_cache_dir()) if config.cache else None
    s = suggest(feats, y, classes, config.next, config.seed, config.accept_level, pile.draws(), own, pile.blocks,
                SpaceStore(cache_dir))  # fmt: skip
    ask = {i: r + 1 for r, i in enumerate(s.ask)}
    rows = []
    for i in np.flatnonzero(y == -1):
        if s.probs is None:
            rows.append([kept[i], "", "", "", ask.get(i, "")])
            continue
        j = int(s.probs[i].argmax())
        conf = float(s.probs[i, j])
        sure = conf >= config.accept_level and s.agreed[i]
        status = "unfamiliar" if s.unfamiliar[i] else ("sure" if sure else "unsure")
        rows.append([kept[i], classes[j], f"{conf:.4f}", status, ask.get(i, "")])
    if config.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(rows)
        atomic_write_text(config.csv, buf.getvalue())
    estimate = (s.estimate, *s.estimate_range, s.checks) if s.estimate is not None else None
    return LabelResult(
        rows, classes, len(kept), int((y >= 0).sum()), s.accept, pile.skipped, time.perf_counter() - t0, False,
        estimate, s.checks,
    )  # fmt: skip
