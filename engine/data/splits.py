"""Which images are used, and for what: each image's split (train/val/test) and exclude lists.

An image's split depends only on the seed, its class and its own path inside its class folder, so excluding,
adding or moving one image changes no other image's split.
"""

from __future__ import annotations

import hashlib
import os

from engine.events import EngineError

# The folder names a pre-split dataset may use (any case).
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def _draw(seed: int, label: int, key: str) -> float:
    """A number in [0, 1) fixed by the seed, the class and the image's own identity (nothing else)."""
    h = hashlib.blake2b(f"{seed}|{label}|{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def stratified_split(
    labels: list[int], val_split: float, test_split: float, seed: int, keys: list[str] | None = None
) -> list[str]:
    """Assign "train"/"val"/"test" to each image, reproducibly, each image on its own.

    An image's split depends only on the seed, its class and its key (its path within its class folder): it goes
    to validation when its draw is below ``val_split``, to test below ``val_split + test_split``. So excluding,
    adding or moving one image changes no other image's split (a count-based split drawn from one generator
    reshuffled every class), and each class gets about its share. Tiny classes are then fixed up: every class with
    at least 2 images keeps a training image and, when ``val_split > 0``, gets a validation image (and a test image
    from 3 images when ``test_split > 0``), taking the images whose draws are nearest the boundary.
    """
    if not 0 <= val_split < 1 or not 0 <= test_split < 1 or val_split + test_split >= 1:
        raise EngineError("Validation and test fractions must each be in [0, 1) and add up to less than 1.")
    keys = keys if keys is not None else [str(i) for i in range(len(labels))]
    u = [_draw(seed, y, k) for y, k in zip(labels, keys)]
    out = ["val" if v < val_split else "test" if v < val_split + test_split else "train" for v in u]
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for idx in by_class.values():
        _fix_tiny_class(idx, u, out, val_split, test_split)
    return out


def _fix_tiny_class(idx: list[int], u: list[float], out: list[str], val_split: float, test_split: float) -> None:
    """Every class keeps a training image, gets a validation image from 2 images (when asked for) and a test image
    from 3: moved from a split that can spare one, taking the image whose draw is nearest the boundary."""
    n = len(idx)
    need = {"train": 1, "val": 1 if n >= 2 and val_split > 0 else 0, "test": 1 if n >= 3 and test_split > 0 else 0}
    for split in ("train", "val", "test"):
        while sum(out[i] == split for i in idx) < need[split]:
            spare = [i for i in idx if out[i] != split and sum(out[j] == out[i] for j in idx) > need[out[i]]]
            if not spare:
                break
            out[max(spare, key=lambda i: u[i]) if split == "train" else min(spare, key=lambda i: u[i])] = split


def _key(path: str, root: str) -> str:
    """An image's identity for its split draw: its path inside its class folder ("a/b.jpg" in DATA/cats/a/b.jpg)."""
    prefix = root.rstrip(os.sep) + os.sep
    # (os.path.relpath took 50 us an image: 0.4 s of a 4,317-image rerun from the cache; the prefix is the same)
    rel = path[len(prefix) :].replace(os.sep, "/").split("/") if path.startswith(prefix) else [""]
    if any(c in ("", ".", "..") for c in rel):  # not plainly under root: let relpath normalise it
        rel = os.path.relpath(path, root).replace(os.sep, "/").split("/")
    rel = rel[1:] if rel[0] in SPLIT_NAMES or rel[0].lower() in SPLIT_NAMES else rel
    return "/".join(rel[1:]) or rel[-1]


def excluded_paths(exclude: str | set | None) -> set[str]:
    """The absolute paths an exclude list names: a CSV file with a ``path`` column (the doctor's CSV works as it is),
    or a set of paths."""
    if not exclude:
        return set()
    if isinstance(exclude, (set, frozenset, list, tuple)):
        return {os.path.abspath(p) for p in exclude}
    import csv

    try:
        with open(exclude, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise EngineError(f"Cannot read the exclude list {exclude}: {exc.strerror or exc}.") from exc
    if rows and "path" not in rows[0]:
        raise EngineError(f"The exclude list {exclude} has no 'path' column.")
    return {os.path.abspath(r["path"]) for r in rows if r.get("path")}


def untrained_classes(counts: dict[str, dict[str, int]]) -> list[str]:
    """One sentence per class that has images but none for training (a pre-split folder whose validation or test
    folder names a class differently, e.g. Training/glioma and Testing/glioma_tumor): the model cannot learn it."""
    from difflib import SequenceMatcher

    def alike(a: str, b: str) -> float:  # one name inside the other ("glioma", "glioma_tumor"), or nearly equal
        a, b = a.lower(), b.lower()
        return 1.0 if a in b or b in a else SequenceMatcher(None, a, b).ratio()

    trained = [c for c, n in counts.items() if n["train"]]
    out = []
    for c, n in counts.items():
        if sum(n.values()) and not n["train"] and trained:
            near = [t for t in sorted(trained, key=lambda t: -alike(c, t)) if alike(c, t) >= 0.75][:1]
            fix = (
                f"Is it '{near[0]}' of the training folder under another name? Give both folders the same name."
                if near
                else "Add its images to the training folder, or remove it."
            )
            out.append(
                f"Class '{c}' ({n['val'] + n['test']} images) is only in the validation or test folder, "
                f"not in the training folder: the model cannot learn it. {fix}"
            )
    return out
