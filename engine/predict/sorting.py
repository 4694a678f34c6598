"""Sort photos by prediction: each predicted image copied (or hard-linked where the system allows) into
``DIR/<predicted class>/``, ``DIR/_unsure/`` or ``DIR/_unfamiliar/``. Nothing is ever moved or overwritten: a name
that is taken gets a suffix. Unreadable files are left where they are."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from engine.data.edits import free_name, place
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, PredictionRow, Progress

FOLDER_OF_STATUS = {"unsure": "_unsure", "unfamiliar": "_unfamiliar"}


@dataclass
class SortConfig:
    """Predicted rows and the folder to sort them into (the Predict tab's button; ``predict --sort-into``)."""

    rows: list = field(default_factory=list)  # PredictionRow
    folder: str = ""


@dataclass
class SortResult:
    counts: dict[str, int]  # folder name -> files placed there
    linked: int = 0
    copied: int = 0
    cancelled: bool = False

    def summary(self, folder: str) -> str:
        where = ", ".join(f"{n} in {k}" for k, n in sorted(self.counts.items()))
        how = f" ({self.linked} hard-linked, {self.copied} copied)" if self.linked and self.copied else ""
        return f"Sorted {sum(self.counts.values())} image(s) into {folder}: {where or 'none'}{how}."


def sort_into(config: SortConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> SortResult:
    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    try:
        os.makedirs(config.folder, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"Cannot create {config.folder}: {exc.strerror or exc}. Choose another folder.") from exc
    counts: Counter = Counter()
    how: Counter = Counter()
    rows = [r for r in config.rows if isinstance(r, PredictionRow) and not r.error and r.prediction]
    try:
        for i, r in enumerate(rows):
            cancel.raise_if_cancelled()
            name = FOLDER_OF_STATUS.get(r.status, r.prediction)
            folder = os.path.join(config.folder, name)
            os.makedirs(folder, exist_ok=True)
            try:
                how[place(r.path, free_name(os.path.join(folder, os.path.basename(r.path))))] += 1
                counts[name] += 1
            except OSError as exc:
                cb.on_log(f"Could not sort {r.path}: {exc.strerror or exc}")
            if i % 50 == 0:
                cb.on_progress(Progress(Phase.PREDICTING, i + 1, len(rows), message="sorting"))
    except Cancelled:
        return SortResult(dict(counts), how["linked"], how["copied"], cancelled=True)
    return SortResult(dict(counts), how["linked"], how["copied"])
