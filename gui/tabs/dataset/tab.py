"""Dataset tab: pick/drop a folder, scan it in the background, show classes, warnings, skipped files, thumbnails."""

from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt
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

from engine.config import ScanConfig
from engine.data.folder import Dataset
from engine.data.labels import is_a_pile, open_dataset
from engine.train.feature_extraction import cross_fits
from gui.jobs.controller import SCAN
from gui.session.binding import bind_spin
from gui.session.state import Session
from gui.tabs.dataset.checks import DatasetChecks
from gui.tabs.dataset.doctor_panel import DoctorPanel
from gui.tabs.dataset.map import DatasetMap
from gui.widgets.image_grid import ImageGrid
from gui.widgets.thumbs import ThumbnailLoader


class DatasetTab(QWidget):
    """The open folder: its scan (the tab's own job, in the scan lane: a newer one supersedes it), the split fields
    ``val_split``, ``test_split``, ``seed`` bound to the session, the Check and Map views (checks.py)."""

    def __init__(self, session: Session, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        # Builds the widgets top to bottom, as they appear: each helper reads like the part of the layout it makes.
        super().__init__(parent)
        self.session = session
        self.folder = ""
        root = QVBoxLayout(self)
        self._build_top(root)
        self._build_split(root)
        self._build_status(root)
        splitter = QSplitter(Qt.Horizontal)
        splitter.addWidget(self._build_classes())
        splitter.addWidget(self._build_views(loader))
        splitter.setSizes([520, 740])
        root.addWidget(splitter, 1)
        self.checks = DatasetChecks(self)
        bind_spin(session, "val_split", self.val_pct, lambda v: v / 100.0, lambda v: 100 * v)
        bind_spin(session, "test_split", self.test_pct, lambda v: v / 100.0, lambda v: 100 * v)
        bind_spin(session, "seed", self.seed, int)
        session.follow(("cross_fit", "val_split", "test_split", "seed"), self._describe, dataset=False)
        session.open_labelled.connect(self.use_labels)

    def _build_top(self, root: QVBoxLayout) -> None:
        """Open folder, the recent folders and Check dataset."""
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
        self.set_recent(self.session.recent)
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

    def _build_split(self, root: QVBoxLayout) -> None:
        """The validation and test shares and the seed, for folders not already split."""
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

    def _build_status(self, root: QVBoxLayout) -> None:
        """The folder's status line, the scan's progress and its warnings."""
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

    def _build_classes(self) -> QWidget:
        """The class table and the unreadable files."""
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
        return left

    def _build_views(self, loader: ThumbnailLoader) -> QTabWidget:
        """The Images, Check and Map views."""
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
        self.views.addTab(self.doctor, "Check")
        self.map = DatasetMap()
        self.map.image_clicked.connect(self.select_image)
        self.views.addTab(self.map, "Map")
        return self.views

    # ------------------------------------------------------------------------------------------------ actions
    def choose_folder(self) -> None:
        start = self.folder or os.path.expanduser("~")
        folder = QFileDialog.getExistingDirectory(self, "Choose an image folder", start)
        if folder:
            self.request_scan(folder)

    def request_scan(self, folder: str) -> None:
        """Scan ``folder`` with the session's split (its exclude list and labels file remembered for it)."""
        if not folder:
            return
        s = self.session
        cfg = ScanConfig(folder, s.get("val_split"), s.get("test_split"), s.get("seed"), s.exclude_for(folder),
                         s.labels_file_for(folder))  # fmt: skip
        self.scan_started(folder)
        s.show_tab.emit(self)
        s.jobs.start(SCAN, open_dataset, cfg, done=self.scan_finished, failed=self._scan_failed,
                     on_progress=self.scan_progress_update)  # fmt: skip

    def use_labels(self, folder: str, labels_file: str | None) -> None:
        """Open ``folder`` with its classes from ``labels_file`` (the labelling view's *Train on these labels*);
        None: from its class folders again."""
        self.session.remember(self.session.labels_for, folder, labels_file)
        self.request_scan(folder)

    def set_recent(self, folders: list[str]) -> None:
        self.recent.blockSignals(True)
        self.recent.clear()
        for f in list(folders)[:10]:
            self.recent.addItem(f, f)
        self.recent.blockSignals(False)

    # ------------------------------------------------------------------------------------------------ scanning
    def scan_started(self, folder: str, what: str = "Scanning") -> None:
        self.session.scanning = True
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
        if self.check_btn.text().startswith("Stop"):
            self.session.stop()
        else:
            self.checks.start()

    def stopping(self) -> None:
        self.status.setText("Stopping the check…")

    def check_ended(self) -> None:
        self.session.scanning = False
        self.scan_progress.setVisible(False)
        self.check_btn.setText("Check dataset")

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
            ds = result.dataset
            self.session.scanning = False
            self.session.set_dataset(ds)  # (first: the views derived from it read it from the session)
            self.show_dataset(ds)
            self.set_recent(self.session.recent)
            self.session.status.emit(f"{len(ds.samples)} images, {len(ds.classes)} classes")

    def _scan_failed(self, message: str, details: str) -> None:
        folder = self.folder
        from_labels = bool(folder) and self.session.labels_file_for(folder) is not None
        if not self.session.busy() and not from_labels and is_a_pile(folder, message):
            # No class folders, but images: that is a folder to label, not an error.
            self.scan_failed(
                f"{folder} has images but no class folders: it is open in the Label tab, which asks you about the "
                "images most worth labelling first."
            )
            self.session.label_requested.emit(folder)
            return
        self.scan_failed(message)
        self.session.fail(message, details)

    def scan_failed(self, message: str) -> None:
        self.check_ended()
        self.scan_progress.setVisible(False)
        ds = self.session.dataset
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
    @property
    def dataset(self) -> Dataset | None:
        return self.session.dataset

    def show_dataset(self, ds: Dataset) -> None:
        self.session.scanning = False
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
        self._layout_words = (
            f"<b>{ds.root}</b><br>{total} images in {len(ds.classes)} classes, {layout}. "
            f"Train {n_split['train']}, validation {n_split['val']}, test {n_split['test']}."
        )
        self._describe(ds)
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

    def _describe(self, ds: Dataset | None = None) -> None:
        """The folder's line, with how it will be judged under the session's cross-fitting setting (follows it)."""
        ds = ds or self.dataset
        if ds is None or self.session.scanning:
            return
        n_split = {s: len(ds.split(s)) for s in ("train", "val")}
        if ds.validation_given():
            judged = " Your val/ folder is kept as given: every strategy is judged on it."
        elif cross_fits(self.session.train_config(out=""), ds):
            judged = (
                f" Feature extraction cross-validates (5 folds): all {n_split['train'] + n_split['val']} labelled "
                "images train its model and each is judged by a head that never saw it; fine-tuning validates on "
                f"the {n_split['val']}."
            )
        else:
            judged = f" Feature extraction and fine-tuning validate on the {n_split['val']} held out."
        self.status.setText(getattr(self, "_layout_words", "") + judged)

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
