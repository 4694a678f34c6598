"""Saving the labels file off the GUI thread, newest snapshot first."""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, QThreadPool, Signal

from engine.data.labels import write_labels
from engine.events import EngineError


class LabelSaver(QObject):
    """Writes the labels file off the GUI thread (an fsync took 0.3-0.5 s on a busy disk, on every key press): each
    action hands over a snapshot, the newest one is written (atomically), ``saved`` says when it is on disk."""

    saved = Signal(str)  # "" when written, else why not

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self.lock = threading.Lock()
        self.latest = None

    def save(self, path: str, labels: dict, shown: dict) -> None:
        with self.lock:
            self.latest = (path, dict(labels), shown)
        self.pool.start(self._write)

    def _write(self) -> None:
        with self.lock:
            job, self.latest = self.latest, None
        if job is None:  # (a newer snapshot was written by the run before)
            return
        try:
            write_labels(*job)
            self.saved.emit("")
        except EngineError as exc:  # the labels stay in memory; the next action writes them again
            self.saved.emit(str(exc))

    def flush(self) -> None:
        """Wait until every snapshot handed over is on disk (closing, training from the file)."""
        self.pool.waitForDone()
