"""The labels file: ``path, label, source`` (CSV), saved atomically after every change.

``source`` is ``user`` (the user's own label) or ``accepted`` (a suggestion the user accepted in bulk): both train,
and they are kept apart so a user can review or drop what was accepted. An empty ``label`` from the user means
"not a class": the image is left out. Paths are kept as the folder listing gives them (``DATA/...``, like the
predict CSV); they are matched by absolute path, so the same file given as ``./DATA/x.jpg`` is the same image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter

import numpy as np

from engine.data.edits import free_name, place
from engine.data.folder import (
    Dataset,
    Sample,
    ScanResult,
    _assign_splits,
    _check_files,
    _class_dirs,
    _hidden,
    dataset_warnings,
    is_image_name,
    scan_folder,
    walk_images,
)
from engine.data.splits import SPLIT_NAMES, excluded_paths
from engine.events import Callbacks, Cancelled, CancelToken, EngineError
from engine.runs import atomic_write_text

HEADER = ["path", "label", "source"]
SOURCES = ("user", "accepted", "folder")  # folder: taken from the class folder the image is in (a partly sorted pile)


def list_images(root: str) -> list[str]:
    """Every image file under ``root``, at any depth (hidden files and folders skipped), sorted: a pile of unsorted
    images, nested or flat."""
    if not os.path.isdir(root):
        raise EngineError(f"{root} is not a folder.")
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not _hidden(x))
        out += [os.path.join(d, f) for f in sorted(files) if is_image_name(f) and not _hidden(f)]
    return out


def folder_labels(root: str, paths: list[str]) -> dict[str, tuple[str, str]]:
    """A partly sorted pile: each image in a top-level subfolder of ``root`` (at any depth below it) labelled with
    that subfolder's name, source ``folder``; the loose images at the top and a ``test/`` folder get none. Only on the
    user's word (the Label tab's *Subfolders are classes*): a pile nested by date looks the same."""
    top = os.path.abspath(root)
    out = {}
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), top).split(os.sep)
        if len(rel) >= 2 and SPLIT_NAMES.get(rel[0].lower()) != "test":
            out[os.path.abspath(p)] = (rel[0], "folder")
    return out


def read_labels(path: str | None) -> dict[str, tuple[str, str]]:
    """``{absolute path: (label, source)}``; a missing or empty file is no labels yet (a cold start)."""
    if not path or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EngineError(f"Cannot read the labels file {path}: {exc}") from exc
    if rows and not {"path", "label"} <= set(rows[0]):
        raise EngineError(f"The labels file {path} needs 'path' and 'label' columns (and 'source').")
    out = {}
    for r in rows:
        if r.get("path"):
            source = r.get("source") or "user"
            if source not in SOURCES:
                raise EngineError(f"The labels file {path} has source '{source}': use 'user', 'accepted' or 'folder'.")
            out[os.path.abspath(r["path"])] = ((r.get("label") or "").strip(), source)
    return out


def write_labels(path: str, labels: dict[str, tuple[str, str]], shown: dict[str, str] | None = None) -> None:
    """Save every label atomically (a crash leaves the old file or the new one, never half). ``shown``: the path to
    write for each absolute path (as the listing gave it)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for p in sorted(labels):
        label, source = labels[p]
        w.writerow([(shown or {}).get(p, p), label, source])
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, buf.getvalue())
    except OSError as exc:
        raise EngineError(f"Cannot save the labels to {path}: {exc.strerror or exc}.") from exc


# Random checks: a fixed tenth of the folder (by a hash of each image's path) is left to chance: every batch the
# labelling view asks (engine/labelling/picks.py) holds one of them, drawn at random, and the other picks come from
# the rest. The images the picks choose are the hard ones, so the labels' own cross-validated accuracy said 0.57 on
# clothing at 10 labels a class where the model scored 0.79 on test images, and it fell as labels were added while
# the model got better (docs/benchmarks.md, ninth session); the checks are a fair sample of the folder, so their
# accuracy (by a head that never saw them) is the estimate, and a run trained from the labels reports it.
CHECK_SHARE = 0.1
MIN_CHECKS = 5  # random checks labelled before an estimate is shown (five: an interval about 40 points wide)


