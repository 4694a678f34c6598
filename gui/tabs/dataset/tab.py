"""Dataset tab: pick/drop a folder, scan it in the background, show classes, warnings, skipped files, thumbnails."""

from __future__ import annotations

import html
import json
import os

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine.config import ScanConfig, TrainConfig
from engine.data.edits import add_to_exclude_list, exclude_list_for, move_to_class, undo_last_move
from engine.data.folder import Dataset
from engine.doctor.findings import pca_2d
from engine.events import EngineError
from engine.train.feature_extraction import cross_fits
from gui.settings import load_values, save_values
from gui.tabs.dataset.doctor_panel import DoctorPanel
from gui.tabs.dataset.map import DatasetMap
from gui.widgets.image_grid import ImageGrid
from gui.widgets.thumbs import ThumbnailLoader


class DatasetTab(QWidget):
    """Owns the TrainConfig fields ``data``, ``val_split``, ``test_split``, ``seed``; asks for scans with a
    :class:`ScanConfig` (``scan_requested``); ``scanning`` is true from a request until its result or failure."""

    FIELDS = ["val_split", "test_split", "seed"]
    scan_requested = Signal(object)  # ScanConfig
    doctor_requested = Signal()
    stop_requested = Signal()

    def __init__(self, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        # Builds the widgets top to bottom, as they appear: one function reads like the layout it makes.
        super().__init__(parent)
        self.dataset: Dataset | None = None
        self.folder = ""
        self.scanning = False
        self.recent_folders: list[str] = []
        self.excludes: dict[str, str] = {}  # folder -> its exclude list (train's --exclude)
        self.exclude_file: str | None = None  # the loaded folder's
        self.labels_for: dict[str, str] = {}  # folder -> the labels file its classes come from (train's --labels)
        self.checked = None  # the last DoctorResult
        root = QVBoxLayout(self)

        top = QHBoxLayout()
        self.open_btn = QPushButton("Open folder…")
        self.open_btn.setToolTip(
            "Choose a folder with one subfolder per class, or train/ val/ [test/] subfolders "
            "(Ctrl+O). You can also drop a folder on the window."
        )
        self.open_btn.clicked.connect(self.choose_folder)
        self.recent = QComboBox()
        self.recent.setMinimumWidth(380)
        self.recent.setToolTip("Recently used folders")
        self.recent.activated.connect(lambda i: self.request_scan(self.recent.itemData(i)))
        self.check_btn = QPushButton("Check dataset")
        self.check_btn.setToolTip(
            "Find duplicates, copies across train and validation, images probably in the "
            "wrong class and images unlike the rest (runs in the background)"
        )
        self.check_btn.clicked.connect(self._check_clicked)
        top.addWidget(self.open_btn)
        top.addWidget(QLabel("Recent:"))
        top.addWidget(self.recent, 1)
        top.addWidget(self.check_btn)
        root.addLayout(top)

        split = QGroupBox("Split (for folders that are not already split into train/ and val/)")
        sl = QHBoxLayout(split)
        self.val_pct = QDoubleSpinBox(suffix=" %", decimals=0, minimum=0, maximum=60, value=20, singleStep=5)
        self.val_pct.setToolTip("Share of each class held out to measure accuracy honestly")
        self.test_pct = QDoubleSpinBox(suffix=" %", decimals=0, minimum=0, maximum=60, value=0, singleStep=5)
        self.test_pct.setToolTip("Optional share held out until the end (never used to pick the best epoch)")
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.seed.setToolTip("Same seed, same split: runs stay comparable")
        self.rescan_btn = QPushButton("Apply split")
        self.rescan_btn.clicked.connect(lambda: self.folder and self.request_scan(self.folder))
        for label, w in (("Validation", self.val_pct), ("Test", self.test_pct), ("Seed", self.seed)):
            sl.addWidget(QLabel(label))
            sl.addWidget(w)
        sl.addWidget(self.rescan_btn)
        sl.addStretch(1)
        root.addWidget(split)

        self.status = QLabel(
            "Open a folder of images to begin: one subfolder per class (e.g. photos/cats, photos/dogs)."
        )
        self.status.setWordWrap(True)
        self.scan_progress = QProgressBar()
        self.scan_progress.setVisible(False)
        root.addWidget(self.status)
        root.addWidget(self.scan_progress)
        self.warnings = QLabel()
        self.warnings.setWordWrap(True)
        self.warnings.setStyleSheet("color: #9a5b00;")
        root.addWidget(self.warnings)

        splitter = QSplitter(Qt.Horizontal)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        self.class_table = QTableWidget(0, 6)
        self.class_table.setHorizontalHeaderLabels(["Class", "Images", "Train", "Val", "Test", "Share"])
        hh = self.class_table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeToContents)
        hh.setSectionResizeMode(0, QHeaderView.Stretch)
        hh.setSectionResizeMode(5, QHeaderView.Fixed)
        self.class_table.setColumnWidth(5, 90)
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.setEditTriggers(QTableWidget.NoEditTriggers)
        ll.addWidget(QLabel("Classes"))
        ll.addWidget(self.class_table, 3)
        self.skipped_label = QLabel("Unreadable files: none")
        ll.addWidget(self.skipped_label)
        self.skipped_table = QTableWidget(0, 2)
        self.skipped_table.setHorizontalHeaderLabels(["File", "Reason"])
        self.skipped_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.skipped_table.verticalHeader().setVisible(False)
        self.skipped_table.setEditTriggers(QTableWidget.NoEditTriggers)
        ll.addWidget(self.skipped_table, 1)
        splitter.addWidget(left)

        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        fl = QHBoxLayout()
        fl.addWidget(QLabel("Images"))
        self.class_filter = QComboBox()
        self.class_filter.addItem("All classes", None)
        self.class_filter.currentIndexChanged.connect(self._fill_grid)
        fl.addStretch(1)
        fl.addWidget(QLabel("Show:"))
        fl.addWidget(self.class_filter)
        rl.addLayout(fl)
        self.grid = ImageGrid(loader)
        rl.addWidget(self.grid)
        self.views = QTabWidget()
        self.views.addTab(right, "Images")
        self.doctor = DoctorPanel(loader)
        self.doctor.exclude_requested.connect(self.exclude)
        self.doctor.move_requested.connect(self.move)
        self.doctor.undo_requested.connect(self.undo_move)
        self.views.addTab(self.doctor, "Check")
        self.map = DatasetMap()
        self.map.image_clicked.connect(self.select_image)
        self.views.addTab(self.map, "Map")
        splitter.addWidget(self.views)
        splitter.setSizes([520, 740])
        root.addWidget(splitter, 1)

    # ------------------------------------------------------------------------------------------------ actions
    def choose_folder(self) -> None:
        start = self.folder or os.path.expanduser("~")
        folder = QFileDialog.getExistingDirectory(self, "Choose an image folder", start)
        if folder:
            self.request_scan(folder)

    def request_scan(self, folder: str) -> None:
        if folder:
            v = self.values()
            self.exclude_file = self.excludes.get(os.path.abspath(folder))
            labels = self.labels_for.get(os.path.abspath(folder))
            self.scan_requested.emit(
                ScanConfig(folder, v["val_split"], v["test_split"], v["seed"], self.exclude_file, labels)
            )

    def use_labels(self, folder: str, labels_file: str | None) -> None:
        """Open ``folder`` with its classes from ``labels_file`` (the labelling view's *Train on these labels*);
        None: from its class folders again."""
        self._remember(self.labels_for, folder, labels_file)
        self.request_scan(folder)

    def set_recent(self, folders: list[str]) -> None:
        self.recent_folders = list(folders)[:10]
        self.recent.blockSignals(True)
        self.recent.clear()
        for f in self.recent_folders:
            self.recent.addItem(f, f)
        self.recent.blockSignals(False)

    # ------------------------------------------------------------------------------------------------ settings
    def values(self) -> dict:
        """This tab's part of the training config: the loaded folder (what Start trains) and the split."""
        return {
            "data": self.dataset.root if self.dataset else "",
            "val_split": self.val_pct.value() / 100.0,
            "test_split": self.test_pct.value() / 100.0,
            "seed": self.seed.value(),
            "exclude": self.exclude_file,
            "labels": self.dataset.labels_file if self.dataset else None,
        }

    def set_values(self, values: dict) -> None:
        """Show these split settings; a ``data`` folder other than the loaded one is scanned."""
        if "val_split" in values:
            self.val_pct.setValue(100 * values["val_split"])
        if "test_split" in values:
            self.test_pct.setValue(100 * values["test_split"])
        if "seed" in values:
            self.seed.setValue(int(values["seed"]))
        folder = values.get("data") or (self.dataset.root if self.dataset else "")
        if "exclude" in values and folder:
            self._remember_exclude(folder, values["exclude"])
        if "labels" in values and folder:
            self._remember(self.labels_for, folder, values["labels"])
        if values.get("data") and (self.dataset is None or values["data"] != self.dataset.root):
            self.request_scan(values["data"])
        elif "exclude" in values and self.dataset is not None:
            self.exclude_file = values["exclude"]

    def _remember_exclude(self, folder: str, csv_path: str | None) -> None:
        self._remember(self.excludes, folder, csv_path)

    @staticmethod
    def _remember(table: dict[str, str], folder: str, csv_path: str | None) -> None:
        if csv_path:
            table[os.path.abspath(folder)] = os.path.abspath(csv_path)
        else:
            table.pop(os.path.abspath(folder), None)

    def save_settings(self, settings) -> None:
        save_values(settings, {k: v for k, v in self.values().items() if k in self.FIELDS})
        settings.setValue("data/recent", self.recent_folders)
        settings.setValue("data/excludes", json.dumps(self.excludes))
        settings.setValue("data/labels", json.dumps(self.labels_for))

    def restore_settings(self, settings) -> None:
        try:
            self.excludes = dict(json.loads(str(settings.value("data/excludes", "{}"))))
        except (ValueError, TypeError):
            self.excludes = {}
        try:
            self.labels_for = dict(json.loads(str(settings.value("data/labels", "{}"))))
        except (ValueError, TypeError):
            self.labels_for = {}
        self.set_values(load_values(settings, self.FIELDS))
        recent = settings.value("data/recent", []) or []
        self.set_recent([recent] if isinstance(recent, str) else [r for r in recent if isinstance(r, str)])

    def remember(self, folder: str) -> None:
        self.set_recent([folder] + [r for r in self.recent_folders if r != folder][:9])

    # ------------------------------------------------------------------------------------------------ scanning
    def scan_started(self, folder: str, what: str = "Scanning") -> None:
        self.scanning = True
        self.folder = folder
        self.status.setText(f"{what} {folder} …")
        if what == "Checking":
            self.check_btn.setText("Stop checking")
        self.scan_progress.setVisible(True)
        self.scan_progress.setRange(0, 0)
        self.scan_progress.setFormat("%p%")

    def scan_progress_update(self, p) -> None:
        if p.total:
            self.scan_progress.setRange(0, p.total)
            self.scan_progress.setValue(p.done)
        if p.message:  # (the check's steps say what they are doing)
            self.scan_progress.setFormat(f"{p.message}: %p%")

    # ------------------------------------------------------------------------------------------------ checks
    def _check_clicked(self) -> None:
        (self.stop_requested if self.check_btn.text().startswith("Stop") else self.doctor_requested).emit()

    def stopping(self) -> None:
        self.status.setText("Stopping the check…")

    def check_ended(self) -> None:
        self.scanning = False
        self.scan_progress.setVisible(False)
        self.check_btn.setText("Check dataset")

    def doctor_finished(self, res, leak_note: str = "") -> None:
        self.check_ended()
        if res.cancelled:
            self.status.setText("Check stopped; nothing changed.")
            return
        self.status.setText(f"<b>{html.escape(res.dataset.root)}</b> checked: see the Check and Map views.")
        self.doctor.show_result(res, leak_note)
        self.views.setCurrentWidget(self.doctor)
        self.checked = res
        self.show_map(pca_2d(res.features), "placed by their two principal components (a finer map is computed)")

    def show_map(self, coords, what: str) -> None:
        res = self.checked
        labels = [s.label for s in res.dataset.samples]
        self.map.show_points(coords, res.paths, labels, res.dataset.classes, {f.path for f in res.findings}, what)

    def exclude(self, paths: list[str]) -> None:
        """Leave ``paths`` out of training: the folder's exclude list grows (files stay), the scan updates."""
        folder = self.dataset.root
        csv_path = self.exclude_file or exclude_list_for(folder)
        n = add_to_exclude_list(csv_path, paths)
        self._remember_exclude(folder, csv_path)
        self.doctor.resolved(paths, f"{len(paths)} excluded ({n} on this folder's exclude list)")
        self.request_scan(folder)

    def move(self, path: str, cls: str) -> None:
        if not self.confirm("Move to class", f"Move {path} into the '{cls}' folder? (Undo last move puts it back.)"):
            return
        try:
            dst = move_to_class(self.dataset.root, path, cls)
        except (EngineError, OSError) as exc:
            self.doctor.summary.setText(f"Could not move it: {exc}")
            return
        self.doctor.resolved([path], f"moved to {dst}")
        self.request_scan(self.dataset.root)

    def undo_move(self) -> None:
        try:
            last = undo_last_move()
        except EngineError as exc:
            self.doctor.summary.setText(str(exc))
            return
        self.doctor.summary.setText("Nothing to undo." if last is None else f"Put back: {last['from']}")
        if last is not None and self.dataset is not None:
            self.request_scan(self.dataset.root)

    def confirm(self, title: str, text: str) -> bool:
        return QMessageBox.question(self, title, text) == QMessageBox.Yes

    def select_image(self, path: str) -> None:
        """Show ``path`` selected in the Images grid (a click on the map)."""
        self.class_filter.setCurrentIndex(0)
        rows = self.grid.model_.row_of.get(path, [])
        if rows:
            idx = self.grid.model_.index(rows[0])
            self.grid.setCurrentIndex(idx)
            self.grid.scrollTo(idx)
            self.views.setCurrentIndex(0)

    def scan_finished(self, result) -> None:
        """The scan job's result (a cancelled one was superseded by a newer scan, which reports itself)."""
        if result.dataset is not None:
            self.show_dataset(result.dataset)

    def scan_failed(self, message: str) -> None:
        self.check_ended()
        self.scan_progress.setVisible(False)
        ds = self.dataset
        if ds is None:
            self.status.setText(message)
            return
        # The folder opened before stays loaded (and is what Start trains): say so under the error.
        self.folder = ds.root
        self.status.setText(
            f"{html.escape(message)}<br>Still loaded: <b>{html.escape(ds.root)}</b> "
            f"({len(ds.samples)} images in {len(ds.classes)} classes)."
        )

    # ------------------------------------------------------------------------------------------------ display
    def show_dataset(self, ds: Dataset) -> None:
        self.scanning = False
        self.dataset = ds
        self.folder = ds.root
        self.scan_progress.setVisible(False)
        counts = ds.counts()
        total = len(ds.samples)
        n_split = {s: len(ds.split(s)) for s in ("train", "val", "test")}
        layout = (
            "already split into train/val" + ("/test" if n_split["test"] else "")
            if ds.layout == "pre-split"
            else "not split: the split below is applied"
        )
        if ds.labels_file:
            layout = (
                f"classes from the labels file {html.escape(ds.labels_file)} (unlabelled images left out); " + layout
            )
        if ds.validation_given():
            judged = " Your val/ folder is kept as given: every strategy is judged on it."
        elif cross_fits(TrainConfig(), ds):
            judged = (
                f" Feature extraction cross-validates (5 folds): all {n_split['train'] + n_split['val']} labelled "
                "images train its model and each is judged by a head that never saw it; fine-tuning validates on "
                f"the {n_split['val']}."
            )
        else:
            judged = ""
        self.status.setText(
            f"<b>{ds.root}</b><br>{total} images in {len(ds.classes)} classes, {layout}. "
            f"Train {n_split['train']}, validation {n_split['val']}, test {n_split['test']}.{judged}"
        )
        self.warnings.setText("<br>".join(f"⚠ {w}" for w in ds.warnings))
        self.class_table.setRowCount(len(ds.classes))
        biggest = max((sum(c.values()) for c in counts.values()), default=1) or 1
        for r, cls in enumerate(ds.classes):
            c = counts[cls]
            n = sum(c.values())
            for col, val in enumerate([cls, n, c["train"], c["val"], c["test"]]):
                item = QTableWidgetItem(str(val))
                if col:
                    item.setData(Qt.DisplayRole, int(val))
                self.class_table.setItem(r, col, item)
            bar = QProgressBar()
            bar.setRange(0, biggest)
            bar.setValue(n)
            bar.setFormat(f"{100 * n / max(1, total):.0f}%")
            self.class_table.setCellWidget(r, 5, bar)
        self.skipped_label.setText(f"Unreadable files: {len(ds.skipped)}" if ds.skipped else "Unreadable files: none")
        self.skipped_table.setRowCount(len(ds.skipped))
        for r, (p, reason) in enumerate(ds.skipped):
            self.skipped_table.setItem(r, 0, QTableWidgetItem(os.path.relpath(p, ds.root)))
            self.skipped_table.setItem(r, 1, QTableWidgetItem(reason))
        self.class_filter.blockSignals(True)
        self.class_filter.clear()
        self.class_filter.addItem("All classes", None)
        for i, c in enumerate(ds.classes):
            self.class_filter.addItem(c, i)
        self.class_filter.blockSignals(False)
        self._fill_grid()

    def _fill_grid(self) -> None:
        ds = self.dataset
        if ds is None:
            return
        want = self.class_filter.currentData()
        items = [
            (s.path, ds.classes[s.label], f"{s.path}\nclass: {ds.classes[s.label]}, split: {s.split}")
            for s in ds.samples
            if want is None or s.label == want
        ]
        self.grid.set_items(items)
