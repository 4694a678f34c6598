"""The Label tab: from a pile of unsorted images to labels, with the app choosing what to ask.

The folder is embedded once (a main-lane job: :func:`engine.labelling.session.open_pile`); then every few labels a
round (:func:`engine.labelling.session.next_round`, the ``label`` lane, on the embeddings in memory) retrains the
cross-fitted head, suggests a class for every unlabelled image and picks the next ones to ask. The labels file is
written atomically after every action (engine/data/labels.py), so a killed app loses no confirmed label.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.data.labels import folder_labels, read_labels
from engine.labelling.session import ACCEPT_LEVEL
from engine.paths import app_data_dir
from gui.tabs.label.book import LabelBook
from gui.tabs.label.class_bar import ClassBar
from gui.tabs.label.controller import Labelling
from gui.tabs.label.estimate import EstimatePlot, estimate_note
from gui.tabs.label.keys import install_shortcuts
from gui.tabs.label.saver import LabelSaver
from gui.widgets.image_grid import ImageGrid

RETRAIN_EVERY = 5  # labels between background rounds (the batch ends a round too)
NOT_A_CLASS = ""


def labels_file_for(folder: str) -> str:
    """Where a folder's labels are kept: the app's data folder, one file per folder (the images stay untouched)."""
    key = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
    name = os.path.basename(os.path.abspath(folder).rstrip(os.sep)) or "folder"
    return os.path.join(app_data_dir(), "labels", f"{name}-{key}.csv")


class LabelTab(QWidget):
    open_requested = Signal(str)  # a folder to embed for labelling
    round_requested = Signal(object)  # (y, classes, n_next, level, own): a background round
    write_requested = Signal(str)  # the folder to write the sorted tree into
    train_requested = Signal(str, str)  # folder, labels file: open it in the Dataset tab to train

    def __init__(self, session, loader, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.pile = None
        self.book = LabelBook()  # the labels, the classes in the order created, skips and undo
        self.labels_file = ""
        self.batch: list[str] = []  # absolute paths asked now
        self.suggestions = None
        self.suggested_for: list[str] = []  # the classes the suggestions' columns are
        # Fixed per round / per pile, so a key press costs no pass over every image (5,000 in a pile is common):
        self.best = np.zeros(0, np.float32)  # each image's top suggested probability
        self.best_class = np.zeros(0, np.int64)  # ... and its class (a column of suggestions.probs)
        self.sure = np.zeros(0, bool)  # ... and whether every fold head suggests that class too (Accept needs it)
        self.row: dict[str, int] = {}  # absolute path -> its index in the pile
        self.since_round = 0
        self.round_running = False
        self.round_pending = False
        self.has_subfolders = False
        self.saver = LabelSaver(self)
        self.saver.saved.connect(self._saved)
        self._build(loader)

    @property
    def labels(self) -> dict[str, tuple[str, str]]:
        """Absolute path -> (label, source), as saved."""
        return self.book.labels

    @property
    def classes(self) -> list[str]:
        return self.book.classes

    # ------------------------------------------------------------------------------------------------ layout
    def _build(self, loader) -> None:
        root = QVBoxLayout(self)
        top = QHBoxLayout()
        self.open_btn = QPushButton("Open a folder to label…")
        self.open_btn.clicked.connect(self.choose_folder)
        self.folder_label = QLabel(
            "Open a folder of unsorted images: the app shows first the ones most worth labelling."
        )
        self.folder_label.setWordWrap(True)
        top.addWidget(self.open_btn)
        top.addWidget(self.folder_label, 1)
        root.addLayout(top)

        bar = QHBoxLayout()
        self.new_class = QLineEdit()
        self.new_class.setPlaceholderText("New class: type a name, Enter")
        self.new_class.setMinimumWidth(180)
        self.new_class.setMaximumWidth(220)
        self.new_class.returnPressed.connect(self._add_typed_class)
        bar.addWidget(self.new_class)
        bar.addStretch(1)
        self.folder_classes = QCheckBox("Subfolders are classes")
        self.folder_classes.setToolTip(
            "A partly sorted folder: label every image in a top-level subfolder with the subfolder's name (source "
            "'folder' in the labels file); the loose images are left to you. Off: those labels are taken back."
        )
        self.folder_classes.toggled.connect(self.use_folder_classes)
        bar.addWidget(self.folder_classes)
        self.not_class_btn = QPushButton("Not a class (0)")
        self.not_class_btn.setToolTip("Leave the selected images out: they are neither trained on nor asked again.")
        self.not_class_btn.clicked.connect(self.mark_not_a_class)
        self.skip_btn = QPushButton("Skip (S)")
        self.skip_btn.clicked.connect(self.skip)
        self.undo_btn = QPushButton("Undo (Ctrl+Z)")
        self.undo_btn.clicked.connect(self.undo)
        for b in (self.not_class_btn, self.skip_btn, self.undo_btn):
            bar.addWidget(b)
        root.addLayout(bar)
        self.class_bar = ClassBar()
        self.class_bar.chosen.connect(self.assign)
        root.addWidget(self.class_bar)

        split = QSplitter(Qt.Horizontal)
        self.grid = ImageGrid(loader)
        self.grid.setToolTip("Select one or many (Shift/Ctrl-click), then press a class's number or button.")
        split.addWidget(self.grid)
        split.addWidget(self._build_side())
        split.setSizes([780, 480])
        root.addWidget(split, 1)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        self.shortcuts = install_shortcuts(self)
        self.jobs = Labelling(self.session, self)  # the tab's own jobs (controller.py)
        self._enable()

    def _build_side(self) -> QWidget:
        """The right-hand side: the estimate's plot, Accept suggestions, and the two ways out (sorted folder, train)."""
        side = QWidget()
        sl = QVBoxLayout(side)
        self.plot = EstimatePlot()
        sl.addWidget(self.plot, 1)
        acc = QHBoxLayout()
        acc.addWidget(QLabel("Accept suggestions at"))
        self.level = QDoubleSpinBox()
        self.level.setRange(50, 99.9)
        self.level.setDecimals(1)
        self.level.setSuffix(" %")
        self.level.setValue(100 * ACCEPT_LEVEL)
        self.level.valueChanged.connect(self._show_accept)
        acc.addWidget(self.level)
        self.accept_btn = QPushButton("Accept suggestions")
        self.accept_btn.clicked.connect(self.accept_suggestions)
        acc.addWidget(self.accept_btn)
        sl.addLayout(acc)
        self.accept_note = QLabel("")
        self.accept_note.setWordWrap(True)
        sl.addWidget(self.accept_note)
        out = QHBoxLayout()
        self.write_btn = QPushButton("Write sorted folder…")
        self.write_btn.setToolTip("A folder per class, made of hard links (or copies): the images stay where they are.")
        self.write_btn.clicked.connect(self.choose_sorted_folder)
        self.train_btn = QPushButton("Train on these labels")
        self.train_btn.clicked.connect(self._train)
        out.addWidget(self.write_btn)
        out.addWidget(self.train_btn)
        sl.addLayout(out)
        return side

    def _enable(self) -> None:
        ready = self.pile is not None
        self.folder_classes.setEnabled(
            ready and any(os.sep in os.path.relpath(p, self.pile.root) for p in self.pile.paths)
        )
        for w in (self.new_class, self.not_class_btn, self.skip_btn, self.grid, self.write_btn, self.train_btn):
            w.setEnabled(ready)
        self.undo_btn.setEnabled(ready and bool(self.book.history))

    # ------------------------------------------------------------------------------------------------ opening
    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder of images to label", os.path.expanduser("~"))
        if folder:
            self.open_requested.emit(folder)

    def opening(self, folder: str) -> None:
        self.pile = None
        self._enable()
        self.status.setText(f"Reading every image under {folder} once (the embedding cache makes the next time fast)…")

    def on_progress(self, p) -> None:
        if p.total:
            self.status.setText(f"Reading the images: {p.done} of {p.total}…")

    def stopping(self) -> None:
        self.status.setText("Stopping…")

    def open_failed(self, message: str) -> None:
        self.status.setText(message)

    def pile_opened(self, pile, labels_file: str | None = None) -> None:
        """The folder is embedded: read its labels so far and ask the first images."""
        if pile.cancelled:
            self.status.setText("Stopped before every image was read; nothing changed.")
            return
        self.pile = pile
        self.labels_file = labels_file or labels_file_for(pile.root)
        self.book = LabelBook(read_labels(self.labels_file))
        self.batch = []
        self.plot.reset()
        self.suggestions = None
        self.best, self.best_class, self.sure = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
        self.abs_paths = [os.path.abspath(p) for p in pile.paths]
        self.row = {p: i for i, p in enumerate(self.abs_paths)}
        self.shown = dict(zip(self.abs_paths, pile.paths))
        self.has_subfolders = bool(folder_labels(pile.root, pile.paths))
        self._rebuild_class_buttons()
        self.folder_classes.blockSignals(True)
        self.folder_classes.setChecked(any(src == "folder" for _, src in self.labels.values()))
        self.folder_classes.blockSignals(False)
        skipped = f"; {len(pile.skipped)} unreadable file(s) skipped" if pile.skipped else ""
        self.folder_label.setText(
            f"<b>{pile.root}</b>: {len(pile.paths)} images{skipped}. Labels are saved after every action to "
            f"{self.labels_file}."
        )
        self._enable()
        self.request_round()

    # ------------------------------------------------------------------------------------------------ classes
    def _add_typed_class(self) -> None:
        """Enter in the name field: the class is created and the field keeps the focus for the next name (a click on
        the pictures starts labelling, where the number keys work)."""
        name = self.new_class.text().strip()
        self.new_class.clear()
        if name:
            self.add_class(name)

    def add_class(self, name: str) -> None:
        if self.book.add_class(name):
            self._rebuild_class_buttons()

    def _rebuild_class_buttons(self) -> None:
        self.class_bar.show_classes(self.classes, self.book.counts())

    # ------------------------------------------------------------------------------------------------ actions
    def _targets(self) -> list[str]:
        sel = [os.path.abspath(p) for p in self.grid.selected_paths()]
        if not sel and self.grid.currentIndex().isValid():
            sel = [os.path.abspath(self.grid.currentIndex().data(Qt.UserRole))]
        return sel

    def assign(self, label: str, paths: list[str] | None = None, source: str = "user") -> int:
        """Label ``paths`` (default: the selected thumbnails); ``label`` "" is "not a class". Saved at once."""
        paths = self._targets() if paths is None else [os.path.abspath(p) for p in paths]
        if not paths or self.pile is None:
            return 0
        n = self.book.change({p: (label, source) for p in paths})
        self._changed(n)
        return n

    def use_folder_classes(self, on: bool) -> int:
        """Label (on) or unlabel (off) the images of the top-level subfolders by their folder's name; one action
        (undo takes it back); the user's own and accepted labels are never overwritten."""
        if self.pile is None:
            return 0
        if on:
            change = {p: v for p, v in folder_labels(self.pile.root, self.pile.paths).items() if p not in self.labels}
        else:
            change = {p: None for p, (_, src) in self.labels.items() if src == "folder"}
        if not self.book.change(change):
            return 0
        self.batch = []  # what to ask changed wholesale: the next round's picks replace the grid
        self._changed(max(len(change), RETRAIN_EVERY))
        return len(change)

    def mark_not_a_class(self) -> None:
        self.assign(NOT_A_CLASS)

    def skip(self) -> None:
        self.book.skipped.update(self._targets())
        self._show_batch()
        self._advance()

    def undo(self) -> bool:
        if not self.book.undo():
            return False
        self._changed(0)
        return True

    def accept_suggestions(self) -> int:
        """Label every unlabelled image suggested at or above the level, as *accepted* (kept apart from the user's)."""
        n = self.book.change({p: (c, "accepted") for p, c in self._acceptable()})
        if n:
            self._changed(n)
        return n

    def _acceptable(self) -> list[tuple[str, str]]:
        s = self.suggestions
        if s is None or s.probs is None:
            return []
        level = self.level.value() / 100
        out = []
        for i in np.flatnonzero((self.best >= level) & self.sure):  # the few sure ones, not every image
            p = self.abs_paths[i]
            if p not in self.labels:
                out.append((p, self.suggested_for[self.best_class[i]]))
        return out

    def _changed(self, n_new: int) -> None:
        self.saver.save(self.labels_file, self.labels, self.shown)
        self.since_round += n_new
        self._rebuild_class_buttons()
        self._show_batch()
        self._show_accept()
        self._enable()
        labelled = sum(1 for lab, _ in self.labels.values() if lab)
        self.status.setText(f"{labelled} labelled ({len(self.labels) - labelled} not a class); saving…")
        if self.since_round >= RETRAIN_EVERY:
            self.request_round()
        else:
            self._advance()

    def _saved(self, error: str) -> None:
        text = self.status.text()
        if error:
            self.status.setText(f"Labels NOT saved: {error}")
        elif text.endswith("saving…"):
            self.status.setText(text[: -len("saving…")] + "saved.")

    def _advance(self) -> None:
        """A batch whose every image is answered asks for the next one."""
        if self.batch and all(self.book.answered(p) for p in self.batch):
            self.request_round()

    # ------------------------------------------------------------------------------------------------ rounds
    def request_round(self) -> None:
        if self.pile is None:
            return
        if self.round_running:
            self.round_pending = True
            return
        y, used, own = self.book.targets(self.abs_paths)
        self.since_round = 0
        self.round_running = True
        self.round_requested.emit((y, used, 12, self.level.value() / 100, own))

    def round_finished(self, s) -> None:
        self.round_running = False
        self.suggestions = s
        self.suggested_for = list(s.classes)
        if s.probs is not None:  # (where the heads disagree: shown as it is, never offered for Accept)
            self.best, self.best_class = s.probs.max(1), s.probs.argmax(1)
            self.sure = s.agreed if s.agreed is not None else np.ones(len(self.best), bool)
        else:
            self.best, self.best_class = np.zeros(0, np.float32), np.zeros(0, np.int64)
            self.sure = np.zeros(0, bool)
        self.plot.add_round(s)
        if not self.batch or all(self.book.answered(p) for p in self.batch):
            # (a round started before the last answers may ask about images answered since: those are dropped, and
            # when another round that sees every answer is on its way, its batch is awaited instead: the stale one
            # has usually lost its random check, which the estimate needs one of per batch)
            asked = [self.abs_paths[i] for i in s.ask]
            fresh = [p for p in asked if not self.book.answered(p)]
            if not self.round_pending or (fresh and len(fresh) == len(asked)):
                self.batch = fresh
        self._show_batch()
        self._show_accept()
        if self.round_pending:
            self.round_pending = False
            self.request_round()

    def round_failed(self, message: str) -> None:
        self.round_running = False
        self.status.setText(f"Could not update the suggestions: {message}")

    def _show_batch(self) -> None:
        s = self.suggestions
        row = self.row if s is not None and s.probs is not None else {}
        items = []
        for p in self.batch:
            if p in self.labels:
                lab = self.labels[p][0]
                caption = f"✓ {lab}" if lab else "✓ not a class"
            elif p in self.book.skipped:
                caption = "skipped"
            elif p in row:
                i = row[p]
                j = int(self.best_class[i])
                guess = "unfamiliar" if s.unfamiliar[i] else f"{self.suggested_for[j]}? {self.best[i]:.0%}"
                caption = guess
            else:
                caption = "?"
            items.append((self.shown.get(p, p), caption, p))
        selected = set(self.grid.selected_paths())
        self.grid.set_items(items)
        for r, (p, _, _) in enumerate(items):  # keep the selection of the items still unanswered
            if p in selected and os.path.abspath(p) not in self.labels:
                self.grid.selectionModel().select(self.grid.model().index(r, 0), QItemSelectionModel.Select)
        if items and not self.grid.currentIndex().isValid():
            first = next((r for r, (p, _, _) in enumerate(items) if os.path.abspath(p) not in self.labels), 0)
            self.grid.setCurrentIndex(self.grid.model().index(first, 0))

    def _show_accept(self) -> None:
        s = self.suggestions
        picks = self._acceptable()
        self.accept_btn.setText(f"Accept {len(picks)} suggestion(s)")
        self.accept_btn.setEnabled(bool(picks))
        self.accept_note.setText(estimate_note(s))

    # ------------------------------------------------------------------------------------------------ outputs
    def choose_sorted_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Write the sorted folder into", os.path.dirname(self.pile.root))
        if d:
            self.write_requested.emit(d)

    def write_failed(self, message: str) -> None:
        self.status.setText(f"Could not write the sorted folder: {message}")

    def sorted_written(self, result: dict, folder: str) -> None:
        parts = ", ".join(f"{n} {c}" for c, n in sorted(result["counts"].items()))
        failed = f"; {len(result['failed'])} could not be written" if result["failed"] else ""
        self.status.setText(
            f"Wrote {folder}: {parts} ({result['linked']} hard-linked, {result['copied']} copied){failed}. "
            "Open it in the Dataset tab like any sorted folder."
        )

    def _train(self) -> None:
        if self.pile is not None:
            self.saver.flush()
            self.train_requested.emit(self.pile.root, self.labels_file)
