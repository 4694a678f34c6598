"""The Label tab's jobs: open a pile (the main lane: it runs the backbone), the rounds (their own lane), write the
sorted folder, and hand the labels to the Dataset tab for training (through the session)."""

from __future__ import annotations

import dataclasses

from PySide6.QtCore import QObject

from engine.data.labels import write_sorted
from engine.labelling.session import LabelConfig, next_round, open_pile
from gui.jobs.controller import LABEL


class Labelling(QObject):
    def __init__(self, session, tab) -> None:
        super().__init__(tab)
        self.session, self.tab = session, tab
        tab.open_requested.connect(self.start)
        tab.round_requested.connect(self._round)
        tab.write_requested.connect(self.write_sorted_folder)
        tab.train_requested.connect(self._train_on_labels)
        session.label_requested.connect(self.start)

    def start(self, folder: str) -> None:
        """Open ``folder`` in the Label tab: every image embedded once, with the session's backbone and cache."""
        s, t = self.session, self.tab
        values = dataclasses.asdict(s.train_config(out=""))
        names = {f.name for f in dataclasses.fields(LabelConfig)}
        cfg = LabelConfig(**{k: v for k, v in values.items() if k in names and k != "data"}, data=folder)
        if s.start_main(open_pile, cfg, done=t.pile_opened, failed=self._open_failed, on_progress=t.on_progress):
            s.show_tab.emit(t)
            t.opening(folder)

    def _open_failed(self, message: str, details: str) -> None:
        self.tab.open_failed(message)
        self.session.fail(message, details)

    def _round(self, request) -> None:
        y, classes, n_next, level, own = request
        t = self.tab
        self.session.jobs.start(
            LABEL, next_round, t.pile, y, classes, n_next, level, own=own, done=t.round_finished,
            failed=self._round_failed,
        )  # fmt: skip

    def _round_failed(self, message: str, details: str) -> None:
        self.tab.round_failed(message)

    def write_sorted_folder(self, folder: str) -> None:
        t = self.tab
        t.writing_to = folder
        self.session.start_main(write_sorted, dict(t.labels), folder, done=self._sorted_written,
                                failed=self._write_failed)  # fmt: skip

    def _sorted_written(self, result) -> None:
        self.session.finished(result)
        self.tab.sorted_written(result, self.tab.writing_to)

    def _write_failed(self, message: str, details: str) -> None:
        self.tab.write_failed(message)
        self.session.fail(message, details)

    def _train_on_labels(self, folder: str, labels_file: str) -> None:
        """*Train on these labels*: the Dataset tab opens the folder with its classes from the labels file."""
        self.session.open_labelled.emit(folder, labels_file)
