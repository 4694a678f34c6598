"""Dataset tab: pick/drop a folder, scan it in the background, show classes, warnings, skipped files, thumbnails."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QGroupBox, QHBoxLayout,
                               QHeaderView, QLabel, QProgressBar, QPushButton, QSpinBox, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from engine.config import ScanConfig
from engine.data import Dataset
from gui.settings import load_values, save_values
from gui.thumbs import ThumbnailLoader
from gui.widgets import ImageGrid


class DatasetTab(QWidget):
    """Owns the TrainConfig fields ``data``, ``val_split``, ``test_split``, ``seed``; asks for scans with a
    :class:`ScanConfig` (``scan_requested``); ``scanning`` is true from a request until its result or failure."""

    FIELDS = ["val_split", "test_split", "seed"]
    scan_requested = Signal(object)  # ScanConfig

    def __init__(self, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        # Builds the widgets top to bottom, as they appear: one function reads like the layout it makes.
        super().__init__(parent)
        self.dataset: Dataset | None = None
        self.folder = ""
        self.scanning = False
        self.recent_folders: list[str] = []
        root = QVBoxLayout(self)

        top = QHBoxLayout()
        self.open_btn = QPushButton("Open folder…")
        self.open_btn.setToolTip("Choose a folder with one subfolder per class, or train/ val/ [test/] subfolders "
                                 "(Ctrl+O). You can also drop a folder on the window.")
        self.open_btn.clicked.connect(self.choose_folder)
        self.recent = QComboBox()
        self.recent.setMinimumWidth(380)
        self.recent.setToolTip("Recently used folders")
        self.recent.activated.connect(lambda i: self.request_scan(self.recent.itemData(i)))
        top.addWidget(self.open_btn)
        top.addWidget(QLabel("Recent:"))
        top.addWidget(self.recent, 1)
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

        self.status = QLabel("Open a folder of images to begin: one subfolder per class (e.g. photos/cats, "
                             "photos/dogs).")
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
        splitter.addWidget(right)
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
            self.scan_requested.emit(ScanConfig(folder, v["val_split"], v["test_split"], v["seed"]))

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
        return {"data": self.dataset.root if self.dataset else "", "val_split": self.val_pct.value() / 100.0,
                "test_split": self.test_pct.value() / 100.0, "seed": self.seed.value()}

    def set_values(self, values: dict) -> None:
        """Show these split settings; a ``data`` folder other than the loaded one is scanned."""
        if "val_split" in values:
            self.val_pct.setValue(100 * values["val_split"])
        if "test_split" in values:
            self.test_pct.setValue(100 * values["test_split"])
        if "seed" in values:
            self.seed.setValue(int(values["seed"]))
        if values.get("data") and (self.dataset is None or values["data"] != self.dataset.root):
            self.request_scan(values["data"])

    def save_settings(self, settings) -> None:
        save_values(settings, {k: v for k, v in self.values().items() if k in self.FIELDS})
        settings.setValue("data/recent", self.recent_folders)

    def restore_settings(self, settings) -> None:
        self.set_values(load_values(settings, self.FIELDS))
        recent = settings.value("data/recent", []) or []
        self.set_recent([recent] if isinstance(recent, str) else [r for r in recent if isinstance(r, str)])

    def remember(self, folder: str) -> None:
        self.set_recent([folder] + [r for r in self.recent_folders if r != folder][:9])

    # ------------------------------------------------------------------------------------------------ scanning
    def scan_started(self, folder: str) -> None:
        self.scanning = True
        self.folder = folder
        self.status.setText(f"Scanning {folder} …")
        self.scan_progress.setVisible(True)
        self.scan_progress.setRange(0, 0)

    def scan_progress_update(self, p) -> None:
        if p.total:
            self.scan_progress.setRange(0, p.total)
            self.scan_progress.setValue(p.done)

    def scan_finished(self, result) -> None:
        """The scan job's result (a cancelled one was superseded by a newer scan, which reports itself)."""
        if result.dataset is not None:
            self.show_dataset(result.dataset)

    def scan_failed(self, message: str) -> None:
        self.scanning = False
        self.scan_progress.setVisible(False)
        ds = self.dataset
        if ds is None:
            self.status.setText(message)
            return
        # The folder opened before stays loaded (and is what Start trains): say so under the error.
        self.folder = ds.root
        self.status.setText(f"{html.escape(message)}<br>Still loaded: <b>{html.escape(ds.root)}</b> "
                            f"({len(ds.samples)} images in {len(ds.classes)} classes).")

    # ------------------------------------------------------------------------------------------------ display
    def show_dataset(self, ds: Dataset) -> None:
        self.scanning = False
        self.dataset = ds
        self.folder = ds.root
        self.scan_progress.setVisible(False)
        counts = ds.counts()
        total = len(ds.samples)
        n_split = {s: len(ds.split(s)) for s in ("train", "val", "test")}
        layout = ("already split into train/val" + ("/test" if n_split["test"] else "")
                  if ds.layout == "pre-split" else "not split: the split below is applied")
        self.status.setText(f"<b>{ds.root}</b><br>{total} images in {len(ds.classes)} classes, {layout}. "
                            f"Train {n_split['train']}, validation {n_split['val']}, test {n_split['test']}.")
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
        items = [(s.path, ds.classes[s.label], f"{s.path}\nclass: {ds.classes[s.label]}, split: {s.split}")
                 for s in ds.samples if want is None or s.label == want]
        self.grid.set_items(items)