def random_checks(root: str, paths: list[str], given: dict[str, tuple[str, str]]) -> np.ndarray:
    """Which of ``paths`` (images under the folder ``root``) are random checks the user labelled: their draw (of
    the path within ``root``, as the labelling view draws it) under ``CHECK_SHARE`` and their label the user's own
    in ``given`` (a labels file's path -> (label, source)); an accepted suggestion or a folder's name is no check."""
    draws = folder_draws(root, paths)
    own = np.array([given.get(os.path.abspath(p), ("", ""))[1] == "user" for p in paths], bool)
    return (draws < CHECK_SHARE) & own


def checks_summary(checks: dict | None) -> str:
    """A run's accuracy on the random checks among its labels (``metrics["random_checks"]``), as its summary leads
    with it; "" under ``MIN_CHECKS`` of them or without."""
    if not checks or checks.get("n", 0) < MIN_CHECKS:
        return ""
    lo, hi = checks["ci95"]
    return (
        f"Accuracy on the {checks['n']} random checks among your labels {checks['accuracy']:.3f} (95% CI "
        f"{lo:.3f}-{hi:.3f}), a fair sample of the folder"
    )


def folder_draws(root: str, paths: list[str]) -> np.ndarray:
    """Each image's check draw, from its path within ``root`` (the same checks wherever the folder is)."""
    return check_draws([os.path.relpath(p, root).replace(os.sep, "/") for p in paths])


def check_draws(keys: list[str]) -> np.ndarray:
    """Each key's fixed draw in [0, 1) (SHA-1 of the key, e.g. the image's path within the folder): the images under
    ``CHECK_SHARE`` are the random checks, asked in the order of their draws."""
    return np.array([int(hashlib.sha1(k.encode()).hexdigest()[:12], 16) / 16**12 for k in keys], np.float64)


def classes_of(labels: dict[str, tuple[str, str]]) -> list[str]:
    """The class names the labels use, sorted (the empty "not a class" left out)."""
    return sorted({label for label, _ in labels.values() if label})


def scan_labelled(
    root: str,
    labels_file: str,
    val_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 0,
    cancel: CancelToken | None = None,
    progress=None,
    exclude: str | set | None = None,
    known=None,
) -> Dataset:
    """``train DATA --labels LABELS.csv``: the labelled images under ``root`` as a dataset (the "not a class" ones
    and the unlabelled ones left out), split by each image's own draw as a flat folder is. A ``test/`` folder of
    class folders in ``root`` is kept as the test split (only scored), and its images are never read as labelled.
    ``known``: as :func:`engine.data.folder.scan`'s."""
    given = read_labels(labels_file)
    if not given:
        raise EngineError(f"The labels file {labels_file} has no labels yet: label some images first.")
    if not os.path.isdir(root):
        raise EngineError(f"{root} is not a folder.")
    test_dir = next((os.path.join(root, n) for n in _class_dirs(root) if SPLIT_NAMES.get(n.lower()) == "test"), None)
    skipped: list[tuple[str, str]] = []
    warn: list[str] = []
    by_class: dict[str, list[str]] = {}
    for p in list_images(root):
        if test_dir and os.path.abspath(p).startswith(os.path.abspath(test_dir) + os.sep):
            continue
        lab = given.get(os.path.abspath(p))
        if lab and lab[0]:
            by_class.setdefault(lab[0], []).append(p)
    missing = sum(1 for lab, _ in given.values() if lab) - sum(len(v) for v in by_class.values())
    if missing > 0:
        warn.append(f"{missing} labelled image(s) in {labels_file} are not under {root} (moved or deleted): left out.")
    leave_out = excluded_paths(exclude)
    groups = [
        (None, c, [p for p in files if os.path.abspath(p) not in leave_out]) for c, files in sorted(by_class.items())
    ]
    if test_dir:
        groups += [
            ("test", c, walk_images(os.path.join(test_dir, c), cancel, skipped.append)) for c in _class_dirs(test_dir)
        ]
    checked = _check_files(groups, True, cancel, progress, lambda p, r: skipped.append((p, r)), known)
    names = sorted({c for s, c, f in checked if s is None and f})
    if len(names) < 2:
        raise EngineError(
            f"{labels_file} labels images of {len(names)} class(es) under {root}: a classifier needs two."
        )
    index = {c: i for i, c in enumerate(names)}
    labelled = [(s, c, f) for s, c, f in checked if s is None]
    samples = _assign_splits(root, False, labelled, index, val_split, 0.0 if test_dir else test_split, seed, warn)
    for s, c, files in checked:
        if s == "test" and c in index:
            samples += [Sample(p, index[c], "test") for p in files]
        elif s == "test" and files:
            warn.append(f"Test folder '{c}' has no labelled images to learn from: its {len(files)} image(s) left out.")
    ds = Dataset(root, "labelled", names, samples, skipped, warn, (val_split, test_split, seed),
                 [p for p in leave_out], labels_file=os.path.abspath(labels_file))  # fmt: skip
    ds.warnings.extend(dataset_warnings(ds))
    return ds


