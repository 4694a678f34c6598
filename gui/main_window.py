"""Main window: owns the tabs and the background jobs, and persists settings. No training logic here."""
from __future__ import annotations

import os
import shlex
import sys
import time

from PySide6.QtCore import QByteArray, QElapsedTimer, QObject, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QApplication, QFileDialog, QLabel, QMainWindow, QMessageBox, QTabWidget)

from engine.events import EngineError
from engine.runs import default_runs_dir, new_run_name
from gui.tabs.dataset_tab import DatasetTab, scan_job
from gui.tabs.model_tab import ModelTab
from gui.tabs.predict_tab import PredictTab
from gui.tabs.results_tab import ResultsTab
from gui.tabs.training_tab import TrainingTab
from gui.thumbs import ThumbnailLoader
from gui.worker import Job, start_job


def discover(callbacks=None, cancel=None):
    """Backbones and devices (imports torch: runs in the background so the window appears at once).

    The imports leave ~365,000 objects that Python's cyclic garbage collector would walk on every full collection:
    225-280 ms with the GIL held, in whichever thread triggered it (measured: gen-2 collections of 72-240 ms during
    these imports and of 248 ms in the GUI thread around a feature-extraction job). So the collector is off while
    importing, and what the imports left is then frozen (``gc.freeze``: never walked again, still freed when unused).
    """
    import gc

    gc.disable()
    try:
        return _discover()
    finally:
        gc.freeze()
        gc.enable()


