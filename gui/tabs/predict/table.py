"""The Predict tab's table: the streamed prediction rows as Qt items, their filter, and the model export dialog."""

from __future__ import annotations

import os

from PySide6.QtCore import QSortFilterProxyModel, Qt
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
)

from engine.events import PredictionRow
from gui.widgets.thumbs import ThumbnailLoader

COLUMNS = ["", "Path", "Prediction", "Confidence", "Status", "Top-k", "Error"]
STATUS_TEXT = {"ok": "", "unsure": "not sure", "unfamiliar": "unfamiliar", "error": ""}
STATUS_TIP = {
    "unsure": "The model's confidence is below the threshold saved with it: check this one yourself "
    "(the best guess is kept)",
    "unfamiliar": "Unlike every training image: the answer may be meaningless whatever its confidence",
}


class PredictionModel(QStandardItemModel):
    """The streamed prediction rows, stored as Qt items so that painting and sorting the table stay in C++.

    A Python ``data()`` would be called for every visible cell and role on each repaint; each of those calls has to
    take the GIL back from the busy job thread, which stalled the window by ~100 ms while predicting on 2 cores.
    ``rows`` keeps the engine's PredictionRow objects (CSV export, filtering); thumbnails are set on column 0 when
    the view asks for them (``request_thumb``) and when they arrive.
    """

    def __init__(self, loader: ThumbnailLoader, parent=None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.loader = loader
        self.rows: list[PredictionRow] = []
        self.classes: list[str] = []
        self.top_k = 3
        self.row_of: dict[str, int] = {}
        loader.ready.connect(self._thumb)

    def reset(self, classes: list[str], top_k: int) -> None:
        self.removeRows(0, self.rowCount())
        self.rows, self.classes, self.top_k, self.row_of = [], list(classes), top_k, {}

    def topk_text(self, r: PredictionRow) -> str:
        if r.error or not r.probabilities:
            return ""
        order = sorted(range(len(r.probabilities)), key=lambda i: -r.probabilities[i])[: self.top_k]
        return ", ".join(f"{self.classes[i]} {r.probabilities[i]:.0%}" for i in order)

    def _items(self, n: int, r: PredictionRow) -> list[QStandardItem]:
        conf = f"{r.confidence:.3f}" if not r.error else ""
        texts = ["", r.path, r.prediction, conf, STATUS_TEXT.get(r.status, r.status), self.topk_text(r), r.error]
        keys = [n, r.path, r.prediction, r.confidence if not r.error else -1.0, r.status, "", r.error]  # sort keys
        items = []
        for text, key in zip(texts, keys):
            it = QStandardItem(text)
            it.setData(key, Qt.UserRole)
            it.setFlags(Qt.ItemIsSelectable | Qt.ItemIsEnabled)
            items.append(it)
        items[1].setToolTip(r.path)
        if r.status in STATUS_TIP:
            items[4].setToolTip(STATUS_TIP[r.status])
        items[0].setIcon(self.loader.placeholder)
        return items

    def append(self, rows: list[PredictionRow]) -> None:
        for r in rows:
            n = len(self.rows)
            self.row_of[r.path] = n
            self.rows.append(r)
            self.appendRow(self._items(n, r))

    def request_thumb(self, row: int) -> None:
        """Ask for row ``row``'s thumbnail (the view calls this for the rows on screen)."""
        it = self.item(row, 0)
        if it is not None and it.data(Qt.UserRole + 1) is None:
            icon = self.loader.icon(self.rows[row].path)
            if icon is not self.loader.placeholder:
                it.setData(True, Qt.UserRole + 1)  # has its real thumbnail
                it.setIcon(icon)

    def _thumb(self, path: str) -> None:
        row = self.row_of.get(path)
        if row is not None:
            self.request_thumb(row)  # now cached: sets it


class PredictionFilter(QSortFilterProxyModel):
    """Filter by predicted class and a minimum confidence; errors stay visible unless a class is chosen."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.cls: str | None = None
        self.min_conf = 0.0
        self.status: str | None = None
        self.setSortRole(Qt.UserRole)

    def set_filter(self, cls: str | None, min_conf: float, status: str | None = None) -> None:
        self.cls, self.min_conf, self.status = cls, min_conf, status
        self.invalidateFilter()

    def filterAcceptsRow(self, row, parent) -> bool:
        r = self.sourceModel().rows[row]
        if self.status is not None and r.status != self.status:
            return False
        if r.error:
            return self.cls is None and self.min_conf <= 0
        if self.cls is not None and r.prediction != self.cls:
            return False
        return r.confidence >= self.min_conf


class ExportDialog(QDialog):
    def __init__(self, parent=None, start_dir: str = "") -> None:
        super().__init__(parent)
        self.setWindowTitle("Export model")
        form = QFormLayout(self)
        self.fmt = QComboBox()
        self.fmt.addItem("ONNX (.onnx) — ONNX Runtime, OpenCV, TensorRT…", "onnx")
        self.fmt.addItem("TorchScript (.pt) — PyTorch / LibTorch without Python code", "torchscript")
        self.path = QLineEdit(os.path.join(start_dir, "model.onnx"))
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        self.fmt.currentIndexChanged.connect(self._fmt_changed)
        row = QHBoxLayout()
        row.addWidget(self.path)
        row.addWidget(browse)
        form.addRow("Format", self.fmt)
        form.addRow("File", row)
        note = QLabel(
            "The exported network takes a normalised float image tensor and returns logits; the classes "
            "and preprocessing are written next to it as .json."
        )
        note.setWordWrap(True)
        form.addRow(note)
        bb = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        bb.accepted.connect(self.accept)
        bb.rejected.connect(self.reject)
        form.addRow(bb)

    def _fmt_changed(self) -> None:
        base, _ = os.path.splitext(self.path.text())
        self.path.setText(base + (".onnx" if self.fmt.currentData() == "onnx" else ".pt"))

    def _browse(self) -> None:
        p, _ = QFileDialog.getSaveFileName(self, "Export model", self.path.text())
        if p:
            self.path.setText(p)
