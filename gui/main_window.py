"""Main window: composes the tabs around one session (gui/session/state.py), with the menus, drops, status bar and
closing. Tabs bind their settings to the session and run their own jobs through it; nothing is routed here."""

from __future__ import annotations

import os
import time

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QApplication, QFileDialog, QLabel, QMainWindow, QMessageBox, QTabWidget

from engine.config import TrainConfig
from engine.events import EngineError
from gui.cache_dialog import manage_embedding_cache
from gui.jobs.controller import DISCOVERY, MAIN, SCAN
from gui.jobs.discovery import discover
from gui.session.state import Session
from gui.tabs.dataset.tab import DatasetTab
from gui.tabs.label.tab import LabelTab
from gui.tabs.model.tab import ModelTab
from gui.tabs.predict.tab import PredictTab
from gui.tabs.results.tab import ResultsTab
from gui.tabs.training.tab import TrainingTab
from gui.widgets.thumbs import ThumbnailLoader


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Transfer Studio")
        self.settings = settings or QSettings("TransferStudio", "Transfer Studio")
        self.session = Session(self.settings, self)
        self.jobs = self.session.jobs
        self.closing = False
        self.loader = ThumbnailLoader(self)
        s = self.session
        self.tabs = QTabWidget()
        self.dataset_tab = DatasetTab(s, self.loader)
        self.label_tab = LabelTab(s, self.loader)
        self.model_tab = ModelTab(s)
        self.training_tab = TrainingTab(s)
        self.results_tab = ResultsTab(s, self.loader)
        self.predict_tab = PredictTab(s, self.loader)
        for i, (tab, name) in enumerate(
            (
                (self.dataset_tab, "Dataset"),
                (self.label_tab, "Label"),
                (self.model_tab, "Model"),
                (self.training_tab, "Training"),
                (self.results_tab, "Results"),
                (self.predict_tab, "Predict"),
            )
        ):
            self.tabs.addTab(tab, f"{i + 1}  {name}")
        self.setCentralWidget(self.tabs)
        self.status_label = QLabel("")
        self.statusBar().addWidget(self.status_label, 1)
        self.setAcceptDrops(True)
        s.error.connect(self.show_error)
        s.status.connect(self.status_label.setText)
        s.show_tab.connect(self.tabs.setCurrentWidget)
        self._build_menu()
        geo = self.settings.value("window/geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)
        QTimer.singleShot(0, self._start_discovery)

    # What tests, tools and the self-test reach for: the session's jobs and the tabs' own actions.
    @property
    def job(self):
        return self.jobs.job(MAIN)

    @property
    def scan(self):
        return self.jobs.job(SCAN)

    @property
    def discovery(self):
        return self.jobs.job(DISCOVERY)

    @property
    def last_result(self):
        return self.session.last_result

    @property
    def last_error(self) -> str:
        return self.session.last_error

    def busy(self) -> bool:
        return self.session.busy()

    def scan_folder(self, folder: str) -> None:
        """Open ``folder`` as the dataset with the session's split settings."""
        self.dataset_tab.request_scan(folder)

    def start_labelling(self, folder: str) -> None:
        self.label_tab.jobs.start(folder)

    def start_training(self) -> None:
        self.training_tab.start()

    def stop_job(self) -> None:
        self.session.stop()

    def train_config(self, out: str | None = None) -> TrainConfig:
        return self.session.train_config(out)

    def apply_config(self, cfg: TrainConfig) -> None:
        """Show ``cfg`` in the tabs (its folder is opened if it is not the one loaded)."""
        self.session.apply(cfg)
        ds = self.session.dataset
        if cfg.data and (ds is None or os.path.abspath(ds.root) != os.path.abspath(cfg.data)):
            self.scan_folder(cfg.data)

    def save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.session.save()

    # ------------------------------------------------------------------------------------------------ menus
    def _build_menu(self) -> None:
        fm = self.menuBar().addMenu("&File")
        self.open_act = QAction(
            "&Open image folder…", self, shortcut=QKeySequence.Open, triggered=self.dataset_tab.choose_folder
        )
        self.open_run_act = QAction(
            "Open &run…", self, shortcut=QKeySequence("Ctrl+Shift+O"), triggered=self._choose_run
        )
        quit_act = QAction("&Quit", self, shortcut=QKeySequence.Quit, triggered=self.close)
        for a in (self.open_act, self.open_run_act, quit_act):
            fm.addAction(a)
        tm = self.menuBar().addMenu("&Train")
        self.start_act = QAction(
            "&Start training", self, shortcut=QKeySequence("Ctrl+R"), triggered=self.start_training
        )
        self.stop_act = QAction("S&top", self, shortcut=QKeySequence("Ctrl+."), triggered=self.stop_job)
        tm.addAction(self.start_act)
        tm.addAction(self.stop_act)
        tm.addSeparator()
        self.cache_act = QAction("Embedding &cache…", self, triggered=self.manage_embedding_cache)
        tm.addAction(self.cache_act)

    def manage_embedding_cache(self) -> int | None:
        """Say what the embedding cache holds and offer to delete it; returns the bytes freed (None: kept)."""
        return manage_embedding_cache(self, self.busy())

    def _choose_run(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Open a saved run folder", self.session.runs_dir)
        if d:
            self.open_run(d)

    def open_run(self, run_dir: str) -> bool:
        try:
            self.results_tab.open_run(run_dir)
        except EngineError as exc:
            self.show_error(f"Cannot open this run: {exc}")
            return False
        self.tabs.setCurrentWidget(self.results_tab)
        return True

    # ------------------------------------------------------------------------------------------------ helpers
    def show_error(self, message: str, details: str = "") -> None:
        """A clear message that does not block the app (the session records it for tests)."""
        self.session.last_error = message
        self.status_label.setText(message)
        box = QMessageBox(QMessageBox.Warning, "Transfer Studio", message, QMessageBox.Ok, self)
        if details:
            box.setDetailedText(details)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.open()

    def confirm(self, title: str, text: str) -> bool:
        return QMessageBox.question(self, title, text) == QMessageBox.Yes

    def _start_discovery(self) -> None:
        if not self.closing:
            self.jobs.start(DISCOVERY, discover, done=self._discovered, failed=self._discovery_failed)

    def _discovery_failed(self, message: str, details: str) -> None:
        self.model_tab.loading.setText(f"Backbones: {message}")

    def _discovered(self, result) -> None:
        backbones, devices = result
        self.model_tab.set_backbones(backbones)
        self.training_tab.form.set_devices(devices)

    # ------------------------------------------------------------------------------------------------ drops
    def _predicting_drops(self) -> bool:
        """Drops go to prediction on the Predict tab once a model is loaded; elsewhere a folder opens as a dataset."""
        return self.tabs.currentWidget() is self.predict_tab and bool(self.predict_tab.run_dir)

    def dragEnterEvent(self, e) -> None:
        paths = [u.toLocalFile() for u in e.mimeData().urls()] if e.mimeData().hasUrls() else []
        if any(os.path.isdir(p) for p in paths) or (self._predicting_drops() and any(os.path.isfile(p) for p in paths)):
            e.acceptProposedAction()

    def dropEvent(self, e) -> None:
        self.drop_paths([u.toLocalFile() for u in e.mimeData().urls() if u.isLocalFile()])

    def drop_paths(self, paths: list[str]) -> None:
        """Photos or folders dropped on the window: predicted on the Predict tab (any mix, in that order), otherwise
        the first folder opens as the dataset."""
        paths = [p for p in paths if os.path.exists(p)]
        if self._predicting_drops() and paths:
            self.predict_tab.set_paths(paths)
            self.predict_tab.request_prediction(paths)
            return
        folder = next((p for p in paths if os.path.isdir(p)), None)
        if folder:
            self.scan_folder(folder)

    # ------------------------------------------------------------------------------------------------ closing
    def closeEvent(self, e) -> None:
        if self.busy():
            if not self.confirm(
                "A job is running",
                "Training or prediction is still running. Stop it and quit? The best epoch so far is saved.",
            ):
                e.ignore()
                return
            self.stop_job()
            deadline = time.monotonic() + 60
            while self.busy() and time.monotonic() < deadline:
                QApplication.processEvents()
                self.job.wait(50)
        self.closing = True
        background = self.jobs.running()
        if background:
            self.hide()  # gone at once; the start-up import of torch cannot be interrupted (a few seconds)
        for j in background:
            j.cancel()
            j.wait(30000)
        self.loader.shutdown()
        self.label_tab.saver.flush()  # every label handed over is on disk before the app goes
        self.save_settings()
        e.accept()