def _discover():
    import torch

    from engine.backbones import list_backbones

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append((f"GPU {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(("Apple GPU (MPS)", "mps"))
    devices.append((f"CPU ({os.cpu_count()} cores)", "cpu"))
    backbones = list_backbones()
    # torch.optim imports torch._dynamo (and sympy) on its first step: ~2 s of imports that hold the GIL in long
    # stretches and stalled the GUI by ~120 ms at the start of every first training. Pay it here, at start-up.
    import torch._dynamo  # noqa: F401

    return backbones, devices


class StallMeter(QObject):
    """A 10 ms timer that records the longest gap between its ticks: how long the event loop was blocked."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.timer = QTimer(self)
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.clock = QElapsedTimer()
        self.worst_ms = 0.0

    def start(self) -> None:
        self.worst_ms = 0.0
        self.clock.start()
        self.timer.start()

    def stop(self) -> float:
        self.timer.stop()
        return self.worst_ms

    def _tick(self) -> None:
        gap = self.clock.restart()
        self.worst_ms = max(self.worst_ms, max(0.0, gap - 10.0))


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        # The worker thread runs Python between PyTorch calls; each PySide call from the GUI thread releases the
        # GIL and may wait a whole switch interval to get it back. 1 ms (default 5) keeps repaints short.
        sys.setswitchinterval(0.001)
        self.setWindowTitle("Transfer Studio")
        self.settings = settings or QSettings("TransferStudio", "Transfer Studio")
        self.job: Job | None = None  # training, prediction or export: one at a time
        self.scan: Job | None = None
        self.discovery: Job | None = None
        self.last_error = ""
        self.last_result = None
        self.closing = False
        self.stall = StallMeter(self)
        self.loader = ThumbnailLoader(self)

        self.tabs = QTabWidget()
        self.dataset_tab = DatasetTab(self.loader)
        self.model_tab = ModelTab()
        self.training_tab = TrainingTab()
        self.results_tab = ResultsTab(self.loader)
        self.predict_tab = PredictTab(self.loader)
        self.tabs.addTab(self.dataset_tab, "1  Dataset")
        self.tabs.addTab(self.model_tab, "2  Model")
        self.tabs.addTab(self.training_tab, "3  Training")
        self.tabs.addTab(self.results_tab, "4  Results")
        self.tabs.addTab(self.predict_tab, "5  Predict")
        self.setCentralWidget(self.tabs)
        self.status_label = QLabel("")
        self.statusBar().addWidget(self.status_label, 1)
        self.setAcceptDrops(True)

        self.dataset_tab.scan_requested.connect(self.scan_folder)
        self.training_tab.start_requested.connect(self.start_training)
        self.training_tab.stop_requested.connect(self.stop_job)
        self.training_tab.copy_command_requested.connect(self.copy_command)
        self.training_tab.copy_cluster_requested.connect(self.copy_cluster_command)
        self.predict_tab.start_requested.connect(self.start_prediction)
        self.predict_tab.stop_requested.connect(self.stop_job)
        self.predict_tab.export_model_requested.connect(self.export_model)
        self.results_tab.run_opened.connect(self._run_opened)
        self._build_menu()
        self._restore_settings()
        QTimer.singleShot(0, self._start_discovery)

    # ------------------------------------------------------------------------------------------------ menus
    def _build_menu(self) -> None:
        fm = self.menuBar().addMenu("&File")
        self.open_act = QAction("&Open image folder…", self, shortcut=QKeySequence.Open,
                                triggered=self.dataset_tab.choose_folder)
        self.open_run_act = QAction("Open &run…", self, shortcut=QKeySequence("Ctrl+Shift+O"),
                                    triggered=self._choose_run)
        quit_act = QAction("&Quit", self, shortcut=QKeySequence.Quit, triggered=self.close)
        for a in (self.open_act, self.open_run_act, quit_act):
            fm.addAction(a)
        tm = self.menuBar().addMenu("&Train")
        self.start_act = QAction("&Start training", self, shortcut=QKeySequence("Ctrl+R"),
                                 triggered=self.start_training)
        self.stop_act = QAction("S&top", self, shortcut=QKeySequence("Ctrl+."), triggered=self.stop_job)
        tm.addAction(self.start_act)
        tm.addAction(self.stop_act)
        tm.addSeparator()
        self.cache_act = QAction("Embedding &cache…", self, triggered=self.manage_embedding_cache)
        tm.addAction(self.cache_act)

    # ------------------------------------------------------------------------------------------------ settings
    def _restore_settings(self) -> None:
        s = self.settings
        geo = s.value("window/geometry")
        if isinstance(geo, QByteArray) and not geo.isEmpty():
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)
        recent = s.value("data/recent", []) or []
        if isinstance(recent, str):
            recent = [recent]
        self.recent = [r for r in recent if isinstance(r, str)][:10]
        self.dataset_tab.set_recent(self.recent)
        self.dataset_tab.val_pct.setValue(float(s.value("data/val_pct", 20)))
        self.dataset_tab.test_pct.setValue(float(s.value("data/test_pct", 0)))
        self.dataset_tab.seed.setValue(int(s.value("data/seed", 0)))
        t = self.training_tab
        t.epochs.setValue(int(s.value("train/epochs", 0)))
        t.batch.setValue(int(s.value("train/batch", 0)))
        t.lr.setValue(float(s.value("train/lr", 0.0)))
        t.augment.setChecked(str(s.value("train/augment", "true")).lower() == "true")
        t.patience.setValue(int(s.value("train/patience", 0)))
        t.runs_dir.setText(str(s.value("train/runs_dir", default_runs_dir())))
        self.model_tab.set_mode(str(s.value("model/mode", "feature-extraction")))
        self.model_tab.unfreeze.setValue(int(s.value("model/unfreeze", 2)))
        self.results_tab.set_runs_dir(t.runs_dir.text())

    def save_settings(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("data/recent", self.recent)
        s.setValue("data/val_pct", self.dataset_tab.val_pct.value())
        s.setValue("data/test_pct", self.dataset_tab.test_pct.value())
        s.setValue("data/seed", self.dataset_tab.seed.value())
        t = self.training_tab
        s.setValue("train/epochs", t.epochs.value())
        s.setValue("train/batch", t.batch.value())
        s.setValue("train/lr", t.lr.value())
        s.setValue("train/augment", "true" if t.augment.isChecked() else "false")
        s.setValue("train/patience", t.patience.value())
        s.setValue("train/runs_dir", t.runs_dir.text())
        s.setValue("model/mode", self.model_tab.mode())
        s.setValue("model/backbone", self.model_tab.backbone())
        s.setValue("model/unfreeze", self.model_tab.unfreeze.value())
        s.sync()  # QSettings writes its file via a temporary file and rename

    def manage_embedding_cache(self) -> int | None:
        """Say what the embedding cache holds and offer to delete it; returns the bytes freed (None: kept)."""
        from engine.features import cache_contents, clear_cache, default_cache_dir

        folder = default_cache_dir()
        entries = cache_contents(folder)
        if not entries:
            QMessageBox.information(self, "Embedding cache", f"The embedding cache in {folder} is empty.")
            return None
        images = sum(e["images"] or 0 for e in entries)
        mb = sum(e["bytes"] for e in entries) / 1e6
        if self.busy():
            self.show_error("A job is running: stop it before deleting the embedding cache.")
            return None
        if not self.confirm("Embedding cache",
                            f"{folder} holds the features of {images} image(s) for {len(entries)} backbone "
                            f"setting(s): {mb:.1f} MB. Feature extraction reuses them to skip the backbone on "
                            "images it has seen. Delete them? (Runs are not touched; the next run embeds its "
                            "images again.)"):
            return None
        freed = clear_cache(folder)
        self.status_label.setText(f"Deleted {freed / 1e6:.1f} MB of cached embeddings")
        return freed

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

    def busy(self) -> bool:
        return self.job is not None and self.job.is_running()

    def _start_discovery(self) -> None:
        if self.closing:
            return
        self.discovery = start_job(self, discover)
        self.discovery.worker.finished.connect(self._discovered)
        self.discovery.worker.failed.connect(self._discovery_failed)
        self.discovery.start()

    def _discovery_failed(self, message: str, details: str) -> None:
        self.model_tab.loading.setText(f"Backbones: {message}")

    def _discovered(self, result) -> None:
        backbones, devices = result
        self.model_tab.set_backbones(backbones)
        want = str(self.settings.value("model/backbone", ""))
        if want:
            self.model_tab.select_backbone(want)
        self.training_tab.set_devices(devices)

    # ------------------------------------------------------------------------------------------------ dataset
    def scan_folder(self, folder: str) -> None:
        if not folder:
            return
        if self.scan is not None and self.scan.is_running():
            self.scan.cancel()
            self.scan.wait(5000)
        self.dataset_tab.scan_started(folder)
        self.tabs.setCurrentWidget(self.dataset_tab)
        val, test, seed = self.dataset_tab.split_settings()
        job = start_job(self, scan_job, folder, val, test, seed)
        job.worker.progress.connect(self.dataset_tab.scan_progress_update)
        job.worker.finished.connect(self._scanned)
        job.worker.failed.connect(self._scan_failed)
        self.scan = job
        job.start()
        self.recent = [folder] + [r for r in self.recent if r != folder][:9]
        self.dataset_tab.set_recent(self.recent)

    def _scan_failed(self, message: str, details: str) -> None:
        self.dataset_tab.scan_failed(message)
        self.show_error(message, details)

    def _scanned(self, ds) -> None:
        self.dataset_tab.show_dataset(ds)
        self.model_tab.recommend(ds)
        self.status_label.setText(f"{len(ds.samples)} images, {len(ds.classes)} classes")

    def _predicting_drops(self) -> bool:
        """Drops go to prediction on the Predict tab once a model is loaded; elsewhere a folder opens as a dataset."""
        return self.tabs.currentWidget() is self.predict_tab and bool(self.predict_tab.run_dir)

    def dragEnterEvent(self, e) -> None:  # noqa: N802
        paths = [u.toLocalFile() for u in e.mimeData().urls()] if e.mimeData().hasUrls() else []
        if any(os.path.isdir(p) for p in paths) or (self._predicting_drops() and any(os.path.isfile(p) for p in paths)):
            e.acceptProposedAction()

    def dropEvent(self, e) -> None:  # noqa: N802
        self.drop_paths([u.toLocalFile() for u in e.mimeData().urls() if u.isLocalFile()])

    def drop_paths(self, paths: list[str]) -> None:
        """Photos or folders dropped on the window: predicted on the Predict tab (any mix, in that order), otherwise
        the first folder opens as the dataset."""
        paths = [p for p in paths if os.path.exists(p)]
        if self._predicting_drops() and paths:
            self.predict_tab.set_paths(paths)
            self.start_prediction(paths, self.predict_tab.top_k.value())
            return
        folder = next((p for p in paths if os.path.isdir(p)), None)
        if folder:
            self.scan_folder(folder)

    # ------------------------------------------------------------------------------------------------ training
    def train_config(self):
        from engine.train import TrainConfig

        ds = self.dataset_tab.dataset
        val, test, seed = self.dataset_tab.split_settings()
        t = self.training_tab.values()
        backbone = self.model_tab.backbone()
        mode = self.model_tab.mode()
        out = os.path.join(self.training_tab.runs_dir.text() or default_runs_dir(), new_run_name(backbone, mode))
        return TrainConfig(data=ds.root if ds else "", out=out, mode=mode, backbone=backbone,
                           weights=self.model_tab.weights_file(), download=self.model_tab.download.isChecked(),
                           unfreeze=self.model_tab.unfreeze_value(), val_split=val, test_split=test, seed=seed,
                           **t)

    def start_training(self) -> None:
        if self.busy():
            return
        if self.scan is not None and self.scan.is_running():
            # (the previous folder is still loaded: training it now is not what the user asked for)
            self.show_error(f"{self.dataset_tab.folder} is still being scanned: start training when its classes "
                            "are listed in the Dataset tab.")
            return
        if self.dataset_tab.dataset is None:
            self.show_error("Open an image folder first (Dataset tab, or Ctrl+O).")
            return
        from engine.train import fit

        cfg = self.train_config()
        self.save_settings()
        self.tabs.setCurrentWidget(self.training_tab)
        self.training_tab.job_started()
        job = start_job(self, fit, cfg)
        w = job.worker
        w.log.connect(self.training_tab.add_log)
        w.progress.connect(self.training_tab.on_progress)
        w.batch.connect(self.training_tab.on_batch)
        w.epoch.connect(self.training_tab.on_epoch)
        w.finished.connect(self._training_finished)
        w.failed.connect(self._job_failed)
        self.job = job
        self.stall.start()
        job.start()

    def _training_finished(self, res) -> None:
        self.last_result = res
        worst = self.stall.stop()
        self.status_label.setText(f"Worst GUI stall during the job: {worst:.0f} ms")
        if res.run_dir is None:
            self.training_tab.job_ended(res.message or "Stopped; nothing was saved.")
            self.training_tab.add_log(res.message)
            return
        text = ("Stopped early: the best epoch so far was saved. " if res.cancelled else "Done. ") + res.message
        self.training_tab.job_ended(text)
        self.training_tab.summary.setText(f"<b>{res.message}</b><br>Saved to {res.run_dir}")
        self.results_tab.refresh_runs()
        try:
            self.results_tab.open_run(res.run_dir)
        except EngineError as exc:
            self.show_error(str(exc))

    def _job_failed(self, message: str, details: str) -> None:
        self.stall.stop()
        self.training_tab.job_ended("Failed: " + message)
        self.training_tab.add_log("Error: " + message)
        self.predict_tab.job_ended("Failed: " + message)
        self.show_error(message, details)

    def stop_job(self) -> None:
        if self.busy():
            self.job.cancel()
            self.training_tab.phase.setText("Stopping after this batch…")

    def copy_cluster_command(self) -> None:
        self.copy_command(cluster=True)

    def copy_command(self, cluster: bool = False) -> str:
        """Put the CLI command for the current settings on the clipboard; ``cluster``: the torchrun form for a
        multi-GPU machine (one process per GPU; add --nnodes/--rdzv-endpoint for several machines)."""
        cfg = self.train_config()
        launcher = (["torchrun", "--nproc_per_node=gpu", "-m", "engine"] if cluster
                    else [sys.executable, "-m", "engine"])
        args = [*launcher, "train", cfg.data or "DATA", "--mode", cfg.mode, "--backbone",
                cfg.backbone, "--val-split", str(cfg.val_split), "--test-split", str(cfg.test_split), "--seed",
                str(cfg.seed), "--out", cfg.out]
        for flag, v in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--lr", cfg.lr),
                        ("--patience", cfg.patience), ("--weights", cfg.weights)):
            if v is not None:
                args += [flag, str(v)]
        if cfg.mode == "fine-tuning":
            args += ["--unfreeze", str(cfg.unfreeze)]
        if not cfg.augment:
            args.append("--no-augment")
        if cluster:
            args += ["--device", "cuda"]
        elif cfg.device != "auto":
            args += ["--device", cfg.device]
        cmd = shlex.join(args)
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
    def start_prediction(self, folder: str | list[str], top_k: int) -> None:
        """Predict a folder or an image file, or a list of them (the Predict tab's field, or items dropped)."""
        if self.busy():
            self.show_error("Another job is running: stop it or wait for it to finish.")
            return
        paths = [folder] if isinstance(folder, str) else list(folder)
        if not paths or not all(p and os.path.exists(p) for p in paths):
            self.show_error("Choose a folder of images, type the path of one image, or drop photos here to classify.")
            return
        from engine.predict import predict_folder

        self.predict_tab.job_started(top_k)
        job = start_job(self, predict_folder, self.predict_tab.run_dir, paths, None, top_k,
                        self.training_tab.values()["device"])
        w = job.worker
        w.progress.connect(self.predict_tab.on_progress)
        w.predictions.connect(self.predict_tab.add_rows)
        w.finished.connect(self._prediction_finished)
        w.failed.connect(self._job_failed)
        self.job = job
        self.stall.start()
        job.start()

    def _prediction_finished(self, res) -> None:
        self.last_result = res
        worst = self.stall.stop()
        self.status_label.setText(f"Worst GUI stall during the job: {worst:.0f} ms")
        if res.cancelled:
            self.predict_tab.job_ended(f"Stopped after {len(res.rows)} files.")
        else:
            self.predict_tab.job_ended(f"{len(res.rows)} files in {res.seconds:.1f} s"
                                       + (f", {res.n_errors} unreadable" if res.n_errors else "")
                                       + ". Export CSV… saves exactly these rows.")

    def export_model(self, fmt: str, path: str) -> None:
        if self.busy():
            self.show_error("Another job is running: stop it or wait for it to finish.")
            return
        from engine.export import export_model

        def job_fn(run_dir, fmt, out, callbacks=None, cancel=None):
            return export_model(run_dir, fmt, out)

        job = start_job(self, job_fn, self.predict_tab.run_dir, fmt, path)
        job.worker.finished.connect(self._exported)
        job.worker.failed.connect(self._job_failed)
        self.job = job
        job.start()

    def _exported(self, result: dict) -> None:
        self.predict_tab.job_ended(f"Exported {result['model']} (+ .json)")

    # ------------------------------------------------------------------------------------------------ closing
    def closeEvent(self, e) -> None:  # noqa: N802
        if self.busy():
            if not self.confirm("A job is running", "Training or prediction is still running. Stop it and quit? "
                                "The best epoch so far is saved."):
                e.ignore()
                return
            self.job.cancel()
            self.training_tab.phase.setText("Stopping…")
            deadline = time.monotonic() + 60
            while self.job.is_running() and time.monotonic() < deadline:
                QApplication.processEvents()
                self.job.wait(50)
        self.closing = True
        background = [j for j in (self.scan, self.discovery) if j is not None and j.is_running()]
        if background:
            self.hide()  # gone at once; the start-up import of torch cannot be interrupted (a few seconds)
        for j in background:
            j.cancel()
            j.wait(30000)
        self.loader.shutdown()
        self.save_settings()
        e.accept()
