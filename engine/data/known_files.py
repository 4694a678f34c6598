"""Files read before: ``path -> (size, modification time, content hash)``, kept beside the embedding cache.

A rerun on a folder whose images are all embedded spent most of its time reading files again: the header check of
every image (0.44 s of a 2.0 s rerun on the 4,317 flowers, 0.6-1.2 s on a slower CPU) and hashing every file's
bytes to find its cached embedding. A file listed here with the same size and modification time (to the
nanosecond) was decoded and embedded before, so neither is needed. As git and make do, a change that keeps both is
not seen; a file modified within the last two seconds is not recorded (its time could still match an edit made
in the same tick). Renaming or moving a file costs one read: the entry is by absolute path, the embedding by content.
One index for every folder: about 230 bytes a file (4,317 flowers: 0.56 MB, read in milliseconds); entries are never
pruned, so a machine that has read a million files would spend a second or two reading it (`cache --clear`
empties it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from engine.runs import atomic_write_text

FILE = "files-read.json"
RACY_SECONDS = 2.0


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class KnownFiles:
    """The files (by absolute path) this machine decoded and embedded, each with the size, time and hash it had."""

    def __init__(self, folder: str | None) -> None:
        self.path = os.path.join(folder, FILE) if folder else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    entries = json.load(f)
                if isinstance(entries, dict):
                    self.entries = {k: v for k, v in entries.items() if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError):  # a damaged index only costs a reread of the files
                self.entries = {}

    def hash_of(self, path: str) -> str | None:
        """The content hash ``path`` had when it was read, if it has not changed since; else None."""
        entry = self.entries.get(os.path.abspath(path))
        if entry is None:
            return None
        st = _stat(path)
        return entry[2] if st is not None and [st[0], st[1]] == entry[:2] else None

    def knows(self, path: str) -> bool:
        """Whether ``path`` was decoded before and is unchanged (its header need not be checked again)."""
        return self.hash_of(path) is not None

    def remember(self, paths: Sequence[str], hashes: Sequence[str]) -> None:
        """``paths`` were decoded (or their embedding found by ``hashes``): record them as they are now."""
        recent = time.time_ns() - int(RACY_SECONDS * 1e9)
        for p, h in zip(paths, hashes):
            st = _stat(p)
            if st is None or st[1] > recent:
                continue
            key = os.path.abspath(p)
            entry = [st[0], st[1], h]
            if self.entries.get(key) != entry:
                self.entries[key] = entry
                self.dirty = True

    def save(self) -> None:
        """Written atomically; a read-only or full disk only means the next run reads the files again."""
        if not self.path or not self.dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries, separators=(",", ":")))
            self.dirty = False
        except OSError:
            pass
