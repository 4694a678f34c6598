"""The labels of the folder open in the Label tab, as the user edits them: every edit is one action undo takes back.

Plain Python (no Qt): the tab shows it and saves it (engine/data/labels.py's file) after every action.
"""

from __future__ import annotations

import numpy as np

from engine.data.labels import classes_of

Label = tuple[str, str]  # (label, source): label "" is "not a class"; source "user", "accepted" or "folder"


class LabelBook:
    def __init__(self, labels: dict[str, Label] | None = None) -> None:
        self.labels: dict[str, Label] = dict(labels or {})  # absolute path -> (label, source)
        self.classes: list[str] = classes_of(self.labels)  # then in the order created (the number keys follow it)
        self.skipped: set[str] = set()  # skipped this session: neither trained on nor asked again
        self.history: list[list[tuple[str, Label | None]]] = []  # undo: each action's previous values

    def add_class(self, name: str) -> bool:
        """A new class at the end of the list (its number key the next free one); False if it is there already."""
        if not name or name in self.classes:
            return False
        self.classes.append(name)
        return True

    def change(self, new: dict[str, Label | None]) -> int:
        """One action: each path takes its new label (None: none), new classes join the list. Returns how many."""
        if not new:
            return 0
        self.history.append([(p, self.labels.get(p)) for p in new])
        for p, v in new.items():
            if v is None:
                self.labels.pop(p, None)
                continue
            self.labels[p] = v
            self.skipped.discard(p)
            self.add_class(v[0])
        return len(new)

    def undo(self) -> bool:
        """Take the last action back; False when there is none."""
        if not self.history:
            return False
        for p, before in reversed(self.history.pop()):
            if before is None:
                self.labels.pop(p, None)
            else:
                self.labels[p] = before
        return True

    def answered(self, path: str) -> bool:
        return path in self.labels or path in self.skipped

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lab, _ in self.labels.values():
            out[lab] = out.get(lab, 0) + 1
        return out

    def targets(self, paths: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
        """For a round on ``paths`` (absolute, the pile's order): each image's class index (-1 unlabelled, -2 not a
        class, -3 skipped), the classes in use (sorted), and which labels are the user's own (what checks count)."""
        used = classes_of(self.labels)
        index = {c: i for i, c in enumerate(used)}
        y = np.full(len(paths), -1, np.int64)
        own = np.zeros(len(paths), bool)
        for i, p in enumerate(paths):
            if p in self.labels:
                lab, source = self.labels[p]
                y[i] = index[lab] if lab else -2
                own[i] = source == "user"
            elif p in self.skipped:
                y[i] = -3
        return y, used, own
