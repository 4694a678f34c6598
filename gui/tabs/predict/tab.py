"""Predict tab: predict a folder in the background, stream rows into a sortable/filterable table, export CSV
(byte-for-byte the engine's format) and export the model to ONNX/TorchScript."""

from __future__ import annotations

import os

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
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
from engine.events import EngineError, PredictionRow
from engine.predict.export import export_model
from engine.predict.predictions import predict_folder, predictions_csv
from engine.predict.sorting import SortConfig, sort_into
from engine.runs import atomic_write_text, read_json
from gui.session.state import Session
from gui.tabs.predict.table import ExportDialog, PredictionFilter, PredictionModel
from gui.tabs.results.heatmap_view import Heatmaps
from gui.widgets.thumbs import ThumbnailLoader


class PredictTab(QWidget):
    """Predict a folder with the open run, and sort, export the CSV or the model: the tab's own jobs, through the
    session (the device and engine are the session's)."""

    SEP = "; "  # between several dropped paths in the field

    def __init__(self, session: Session, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.heatmaps = Heatmaps(session, self)
        session.run_changed.connect(self._run_changed)
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
        self.stop_btn.clicked.connect(session.stop)
        for w in (self.folder, browse, QLabel("Top-k"), self.top_k, self.start_btn, self.stop_btn):
            top.addWidget(w, 1 if w is self.folder else 0)
        root.addLayout(top)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status = QLabel("")
        root.addWidget(self.progress)
        root.addWidget(self.status)
        root.addLayout(self._build_filters())
        root.addWidget(self._build_table(loader), 1)
        self._enable(False)

    def _build_filters(self) -> QHBoxLayout:
        """What the table shows (class, status, confidence) and what can be done with it."""
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
        return fl

    def _build_table(self, loader: ThumbnailLoader) -> QTableView:
        """The predictions, sortable, with thumbnails for the rows on screen."""
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
        # Thumbnails only for the rows on screen, asked for shortly after the view scrolls, sorts or gets rows.
        self.thumb_timer = QTimer(self)
        self.thumb_timer.setSingleShot(True)
        self.thumb_timer.setInterval(60)
        self.thumb_timer.timeout.connect(self._request_visible_thumbs)
        self.table.verticalScrollBar().valueChanged.connect(self.thumb_timer.start)
        self.proxy.layoutChanged.connect(self.thumb_timer.start)
        self.proxy.rowsInserted.connect(self.thumb_timer.start)
        return self.table

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
        """Predict the field's paths (or ``paths``) with the loaded model, in the background."""
        if not (self.run_dir and self.start_btn.isEnabled()):
            return
        s = self.session
        cfg = PredictConfig(self.run_dir, list(paths or self.paths()), top_k=self.top_k.value(),
                            device=s.get("device"), engine=s.get("engine"))  # fmt: skip
        if not cfg.images or not all(p and os.path.exists(p) for p in cfg.images):
            s.fail("Choose a folder of images, type the path of one image, or drop photos here to classify.")
            return
        started = s.start_main(
            predict_folder, cfg, done=self.prediction_finished, failed=self.job_failed, stopping=self.stopping,
            on_progress=self.on_progress, on_predictions=self.add_rows,
        )  # fmt: skip
        if started:
            self.job_started(cfg.top_k)

    def _enable(self, has_model: bool) -> None:
        self.start_btn.setEnabled(has_model)
        self.export_model_btn.setEnabled(has_model)
        self.export_csv_btn.setEnabled(bool(self.model.rows))
        self.sort_btn.setEnabled(bool(self.model.rows))

    def _run_changed(self, run_dir: str) -> None:
        try:
            classes = read_json(os.path.join(run_dir, "model.json")).get("classes", [])
        except EngineError:
            return
        self.set_run(run_dir, classes)

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
            self.heatmaps.explain(self.run_dir, path)

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

    def job_failed(self, message: str, details: str = "") -> None:
        self.job_ended("Failed: " + message)
        self.session.fail(message, details)

    def prediction_finished(self, res) -> None:
        self.session.finished(res)
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
        """Hard-link (or copy) each predicted image into a folder per class (engine/predict/sorting.py)."""
        self.sorting_into = folder
        if self.session.start_main(sort_into, SortConfig(list(self.model.rows), folder), done=self.sort_finished,
                                   failed=self.job_failed, stopping=self.stopping):  # fmt: skip
            self.job_started()
            self.status.setText(f"Sorting into {folder} …")

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
            self.export_model(ExportConfig(self.run_dir, dlg.fmt.currentData(), dlg.path.text().strip()))

    def export_model(self, cfg: ExportConfig) -> None:
        """Write the open run's network as ONNX or TorchScript (engine/predict/export.py), in the background."""
        if self.session.start_main(export_model, cfg, done=self.export_finished, failed=self.job_failed,
                                   stopping=self.stopping):  # fmt: skip
            self.job_started()
