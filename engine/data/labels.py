"""The labels file: ``path, label, source`` (CSV), saved atomically after every change.

``source`` is ``user`` (the user's own label) or ``accepted`` (a suggestion the user accepted in bulk): both train,
and they are kept apart so a user can review or drop what was accepted. An empty ``label`` from the user means
"not a class": the image is left out. Paths are kept as the folder listing gives them (``DATA/...``, like the
predict CSV); they are matched by absolute path, so the same file given as ``./DATA/x.jpg`` is the same image.
"""

from __future__ import annotations

import csv
import io
import os

from engine.data.folder import _hidden, is_image_name
from engine.events import EngineError
from engine.runs import atomic_write_text

HEADER = ["path", "label", "source"]
SOURCES = ("user", "accepted")


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
                raise EngineError(f"The labels file {path} has source '{source}': use 'user' or 'accepted'.")
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
    atomic_write_text(path, buf.getvalue())


def classes_of(labels: dict[str, tuple[str, str]]) -> list[str]:
    """The class names the labels use, sorted (the empty "not a class" left out)."""
    return sorted({label for label, _ in labels.values() if label})
