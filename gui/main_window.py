"""Main window: the tabs, the menus, and the routing between the tabs' requests and the engine's jobs.

Tabs own their widgets and settings and ask for work with typed requests (a ScanConfig, a PredictConfig, ...);
the window turns a request into a job through the :class:`JobController` and sends the job's end back to the tab
that asked. No training logic here.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QApplication, QFileDialog, QLabel, QMainWindow, QMessageBox, QTabWidget

from engine.config import ExportConfig, PredictConfig, ScanConfig, TrainConfig, to_argv
from engine.data.folder import is_image_name
from engine.data.labels import list_images, open_dataset
from engine.events import EngineError
from engine.paths import default_runs_dir
from engine.predict.export import export_model
from engine.predict.heatmap import HeatmapConfig, heatmap
from engine.predict.predictions import predict_folder
from engine.predict.sorting import SortConfig, sort_into
from engine.runs import new_run_name
from engine.train.fit import fit
from gui.cache_dialog import manage_embedding_cache
from gui.jobs.controller import DISCOVERY, HEATMAP, MAIN, SCAN, JobController
from gui.jobs.discovery import discover
from gui.tabs.dataset.doctor_controller import DatasetChecks
from gui.tabs.dataset.tab import DatasetTab
from gui.tabs.label.controller import Labelling
from gui.tabs.label.tab import LabelTab
from gui.tabs.model.tab import ModelTab
from gui.tabs.predict.tab import PredictTab
from gui.tabs.results.heatmap_view import HeatmapDialog
from gui.tabs.results.tab import ResultsTab
from gui.tabs.training.tab import TrainingTab
from gui.widgets.thumbs import ThumbnailLoader


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Transfer Studio")
        self.settings = settings or QSettings("TransferStudio", "Transfer Studio")
        self.jobs = JobController(self)
        self.main_owner = None  # the tab whose job runs in the main lane (told when it is being stopped)
        self.last_error = ""
        self.last_result = None
        self.closing = False
        self.loader = ThumbnailLoader(self)

        self.tabs = QTabWidget()
        self.dataset_tab = DatasetTab(self.loader)
        self.label_tab = LabelTab(self.loader)
        self.model_tab = ModelTab()
        self.training_tab = TrainingTab()
        self.results_tab = ResultsTab(self.loader)
        self.predict_tab = PredictTab(self.loader)
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

        self.dataset_tab.scan_requested.connect(self.start_scan)
        self.checks = DatasetChecks(self)
        self.dataset_tab.doctor_requested.connect(self.checks.start)
        self.dataset_tab.stop_requested.connect(self.stop_job)
        self.training_tab.start_requested.connect(self.start_training)
        self.training_tab.stop_requested.connect(self.stop_job)
        self.training_tab.copy_command_requested.connect(self.copy_command)
        self.training_tab.copy_cluster_requested.connect(self.copy_cluster_command)
        self.predict_tab.predict_requested.connect(self.start_prediction)
        self.predict_tab.stop_requested.connect(self.stop_job)
        self.predict_tab.export_requested.connect(self.export_model)
        self.predict_tab.sort_requested.connect(self.sort_predictions)
        self.labelling = Labelling(self)  # the Label tab's jobs
        self.results_tab.run_opened.connect(self._run_opened)
        self.results_tab.heatmap_requested.connect(self.show_heatmap)
        self.predict_tab.heatmap_requested.connect(self.show_heatmap)
        self.heatmap_dialog: HeatmapDialog | None = None
        self._build_menu()
        self._restore_settings()
        QTimer.singleShot(0, self._start_discovery)

    # The jobs in each lane (tests and tools wait on them).
    @property
    def job(self):
        return self.jobs.job(MAIN)

    @property
    def scan(self):
        return self.jobs.job(SCAN)

    @property
    def discovery(self):
        return self.jobs.job(DISCOVERY)

    def busy(self) -> bool:
        return self.jobs.busy(MAIN)

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

    # ------------------------------------------------------------------------------------------------ settings
    def _restore_settings(self) -> None:
        geo = self.settings.value("window/geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)
        for tab in (self.dataset_tab, self.model_tab, self.training_tab):
            tab.restore_settings(self.settings)
        self.results_tab.set_runs_dir(self.training_tab.runs_dir.text())

    def save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        for tab in (self.dataset_tab, self.model_tab, self.training_tab):
            tab.save_settings(self.settings)
        self.settings.sync()  # QSettings writes its file via a temporary file and rename

    def manage_embedding_cache(self) -> int | None:
        """Say what the embedding cache holds and offer to delete it; returns the bytes freed (None: kept)."""
        return manage_embedding_cache(self, self.busy())

    # ------------------------------------------------------------------------------------------------ helpers
    def show_error(self, message: str, details: str = "") -> None:
        """A clear message that does not block the app (and is recorded for tests)."""
        self.last_error = message
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
        self.training_tab.set_devices(devices)

    # ------------------------------------------------------------------------------------------------ dataset
    def scan_folder(self, folder: str) -> None:
        """Open ``folder`` as the dataset with the Dataset tab's split settings."""
        self.dataset_tab.request_scan(folder)

    def start_scan(self, cfg: ScanConfig) -> None:
        self.dataset_tab.scan_started(cfg.data)
        self.tabs.setCurrentWidget(self.dataset_tab)
        self.jobs.start(
            SCAN,
            open_dataset,
            cfg,
            done=self._scanned,
            failed=self.scan_failed,
            signals={"progress": self.dataset_tab.scan_progress_update},
        )
        self.dataset_tab.remember(cfg.data)

    def scan_failed(self, message: str, details: str) -> None:
        folder = self.dataset_tab.folder
        from_labels = os.path.abspath(folder) in self.dataset_tab.labels_for if folder else False
        if not self.busy() and not from_labels and self._unsorted(folder, message):
            # No class folders, but images: that is a folder to label, not an error.
            self.dataset_tab.scan_failed(
                f"{folder} has images but no class folders: it is open in the Label tab, which asks you about the "
                "images most worth labelling first."
            )
            self.start_labelling(folder)
            return
        self.dataset_tab.scan_failed(message)
        self.show_error(message, details)

    @staticmethod
    def _unsorted(folder: str, message: str) -> bool:
        """Whether a folder that failed to open as a sorted one is a pile to label: images loose at its top (beside
        at most one folder, as a pile nested by date has), or images but no class folder holding any."""
        if not folder or not os.path.isdir(folder):
            return False
        try:
            loose = any(is_image_name(n) and not n.startswith(".") for n in os.listdir(folder))
            return loose or (message.startswith("No readable images") and bool(list_images(folder)))
        except (OSError, EngineError):
            return False

    def start_labelling(self, folder: str) -> None:
        """Open ``folder`` in the Label tab (gui/tabs/label/controller.py)."""
        self.labelling.start(folder)

    def write_sorted_folder(self, folder: str) -> None:
        self.labelling.write_sorted_folder(folder)

    def _scanned(self, result) -> None:
        self.dataset_tab.scan_finished(result)
        ds = result.dataset
        if ds is not None:
            self.model_tab.recommend(ds)
            self._show_estimate(ds)
            self.status_label.setText(f"{len(ds.samples)} images, {len(ds.classes)} classes")

    def _show_estimate(self, ds) -> None:
        """How long fine-tuning this folder would take here (the automatic mode's budget follows it)."""
        from engine.config import DEFAULTS
        from engine.train.fine_tuning import estimate

        t = self.training_tab.values()
        epochs = t.get("epochs") or DEFAULTS["fine-tuning"]["epochs"]
        est = estimate.estimate_fine_tuning(
            self.model_tab.backbone(),
            t.get("device", "auto"),
            self.model_tab.unfreeze_value(),
            len(ds.split("train")),
            epochs,
        )
        self.model_tab.show_estimate(est.text, est.seconds / 60)

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

    # ------------------------------------------------------------------------------------------------ training
    def train_config(self, out: str | None = None) -> TrainConfig:
        """The training config the tabs describe; ``out`` defaults to a new run folder in the runs folder."""
        values = {**self.dataset_tab.values(), **self.model_tab.values(), **self.training_tab.values()}
        out = out or os.path.join(
            self.training_tab.runs_dir.text() or default_runs_dir(), new_run_name(values["backbone"], values["mode"])
        )
        return TrainConfig(out=out, **values)

    def apply_config(self, cfg: TrainConfig) -> None:
        """Show ``cfg`` in the tabs (its folder is opened if it is not the one loaded)."""
        values = dataclasses.asdict(cfg)
        for tab in (self.dataset_tab, self.model_tab, self.training_tab):
            tab.set_values(values)

    def start_training(self) -> None:
        if self.busy():
            return
        if self.dataset_tab.scanning:
            # (the previous folder is still loaded: training it now is not what the user asked for)
            self.show_error(
                f"{self.dataset_tab.folder} is still being scanned: start training when its classes "
                "are listed in the Dataset tab."
            )
            return
        if self.dataset_tab.dataset is None:
            self.show_error("Open an image folder first (Dataset tab, or Ctrl+O).")
            return
        cfg = self.train_config()
        self.save_settings()
        self.tabs.setCurrentWidget(self.training_tab)
        self.training_tab.job_started()
        t = self.training_tab
        self.start_main(
            t,
            fit,
            cfg,
            dataset=self.dataset_tab.dataset,
            done=self._training_finished,
            failed=self._training_failed,
            signals={"log": t.add_log, "progress": t.on_progress, "batch": t.on_batch, "epoch": t.on_epoch},
        )

    def start_main(self, owner, fn, *args, **kwargs) -> None:
        self.main_owner = owner
        self.jobs.start(MAIN, fn, *args, **kwargs)

    def _training_finished(self, res) -> None:
        self.last_result = res
        self.training_tab.training_finished(res)
        if res.run_dir:
            self.results_tab.refresh_runs()
            self.results_tab.show_result(res)

    def _training_failed(self, message: str, details: str) -> None:
        self.training_tab.job_failed(message)
        self.show_error(message, details)

    def stop_job(self) -> None:
        if self.jobs.cancel(MAIN) and self.main_owner is not None:
            self.main_owner.stopping()

    def copy_cluster_command(self) -> None:
        self.copy_command(cluster=True)

    def copy_command(self, cluster: bool = False) -> str:
        """Put the CLI command for the current settings on the clipboard; ``cluster``: the torchrun form for a
        multi-GPU machine (one process per GPU; add --nnodes/--rdzv-endpoint for several machines)."""
        cfg = self.train_config()
        if cluster:
            cfg = dataclasses.replace(cfg, device="cuda")
        if not cfg.data:
            cfg = dataclasses.replace(cfg, data="DATA")
        launcher = ["torchrun", "--nproc_per_node=gpu", "-m", "engine"] if cluster else [sys.executable, "-m", "engine"]
        cmd = shlex.join([*launcher, "train", *to_argv(cfg)])
        QApplication.clipboard().setText(cmd)
        self.training_tab.add_log("Copied: " + cmd)
        return cmd

    # ------------------------------------------------------------------------------------------------ runs
    def _choose_run(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Open a saved run folder", self.training_tab.runs_dir.text())
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

    def _run_opened(self, run_dir: str) -> None:
        self.predict_tab.set_run(run_dir, self.results_tab.classes)

    # ------------------------------------------------------------------------------------------------ predict
    def start_prediction(self, cfg: PredictConfig) -> None:
        """Predict folders and image files (the Predict tab's field, or items dropped) with the tab's model."""
        if self.busy():
            self.show_error("Another job is running: stop it or wait for it to finish.")
            return
        if not cfg.images or not all(p and os.path.exists(p) for p in cfg.images):
            self.show_error("Choose a folder of images, type the path of one image, or drop photos here to classify.")
            return
        t = self.training_tab.values()
        cfg = dataclasses.replace(cfg, device=t["device"], engine=t["engine"])
        p = self.predict_tab
        p.job_started(cfg.top_k)
        self.start_main(
            p,
            predict_folder,
            cfg,
            done=self._prediction_finished,
            failed=self._predict_failed,
            signals={"progress": p.on_progress, "predictions": p.add_rows},
        )

    def _prediction_finished(self, res) -> None:
        self.last_result = res
        self.predict_tab.prediction_finished(res)

    def _predict_failed(self, message: str, details: str) -> None:
        self.predict_tab.job_failed(message)
        self.show_error(message, details)

    def sort_predictions(self, cfg: SortConfig) -> None:
        if self.busy():
            self.show_error("Another job is running: stop it or wait for it to finish.")
            return
        self.predict_tab.sorting_into = cfg.folder
        self.predict_tab.job_started()
        self.predict_tab.status.setText(f"Sorting into {cfg.folder} …")
        self.start_main(
            self.predict_tab, sort_into, cfg, done=self.predict_tab.sort_finished, failed=self._predict_failed
        )

    def export_model(self, cfg: ExportConfig) -> None:
        if self.busy():
            self.show_error("Another job is running: stop it or wait for it to finish.")
            return
        self.predict_tab.job_started()
        self.start_main(
            self.predict_tab, export_model, cfg, done=self.predict_tab.export_finished, failed=self._predict_failed
        )

    def show_heatmap(self, run_dir: str, path: str) -> None:
        """*Where it looked*: computed in the background (its own lane: training or prediction may be running)."""
        if self.heatmap_dialog is None:
            self.heatmap_dialog = HeatmapDialog(self)
        self.heatmap_dialog.computing(path)
        cfg = HeatmapConfig(run_dir, path, device=self.training_tab.values()["device"])
        self.jobs.start(
            HEATMAP, heatmap, cfg, done=self.heatmap_dialog.show_result, failed=self.heatmap_dialog.show_failure
        )

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
