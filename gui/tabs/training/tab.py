"""Training tab: hyperparameters, Start/Stop, progress with phase/rate/ETA, live plots, log."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.config import to_argv
from engine.events import BatchMetrics, EpochMetrics, Progress
from engine.train.fit import fit
from gui.session.state import Session
from gui.tabs.training.plots import LivePlots
from gui.tabs.training.settings_form import SettingsForm


class TrainingTab(QWidget):
    """How to train (its settings bound to the session: settings_form.py), Start/Stop, progress, plots and log; it
    runs the training job itself through the session."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        root = QHBoxLayout(self)
        side = QVBoxLayout()
        self.form = SettingsForm(session)
        side.addWidget(self.form)
        btns = QHBoxLayout()
        self.start_btn = QPushButton("Start training")
        self.start_btn.setToolTip("Ctrl+R")
        self.start_btn.setStyleSheet("font-weight: bold; padding: 6px;")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setToolTip("Ctrl+. — stops within a second and keeps the best epoch so far")
        self.stop_btn.setEnabled(False)
        self.start_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(session.stop)
        btns.addWidget(self.start_btn)
        btns.addWidget(self.stop_btn)
        side.addLayout(btns)
        self.copy_btn = QPushButton("Copy command line")
        self.copy_btn.setToolTip(
            "The `python -m engine train …` command for these settings, to run the same job "
            "on another machine or in a script"
        )
        self.copy_btn.clicked.connect(lambda: self.copy_command())
        self.cluster_btn = QPushButton("Copy command for a cluster")
        self.cluster_btn.setToolTip(
            "The same job as a `torchrun` command: one process per GPU on a multi-GPU machine (see README, Scaling out)"
        )
        self.cluster_btn.clicked.connect(lambda: self.copy_command(cluster=True))
        cb = QHBoxLayout()
        cb.addWidget(self.copy_btn)
        cb.addWidget(self.cluster_btn)
        side.addLayout(cb)
        self.phase = QLabel("Ready.")
        self.phase.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.rate = QLabel("")
        side.addWidget(self.phase)
        side.addWidget(self.progress)
        side.addWidget(self.rate)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setStyleSheet("font-size: 13px;")
        side.addWidget(self.summary)
        side.addStretch(1)
        sw = QWidget()
        sw.setLayout(side)
        sw.setMaximumWidth(360)
        root.addWidget(sw)

        split = QSplitter(Qt.Vertical)
        self.plots = LivePlots()
        split.addWidget(self.plots)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setFont(QFont("monospace", 9))
        split.addWidget(self.log)
        split.setSizes([430, 200])
        root.addWidget(split, 1)
        self.t_start = 0.0
        session.busy_changed.connect(lambda busy: self.start_btn.setEnabled(not busy and not self.running))
        self.running = False

    # ------------------------------------------------------------------------------------------------ the job
    def start(self) -> None:
        """Start training the open folder with the session's settings (refused while a scan or another job runs)."""
        s = self.session
        if s.busy():
            return
        if s.scanning:
            # (the previous folder is still loaded: training it now is not what the user asked for)
            s.fail("A folder is still being scanned: start training when its classes are listed in the Dataset tab.")
            return
        if s.dataset is None:
            s.fail("Open an image folder first (Dataset tab, or Ctrl+O).")
            return
        cfg = s.train_config()
        s.save()
        s.show_tab.emit(self)
        self.job_started()
        s.start_main(
            fit, cfg, dataset=s.dataset, done=self._finished, failed=self._failed, stopping=self.stopping,
            on_log=self.add_log, on_progress=self.on_progress, on_batch=self.on_batch, on_epoch=self.on_epoch,
        )  # fmt: skip

    def _finished(self, res) -> None:
        self.session.finished(res)
        self.training_finished(res)
        if res.run_dir:
            self.session.trained.emit(res)

    def _failed(self, message: str, details: str) -> None:
        self.job_failed(message)
        self.session.fail(message, details)

    def copy_command(self, cluster: bool = False) -> str:
        """Put the CLI command for the current settings on the clipboard; ``cluster``: the torchrun form for a
        multi-GPU machine (one process per GPU; add --nnodes/--rdzv-endpoint for several machines)."""
        cfg = self.session.train_config()
        if cluster:
            cfg = dataclasses.replace(cfg, device="cuda")
        if not cfg.data:
            cfg = dataclasses.replace(cfg, data="DATA")
        launcher = ["torchrun", "--nproc_per_node=gpu", "-m", "engine"] if cluster else [sys.executable, "-m", "engine"]
        cmd = shlex.join([*launcher, "train", *to_argv(cfg)])
        QApplication.clipboard().setText(cmd)
        self.add_log("Copied: " + cmd)
        return cmd

    # ------------------------------------------------------------------------------------------- job display
    def job_started(self) -> None:
        self.t_start = time.perf_counter()
        self.running = True
        self.plots.clear()
        self.summary.setText("")
        self.start_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.phase.setText("Starting…")
        self.progress.setRange(0, 0)

    def job_ended(self, text: str) -> None:
        self.running = False
        self.start_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.phase.setText(text)
        self.rate.setText(f"{time.perf_counter() - self.t_start:.1f} s in all")

    def stopping(self) -> None:
        self.phase.setText("Stopping after this batch…")

    def job_failed(self, message: str) -> None:
        self.job_ended("Failed: " + message)
        self.add_log("Error: " + message)

    def training_finished(self, res) -> None:
        """A FitResult: saved (completed, or stopped with its best epoch) or nothing saved."""
        if res.run_dir is None:
            self.job_ended(res.message or "Stopped; nothing was saved.")
            self.add_log(res.message)
            return
        self.job_ended(
            ("Stopped early: the best epoch so far was saved. " if res.cancelled else "Done. ") + res.message
        )
        self.summary.setText(f"<b>{res.message}</b><br>Saved to {res.run_dir}")

    def add_log(self, text: str) -> None:
        self.log.appendPlainText(f"[{time.perf_counter() - self.t_start:6.1f}s] {text}" if self.t_start else text)

    def on_progress(self, p: Progress) -> None:
        self.phase.setText(f"{p.phase.capitalize()}" + (f" ({p.message})" if p.message else "") + "…")
        if p.total:
            self.progress.setRange(0, p.total)
            self.progress.setValue(p.done)
        else:
            self.progress.setRange(0, 0)
        if p.images_per_s:
            self.rate.setText(f"{p.images_per_s:.1f} images/s" + (f", ETA {p.eta_s:.0f} s" if p.eta_s else ""))

    def on_batch(self, m: BatchMetrics) -> None:
        self.plots.add_batch(m)
        self.phase.setText(f"Training: epoch {m.epoch}, step {m.step}/{m.steps}")
        self.progress.setRange(0, m.steps)
        self.progress.setValue(m.step)
        if m.images_per_s:
            self.rate.setText(f"{m.images_per_s:.1f} images/s, ETA {m.eta_s:.0f} s")

    def on_epoch(self, m: EpochMetrics) -> None:
        self.plots.add_epoch(m)
        if m.label:
            self.phase.setText(f"Training the head: {m.label}")
        elif m.many_cheap_epochs:
            self.phase.setText(f"Training the head: epoch {m.epoch} (stops early when validation loss stalls)")
        acc = f"{m.val_accuracy:.3f}" if m.val_accuracy == m.val_accuracy else "n/a"
        if m.label:
            self.add_log(
                f"head, {m.label}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}, out-of-fold loss "
                f"{m.val_loss:.4f} acc {acc}{' (best so far)' if m.is_best else ''}"
            )
        elif m.worth_logging:
            self.add_log(
                f"epoch {m.epoch}/{m.epochs}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}, "
                f"val loss {m.val_loss:.4f} acc {acc}{' (best so far)' if m.is_best else ''}"
            )
