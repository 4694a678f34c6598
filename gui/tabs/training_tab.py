"""Training tab: hyperparameters, Start/Stop, progress with phase/rate/ETA, live plots, log."""
from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox,
                               QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox,
                               QSplitter, QVBoxLayout, QWidget)
from PySide6.QtCore import Qt

from engine.events import BatchMetrics, EpochMetrics, Progress
from gui.plots import LivePlots


class TrainingTab(QWidget):
    start_requested = Signal()
    stop_requested = Signal()
    copy_command_requested = Signal()
    copy_cluster_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        root = QHBoxLayout(self)
        side = QVBoxLayout()
        hp = QGroupBox("Settings")
        form = QFormLayout(hp)
        self.epochs = QSpinBox(minimum=0, maximum=1000, value=0, specialValueText="auto")
        self.epochs.setToolTip("Passes over the training images. auto: 100 for feature extraction (stops early "
                               "when validation loss stops improving), 5 for fine-tuning")
        self.batch = QSpinBox(minimum=0, maximum=1024, value=0, specialValueText="auto")
        self.batch.setToolTip("Images per step. auto: 64 (feature extraction) / 32 (fine-tuning). Out of GPU "
                              "memory? It is halved automatically")
        self.lr = QDoubleSpinBox(decimals=5, minimum=0.0, maximum=1.0, singleStep=0.0005, value=0.0,
                                 specialValueText="auto")
        self.lr.setToolTip("Learning rate of the new head (the backbone uses a tenth of it). auto: 0.003 / 0.001")
        self.augment = QCheckBox("Random crop and flip")
        self.augment.setChecked(True)
        self.augment.setToolTip("Fine-tuning: show each image slightly differently every epoch (less overfitting)")
        self.patience = QSpinBox(minimum=0, maximum=100, value=0, specialValueText="auto")
        self.patience.setToolTip("Stop when validation loss has not improved for this many epochs; the best epoch "
                                 "is kept either way. auto: 15 / 3")
        self.device = QComboBox()
        self.device.addItem("Auto (GPU if available)", "auto")
        self.device.setToolTip("Where training runs")
        self.runs_dir = QLineEdit()
        self.runs_dir.setToolTip("Every finished run is saved here in its own folder")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_runs)
        rd = QHBoxLayout()
        rd.addWidget(self.runs_dir)
        rd.addWidget(browse)
        form.addRow("Epochs", self.epochs)
        form.addRow("Batch size", self.batch)
        form.addRow("Learning rate", self.lr)
        form.addRow("Augmentation", self.augment)
        form.addRow("Early stopping", self.patience)
        form.addRow("Device", self.device)
        form.addRow("Runs folder", rd)
        side.addWidget(hp)

        btns = QHBoxLayout()
        self.start_btn = QPushButton("Start training")
        self.start_btn.setToolTip("Ctrl+R")
        self.start_btn.setStyleSheet("font-weight: bold; padding: 6px;")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setToolTip("Ctrl+. — stops within a second and keeps the best epoch so far")
        self.stop_btn.setEnabled(False)
        self.start_btn.clicked.connect(self.start_requested)
        self.stop_btn.clicked.connect(self.stop_requested)
        btns.addWidget(self.start_btn)
        btns.addWidget(self.stop_btn)
        side.addLayout(btns)
        self.copy_btn = QPushButton("Copy command line")
        self.copy_btn.setToolTip("The `python -m engine train …` command for these settings, to run the same job "
                                 "on another machine or in a script")
        self.copy_btn.clicked.connect(self.copy_command_requested)
        self.cluster_btn = QPushButton("Copy command for a cluster")
        self.cluster_btn.setToolTip("The same job as a `torchrun` command: one process per GPU on a multi-GPU "
                                    "machine (see README, Scaling out)")
        self.cluster_btn.clicked.connect(self.copy_cluster_requested)
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

    def _browse_runs(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Runs folder", self.runs_dir.text())
        if d:
            self.runs_dir.setText(d)

    def set_devices(self, devices: list[tuple[str, str]]) -> None:
        current = self.device.currentData()
        self.device.clear()
        self.device.addItem("Auto (GPU if available)", "auto")
        for label, value in devices:
            self.device.addItem(label, value)
        i = self.device.findData(current)
        self.device.setCurrentIndex(max(0, i))

    def values(self) -> dict:
        return {"epochs": self.epochs.value() or None, "batch_size": self.batch.value() or None,
                "lr": self.lr.value() or None, "augment": self.augment.isChecked(),
                "patience": self.patience.value() or None, "device": self.device.currentData() or "auto"}

    # ------------------------------------------------------------------------------------------- job display
    def job_started(self) -> None:
        self.t_start = time.perf_counter()
        self.plots.clear()
        self.summary.setText("")
        self.start_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.phase.setText("Starting…")
        self.progress.setRange(0, 0)

    def job_ended(self, text: str) -> None:
        self.start_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.phase.setText(text)
        self.rate.setText(f"{time.perf_counter() - self.t_start:.1f} s in all")

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
        if m.epochs > 20:
            self.phase.setText(f"Training the head: epoch {m.epoch} (stops early when validation loss stalls)")
        acc = f"{m.val_accuracy:.3f}" if m.val_accuracy == m.val_accuracy else "n/a"
        if m.epochs <= 20 or m.epoch % 10 == 0 or m.epoch == 1:
            self.add_log(f"epoch {m.epoch}/{m.epochs}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}, "
                         f"val loss {m.val_loss:.4f} acc {acc}{' (best so far)' if m.is_best else ''}")
