"""Dataset > Check dataset: the doctor's findings, worst first, with the images side by side and one-click fixes.

A pair (copy, near copy, leak) shows both pictures; a suspected wrong label shows the picture beside a few images
of its given class and of the class it more likely belongs to. *Exclude from training* (the default) adds it to the
folder's exclude list; *Move to class…* moves the file (asks first; journalled, *Undo last move* puts it back);
*Reveal* shows it in the file manager. The panel only asks: the Dataset tab carries the fixes out.
"""

from __future__ import annotations

import os

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.doctor.findings import ISSUES
from gui.widgets.image_grid import ImageGrid, reveal_in_file_manager
from gui.widgets.thumbs import ThumbnailLoader, read_image

WORDS = {
    "duplicate": "byte-identical copy",
    "near-duplicate": "near copy (resized, re-saved, cropped)",
    "leak": "copy across train and validation/test",
    "label": "probably in the wrong class",
    "outlier": "unlike every other image",
}


def _picture(path: str, size: int = 220) -> QPixmap:
    return QPixmap.fromImage(read_image(path, size))


class DoctorPanel(QWidget):
    exclude_requested = Signal(list)  # paths
    move_requested = Signal(str, str)  # path, class
    undo_requested = Signal()

    def __init__(self, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.findings: list = []
        self.dataset = None
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        self.summary = QLabel(
            "Check dataset finds duplicates, leaks between splits, likely wrong labels and "
            "outliers (it embeds the images first, as feature extraction does)."
        )
        self.summary.setWordWrap(True)
        self.filter = QComboBox()
        self.filter.addItem("all findings", None)
        for k in ISSUES:
            self.filter.addItem(k, k)
        self.filter.currentIndexChanged.connect(self._fill)
        top.addWidget(self.summary, 1)
        top.addWidget(self.filter)
        root.addLayout(top)
        split = QSplitter(Qt.Vertical)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Issue", "Image", "With / likely class", "Score"])
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(2, QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._show_selected)
        split.addWidget(self.table)
        detail = QWidget()
        dl = QVBoxLayout(detail)
        dl.setContentsMargins(0, 0, 0, 0)
        pics = QHBoxLayout()
        self.left, self.right = QLabel(), QLabel()
        self.left_caption, self.right_caption = QLabel(), QLabel()
        for pic, cap in ((self.left, self.left_caption), (self.right, self.right_caption)):
            col = QVBoxLayout()
            pic.setAlignment(Qt.AlignCenter)
            pic.setMinimumSize(200, 160)
            cap.setWordWrap(True)
            col.addWidget(pic, 1)
            col.addWidget(cap)
            pics.addLayout(col, 1)
        self.examples = ImageGrid(loader)
        self.examples.setMaximumHeight(160)
        pics.addWidget(self.examples, 2)
        dl.addLayout(pics, 1)
        btns = QHBoxLayout()
        self.exclude_btn = QPushButton("Exclude from training")
        self.exclude_btn.setToolTip("Leave this image out of training (remembered for this folder; the file stays)")
        self.exclude_btn.setDefault(True)
        self.exclude_btn.clicked.connect(self._exclude)
        self.move_btn = QPushButton("Move to class…")
        self.move_btn.setToolTip("Move the file into the suggested class's folder (asks first; can be undone)")
        self.move_btn.clicked.connect(self._move)
        self.reveal_btn = QPushButton("Reveal in file manager")
        self.reveal_btn.clicked.connect(self._reveal)
        self.undo_btn = QPushButton("Undo last move")
        self.undo_btn.clicked.connect(self.undo_requested)
        for b in (self.exclude_btn, self.move_btn, self.reveal_btn):
            btns.addWidget(b)
        btns.addStretch(1)
        btns.addWidget(self.undo_btn)
        dl.addLayout(btns)
        split.addWidget(detail)
        split.setSizes([260, 300])
        root.addWidget(split, 1)
        self._enable(None)

    # ------------------------------------------------------------------------------------------------ display
    def show_result(self, res, leak_note: str = "") -> None:
        self.findings, self.dataset = list(res.findings), res.dataset
        counts = res.counts()
        if not res.findings:
            text = f"Checked {len(res.dataset.samples)} images in {res.seconds:.1f} s: no problems found."
        else:
            text = (
                f"Checked {len(res.dataset.samples)} images in {res.seconds:.1f} s: "
                + ", ".join(f"<b>{n}</b> {k}" for k, n in counts.items() if n)
                + "."
            )
        self.summary.setText(text + (f" {leak_note}" if leak_note else ""))
        self._fill()

    def visible(self) -> list:
        want = self.filter.currentData()
        return [f for f in self.findings if want is None or f.issue == want]

    def _fill(self) -> None:
        rows = self.visible()
        self.table.setRowCount(len(rows))
        root = self.dataset.root if self.dataset else ""
        for r, f in enumerate(rows):
            other = (
                os.path.relpath(f.other_path, root)
                if f.other_path
                else (f"→ {f.suggested_label}" if f.suggested_label else "")
            )
            for c, text in enumerate([f.issue, os.path.relpath(f.path, root), other, f"{f.score:.3f}"]):
                item = QTableWidgetItem(text)
                tip = WORDS[f.issue]
                if f.precision is not None:
                    tip += f" (about {100 * f.precision:.0f}% of such findings are true on this folder)"
                item.setToolTip(tip if c == 0 else f.path)
                self.table.setItem(r, c, item)
        if rows:
            self.table.selectRow(0)
            self._show_selected()  # (no selection change fires when row 0 was already selected)
        else:
            self._enable(None)

    def selected(self):
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        vis = self.visible()
        return vis[rows[0].row()] if rows and rows[0].row() < len(vis) else None

    def _enable(self, f) -> None:
        for b in (self.exclude_btn, self.reveal_btn):
            b.setEnabled(f is not None)
        self.move_btn.setEnabled(f is not None and bool(f.suggested_label) and f.issue in ("label", "duplicate"))

    def _show_selected(self) -> None:
        f = self.selected()
        self._enable(f)
        if f is None:
            return
        self.left.setPixmap(_picture(f.path))
        self.left_caption.setText(f"{os.path.basename(f.path)}\nclass {f.label}: {WORDS[f.issue]}")
        if f.other_path:
            self.right.setPixmap(_picture(f.other_path))
            self.right_caption.setText(f"{os.path.basename(f.other_path)}")
            self.examples.set_items([])
        else:
            self.right.clear()
            self.right_caption.setText("")
            self.examples.set_items(self._examples(f))

    def _examples(self, f) -> list[tuple[str, str, str]]:
        """A few images of the given class and of the suggested one, to compare with."""
        ds = self.dataset
        if ds is None:
            return []
        out = []
        for cls in [c for c in (f.label, f.suggested_label) if c]:
            idx = ds.classes.index(cls) if cls in ds.classes else -1
            paths = [s.path for s in ds.samples if s.label == idx and s.path != f.path][:4]
            out += [(p, cls, p) for p in paths]
        return out

    # ------------------------------------------------------------------------------------------------ actions
    def _exclude(self) -> None:
        f = self.selected()
        if f is not None:
            self.exclude_requested.emit([f.path])

    def _move(self) -> None:
        f = self.selected()
        if f is not None and f.suggested_label:
            self.move_requested.emit(f.path, f.suggested_label)

    def _reveal(self) -> None:
        f = self.selected()
        if f is not None:
            reveal_in_file_manager(f.path)

    def resolved(self, paths: list[str], how: str) -> None:
        """Findings about ``paths`` were acted on: they leave the list (the summary says how)."""
        gone = set(paths)
        self.findings = [f for f in self.findings if f.path not in gone]
        self.summary.setText(self.summary.text().split(" Done:")[0] + f" Done: {how}.")
        self._fill()
