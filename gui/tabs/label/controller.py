"""Labelling, from the window's side: open a pile (the main lane: it runs the backbone), the rounds (their own lane),
write the sorted folder, and hand the labels to the Dataset tab for training. Results are routed to the Label tab."""

from __future__ import annotations

import dataclasses

from PySide6.QtCore import QObject

from engine.data.labels import write_sorted
from engine.labelling.session import LabelConfig, next_round, open_pile
from gui.jobs.controller import LABEL


class Labelling(QObject):
    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        t = window.label_tab
        t.open_requested.connect(self.start)
        t.round_requested.connect(self._round)
        t.write_requested.connect(self.write_sorted_folder)
        t.train_requested.connect(self._train_on_labels)

    def start(self, folder: str) -> None:
        """Open ``folder`` in the Label tab: every image embedded once, with the window's backbone and cache."""
        w = self.w
        if w.busy():
            w.show_error("Another job is running: stop it or wait for it to finish.")
            return
        values = {**w.dataset_tab.values(), **w.model_tab.values(), **w.training_tab.values()}
        names = {f.name for f in dataclasses.fields(LabelConfig)}
        cfg = LabelConfig(**{k: v for k, v in values.items() if k in names and k != "data"}, data=folder)
        w.tabs.setCurrentWidget(w.label_tab)
        w.label_tab.opening(folder)
        w.start_main(
            w.label_tab,
            open_pile,
            cfg,
            done=w.label_tab.pile_opened,
            failed=self._open_failed,
            signals={"progress": w.label_tab.on_progress},
        )

    def _open_failed(self, message: str, details: str) -> None:
        self.w.label_tab.open_failed(message)
        self.w.show_error(message, details)

    def _round(self, request) -> None:
        y, classes, n_next, level, own = request
        t = self.w.label_tab
        self.w.jobs.start(
            LABEL, next_round, t.pile, y, classes, n_next, level, own=own, done=t.round_finished,
            failed=self._round_failed,
        )  # fmt: skip

    def _round_failed(self, message: str, details: str) -> None:
        self.w.label_tab.round_failed(message)

    def write_sorted_folder(self, folder: str) -> None:
        w = self.w
        if w.busy():
            w.show_error("Another job is running: stop it or wait for it to finish.")
            return
        w.label_tab.writing_to = folder
        w.start_main(
            w.label_tab, write_sorted, dict(w.label_tab.labels), folder,
            done=self._sorted_written, failed=self._write_failed,
        )  # fmt: skip

    def _sorted_written(self, result) -> None:
        self.w.last_result = result
        self.w.label_tab.sorted_written(result, self.w.label_tab.writing_to)

    def _write_failed(self, message: str, details: str) -> None:
        self.w.label_tab.write_failed(message)
        self.w.show_error(message, details)

    def _train_on_labels(self, folder: str, labels_file: str) -> None:
        """*Train on these labels*: the Dataset tab opens the folder with its classes from the labels file."""
        self.w.dataset_tab.use_labels(folder, labels_file)
        self.w.tabs.setCurrentWidget(self.w.dataset_tab)
