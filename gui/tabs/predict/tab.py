"""Predict tab: predict a folder in the background, stream rows into a sortable/filterable table, export CSV
(byte-for-byte the engine's format) and export the model to ONNX/TorchScript."""

from __future__ import annotations

import os

from PySide6.QtCore import QSortFilterProxyModel, Qt, QTimer, Signal
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from engine.config import ExportConfig, PredictConfig
from engine.events import PredictionRow
from engine.predict.predictions import predictions_csv
from engine.predict.sorting import SortConfig
from engine.runs import atomic_write_text
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


class PredictTab(QWidget):
    predict_requested = Signal(object)  # PredictConfig (the window fills in the device)
    heatmap_requested = Signal(str, str)  # run folder, image
    sort_requested = Signal(object)  # SortConfig
    SEP = "; "  # between several dropped paths in the field
    stop_requested = Signal()
    export_requested = Signal(object)  # ExportConfig

    def __init__(self, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir: str | None = None
        self.classes: list[str] = []
        self.sorting_into = ""
        root = QVBoxLayout(self)
        self.run_label = QLabel("No model yet: train one, or open a saved run (File ▸ Open run…).")
        root.addWidget(self.run_label)
        top = QHBoxLayout()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText(
            "Folder of images (searched recursively) or one image to classify; or drop photos and folders on this tab"
        )
        browse = QPushButton("Choose folder…")
        browse.clicked.connect(self._browse)
        self.top_k = QSpinBox(minimum=1, maximum=20, value=3)
        self.top_k.setToolTip("How many of the most likely classes to list per image")
        self.start_btn = QPushButton("Predict")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        self.start_btn.clicked.connect(self.request_prediction)
        self.folder.returnPressed.connect(self.request_prediction)  # Enter in the field predicts, as Predict does
        self.stop_btn.clicked.connect(self.stop_requested)
        for w in (self.folder, browse, QLabel("Top-k"), self.top_k, self.start_btn, self.stop_btn):
            top.addWidget(w, 1 if w is self.folder else 0)
        root.addLayout(top)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status = QLabel("")
        root.addWidget(self.progress)
        root.addWidget(self.status)
        fl = QHBoxLayout()
        self.class_filter = QComboBox()
        self.class_filter.addItem("All predictions", None)
        self.min_conf = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0, singleStep=0.05, value=0.0)
        self.min_conf.setToolTip(
            "Hide predictions below this confidence (e.g. to review only uncertain ones, sort by confidence instead)"
        )
        self.status_filter = QComboBox()
        self.status_filter.addItem("any status", None)
        for status, text in (
            ("ok", "ok"),
            ("unsure", "not sure"),
            ("unfamiliar", "unfamiliar"),
            ("error", "unreadable"),
        ):
            self.status_filter.addItem(text, status)
        self.status_filter.setToolTip(
            "'not sure': below the model's confidence threshold; 'unfamiliar': unlike every training image"
        )
        self.class_filter.currentIndexChanged.connect(self._filter)
        self.min_conf.valueChanged.connect(self._filter)
        self.status_filter.currentIndexChanged.connect(self._filter)
        self.sort_btn = QPushButton("Sort into folders…")
        self.sort_btn.setToolTip(
            "Copy (or hard-link) each image into a folder per predicted class, plus _unsure and "
            "_unfamiliar; nothing is moved or overwritten"
        )
        self.sort_btn.clicked.connect(self._sort_dialog)
        self.export_csv_btn = QPushButton("Export CSV…")
        self.export_csv_btn.clicked.connect(self._export_csv_dialog)
        self.export_model_btn = QPushButton("Export model…")
        self.export_model_btn.clicked.connect(self._export_model_dialog)
        self.heatmap_btn = QPushButton("Where it looked…")
        self.heatmap_btn.setToolTip("The selected image with a heatmap of what drove its prediction")
        self.heatmap_btn.clicked.connect(self._heatmap)
        for w in (QLabel("Show"), self.class_filter, self.status_filter, QLabel("min. confidence"), self.min_conf):
            fl.addWidget(w)
        fl.addStretch(1)
        fl.addWidget(self.heatmap_btn)
        fl.addWidget(self.sort_btn)
        fl.addWidget(self.export_csv_btn)
        fl.addWidget(self.export_model_btn)
        root.addLayout(fl)
        self.model = PredictionModel(loader, self)
        self.proxy = PredictionFilter(self)
        self.proxy.setSourceModel(self.model)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.verticalHeader().setDefaultSectionSize(52)
        self.table.setIconSize(
            loader.placeholder.availableSizes()[0] * 0.5
            if loader.placeholder.availableSizes()
            else self.table.iconSize()
        )
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.table.setColumnWidth(0, 60)
        self.table.setColumnWidth(2, 120)
        self.table.setColumnWidth(4, 90)
        self.table.setColumnWidth(5, 260)
        root.addWidget(self.table, 1)
        # Thumbnails only for the rows on screen, asked for shortly after the view scrolls, sorts or gets rows.
        self.thumb_timer = QTimer(self)
        self.thumb_timer.setSingleShot(True)
        self.thumb_timer.setInterval(60)
        self.thumb_timer.timeout.connect(self._request_visible_thumbs)
        self.table.verticalScrollBar().valueChanged.connect(self.thumb_timer.start)
        self.proxy.layoutChanged.connect(self.thumb_timer.start)
        self.proxy.rowsInserted.connect(self.thumb_timer.start)
        self._enable(False)

    def _request_visible_thumbs(self) -> None:
        n = self.proxy.rowCount()
        if not n:
            return
        first = max(0, self.table.rowAt(0))
        last = self.table.rowAt(self.table.viewport().height() - 1)
        last = n - 1 if last < 0 else last
        for r in range(first, min(last, first + 60) + 1):
            self.model.request_thumb(self.proxy.mapToSource(self.proxy.index(r, 0)).row())

    def request_prediction(self, paths: list[str] | None = None) -> None:
        """Ask for the field's paths (or ``paths``) to be predicted with the loaded model."""
        if self.run_dir and self.start_btn.isEnabled():
            self.predict_requested.emit(
                PredictConfig(self.run_dir, list(paths or self.paths()), top_k=self.top_k.value())
            )

    def _enable(self, has_model: bool) -> None:
        self.start_btn.setEnabled(has_model)
        self.export_model_btn.setEnabled(has_model)
        self.export_csv_btn.setEnabled(bool(self.model.rows))
        self.sort_btn.setEnabled(bool(self.model.rows))

    def set_run(self, run_dir: str, classes: list[str]) -> None:
        self.run_dir, self.classes = run_dir, list(classes)
        self.run_label.setText(f"Model: <b>{run_dir}</b> ({len(classes)} classes: {', '.join(classes)})")
        self.class_filter.blockSignals(True)
        self.class_filter.clear()
        self.class_filter.addItem("All predictions", None)
        for c in classes:
            self.class_filter.addItem(c, c)
        self.class_filter.blockSignals(False)
        self._enable(True)

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder to classify", self.folder.text())
        if d:
            self.folder.setText(d)

    def _filter(self) -> None:
        self.proxy.set_filter(self.class_filter.currentData(), self.min_conf.value(), self.status_filter.currentData())

    def selected_path(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        return self.model.rows[self.proxy.mapToSource(rows[0]).row()].path

    def _heatmap(self) -> None:
        path = self.selected_path()
        if self.run_dir and path:
            self.heatmap_requested.emit(self.run_dir, path)

    def job_started(self, top_k: int | None = None) -> None:
        """A prediction (``top_k`` given: the table restarts) or an export started."""
        if top_k is not None:
            self.model.reset(self.classes, top_k)
        self.start_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.export_csv_btn.setEnabled(False)
        self.progress.setRange(0, 0)
        self.status.setText("Predicting…" if top_k is not None else "Exporting…")

    def stopping(self) -> None:
        self.status.setText("Stopping…")

    def job_failed(self, message: str) -> None:
        self.job_ended("Failed: " + message)

    def prediction_finished(self, res) -> None:
        if res.cancelled:
            self.job_ended(f"Stopped after {len(res.rows)} files.")
        else:
            self.job_ended(
                f"{len(res.rows)} files in {res.seconds:.1f} s"
                + (f", {res.n_errors} unreadable" if res.n_errors else "")
                + ". Export CSV… saves exactly these rows."
            )

    def export_finished(self, res) -> None:
        self.job_ended("Export cancelled." if res.cancelled else f"Exported {res.model} (+ .json)")

    def on_progress(self, p) -> None:
        if p.total:
            self.progress.setRange(0, p.total)
            self.progress.setValue(p.done)
            self.status.setText(
                f"{p.done}/{p.total} files, {p.images_per_s:.1f} images/s"
                + (f", ETA {p.eta_s:.0f} s" if p.eta_s else "")
            )

    def add_rows(self, rows: list[PredictionRow]) -> None:
        self.model.append(rows)

    def job_ended(self, text: str) -> None:
        self.start_btn.setEnabled(self.run_dir is not None)
        self.stop_btn.setEnabled(False)
        self.export_csv_btn.setEnabled(bool(self.model.rows))
        self.sort_btn.setEnabled(bool(self.model.rows))
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText(text)

    def csv_text(self) -> str:
        return predictions_csv(self.model.rows, self.classes, self.model.top_k)

    def export_csv(self, path: str) -> None:
        atomic_write_text(path, self.csv_text())

    def set_paths(self, paths: list[str]) -> None:
        self.folder.setText(self.SEP.join(paths))

    def paths(self) -> list[str]:
        """What the field names: one folder or image, or the several items dropped on the tab."""
        text = self.folder.text().strip()
        if not text:
            return []
        return [text] if os.path.exists(text) or self.SEP not in text else text.split(self.SEP)

    def _sort_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Sort the predicted images into this folder", os.path.expanduser("~")
        )
        if folder:
            self.sort_into(folder)

    def sort_into(self, folder: str) -> None:
        self.sort_requested.emit(SortConfig(list(self.model.rows), folder))

    def sort_finished(self, res) -> None:
        self.job_ended("Sorting stopped." if res.cancelled else res.summary(self.sorting_into))

    def _export_csv_dialog(self) -> None:
        first = (self.paths() or [""])[0]
        base = first if os.path.isdir(first) else (os.path.dirname(first) or os.path.expanduser("~"))
        start = os.path.join(base, "predictions.csv")
        path, _ = QFileDialog.getSaveFileName(self, "Export predictions", start, "CSV (*.csv)")
        if path:
            try:
                self.export_csv(path)
                self.status.setText(f"Wrote {len(self.model.rows)} rows to {path}")
            except OSError as exc:
                self.status.setText(f"Could not write {path}: {exc.strerror or exc}")

    def _export_model_dialog(self) -> None:
        dlg = ExportDialog(self, os.path.expanduser("~"))
        if dlg.exec() == QDialog.Accepted and dlg.path.text().strip():
            self.export_requested.emit(ExportConfig(self.run_dir, dlg.fmt.currentData(), dlg.path.text().strip()))
