"""The head's feature spaces kept between runs: for a feature set, the centre, the scale and the principal axes the
head is solved on (engine/train/probe.py). They depend on the features alone (the rows they are computed from, never
the labels), so a rerun on the same images, or the next labelling round on the same pile, gets the same space:
computing it was 0.33 s of a cached flowers rerun's 2.2 s, and 0.37 s of every labelling round.

A space is found by a hash of everything it is computed from (the rows' bytes, the feature set, the number of axes,
the seed and ``VERSION``), so a changed image, split or setting simply misses. Kept in memory for this process (the
window's reruns and labelling rounds) and, given a cache folder, as small safetensors files in its ``spaces/``
folder (8.6 MB for the earlier layers' 768 axes; the ``KEEP_FILES`` most recently used are kept). The training
images' neighbour distances behind "unfamiliar" (engine/train/fit.py; 0.25 s of that rerun) and the heads each
regularisation strength solved (engine/train/probe.py ``_KeptPath``, by a hash of the problem they solve) are kept
the same way (``get_arrays`` / ``put_arrays``)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np

from engine.runs import atomic_write_bytes

FOLDER = "spaces"
VERSION = 1  # how a space is computed (probe.py's normalisers and axes): a change makes every kept one miss
KEEP_FILES = 16  # (a run keeps up to 7: three spaces, three paths and the neighbour distances)
KEEP_IN_MEMORY = 8
_MEMORY: OrderedDict[str, dict] = OrderedDict()
_LOCK = threading.Lock()  # (a labelling round and a training job may run at once in the window)


def space_key(name: str, rows: np.ndarray, dims: int, seed: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{VERSION}|{name}|{dims}|{seed}|{rows.shape}|{rows.dtype}".encode())
    h.update(np.ascontiguousarray(rows).data)
    return h.hexdigest()


class SpaceStore:
    """Spaces by key: in memory, and under ``folder``/spaces when a folder is given (None: memory only). ``paths``:
    the heads each strength solved are kept too (a training run's; not a labelling round's, whose problem changes
    every round: its files would push the pile's spaces out)."""

    def __init__(self, folder: str | None = None, paths: bool = False) -> None:
        self.dir = os.path.join(folder, FOLDER) if folder else None
        self.paths = paths

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(centre, scale, axes or None), or None when this space was not kept."""
        t = self.get_arrays(key)
        if t is None or not {"centre", "scale", "axes"} <= set(t):
            return None
        return t["centre"], t["scale"], t["axes"] if t["axes"].shape[1] else None

    def put(self, key: str, centre: np.ndarray, scale: np.ndarray, axes: np.ndarray | None) -> None:
        none = np.zeros((len(centre), 0), np.float32)
        self.put_arrays(key, {"centre": centre, "scale": scale, "axes": axes if axes is not None else none})

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """Any other answer that depends on features alone, kept the same way (the training images' neighbour
        distances behind "unfamiliar": engine/train/fit.py), by name; None when not kept."""
        with _LOCK:
            if key in _MEMORY:
                _MEMORY.move_to_end(key)
                return _MEMORY[key]
        if self.dir is None:
            return None
        path = os.path.join(self.dir, f"{key}.safetensors")
        try:
            from safetensors.numpy import load_file

            t = load_file(path)
            os.utime(path)  # (recently used: kept when older ones are dropped)
        except Exception:  # missing or damaged: computed again
            return None
        self._remember(key, t)
        return t

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self._remember(key, arrays)
        if self.dir is None:
            return
        from safetensors.numpy import save

        try:
            os.makedirs(self.dir, exist_ok=True)
            atomic_write_bytes(os.path.join(self.dir, f"{key}.safetensors"),
                               save({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}))  # fmt: skip
            kept = sorted((os.path.join(self.dir, n) for n in os.listdir(self.dir) if n.endswith(".safetensors")),
                          key=os.path.getmtime, reverse=True)  # fmt: skip
            for old in kept[KEEP_FILES:]:
                os.unlink(old)
        except OSError:  # a read-only or full cache folder: the space is only not kept
            pass

    @staticmethod
    def _remember(key: str, arrays: dict) -> None:
        with _LOCK:
            _MEMORY[key] = arrays
            _MEMORY.move_to_end(key)
            while len(_MEMORY) > KEEP_IN_MEMORY:
                _MEMORY.popitem(last=False)


def kept_files(folder: str) -> list[str]:
    """The kept spaces' files under a cache folder (the cache's listing and clearing count them)."""
    d = os.path.join(folder, FOLDER)
    return sorted(os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else []) if n.endswith(".safetensors"))