def write_sorted(
    labels: dict[str, tuple[str, str]], dest: str, callbacks: Callbacks | None = None, cancel: CancelToken | None = None
) -> dict:
    """*Write sorted folder...*: ``dest/<class>/<name>`` for every labelled image, hard-linked (or copied where the
    file system cannot link); nothing is ever moved, renamed or overwritten (a taken name gets a suffix). Returns
    ``{"counts": {class: n}, "linked": n, "copied": n, "failed": [(path, reason)]}``."""
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"Cannot create {dest}: {exc.strerror or exc}. Choose another folder.") from exc
    counts: Counter = Counter()
    how: Counter = Counter()
    failed = []
    for i, (path, (label, _)) in enumerate(sorted(labels.items())):
        if cancel is not None and i % 64 == 0:
            cancel.raise_if_cancelled()
        if not label:
            continue
        folder = os.path.join(dest, label)
        try:
            os.makedirs(folder, exist_ok=True)
            how[place(path, free_name(os.path.join(folder, os.path.basename(path))))] += 1
            counts[label] += 1
        except OSError as exc:
            failed.append((path, exc.strerror or str(exc)))
    return {"counts": dict(counts), "linked": how["linked"], "copied": how["copied"], "failed": failed}


def open_dataset(config, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> ScanResult:
    """The scan job (CLI ``scan``, the window's Dataset tab): class folders, or ``config.labels``' labels."""
    cb = callbacks or Callbacks()
    try:
        if getattr(config, "labels", None):
            return ScanResult(
                scan_labelled(
                    config.data,
                    config.labels,
                    config.val_split,
                    config.test_split,
                    config.seed,
                    cancel,
                    cb.on_progress,
                    config.exclude,
                )  # fmt: skip
            )
    except Cancelled:
        return ScanResult(None, cancelled=True)
    return scan_folder(config, cb, cancel)


def is_a_pile(folder: str, message: str) -> bool:
    """Whether a folder that failed to open as a sorted one (``message``: why) is a pile to label: images loose at its
    top (beside at most one folder, as a pile nested by date has), or images but no class folder holding any."""

    if not folder or not os.path.isdir(folder):
        return False
    try:
        loose = any(is_image_name(n) and not n.startswith(".") for n in os.listdir(folder))
        return loose or (message.startswith("No readable images") and bool(list_images(folder)))
    except (OSError, EngineError):
        return False
