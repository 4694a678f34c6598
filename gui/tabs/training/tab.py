"""Training tab: hyperparameters, Start/Stop, progress with phase/rate/ETA, live plots, log."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.events import BatchMetrics, EpochMetrics, Progress
from engine.paths import default_runs_dir
from gui.settings import load_values, save_values
from gui.tabs.training.plots import LivePlots


class TrainingTab(QWidget):
    """Owns the TrainConfig fields of how to train (epochs ... device, and the advanced ones) and the runs folder."""

    FIELDS = [
        "epochs",
        "batch_size",
        "lr",
        "augment",
        "patience",
        "device",
        "backbone_lr_mult",
        "weight_decay",
        "linear_probe_init",
        "cache",
        "cache_dir",
        "engine",
        "precision",
        "balance",
        "bn_stats",
        "small_images",
        "cross_fit",
        "features",
    ]
    start_requested = Signal()
    stop_requested = Signal()
    copy_command_requested = Signal()
    copy_cluster_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        # Builds the widgets top to bottom, as they appear: one function reads like the layout it makes.
        super().__init__(parent)
        root = QHBoxLayout(self)
        side = QVBoxLayout()
        hp = QGroupBox("Settings")
        form = QFormLayout(hp)
        self.epochs = QSpinBox(minimum=0, maximum=1000, value=0, specialValueText="auto")
        self.epochs.setToolTip(
            "Passes over the training images. auto: 100 for feature extraction (stops early "
            "when validation loss stops improving), 5 for fine-tuning"
        )
        self.batch = QSpinBox(minimum=0, maximum=1024, value=0, specialValueText="auto")
        self.batch.setToolTip(
            "Images per step. auto: 64 (feature extraction) / 32 (fine-tuning). Out of GPU "
            "memory? It is halved automatically"
        )
        self.lr = QDoubleSpinBox(
            decimals=5, minimum=0.0, maximum=1.0, singleStep=0.0005, value=0.0, specialValueText="auto"
        )
        self.lr.setToolTip(
            "Learning rate of the new head (the backbone uses a tenth of it). auto: feature extraction tries 0.003, "
            "0.01 and 0.03 and keeps the one its cross-validated judgements favour; fine-tuning 0.001"
        )
        self.augment = QCheckBox("Mirror images")
        self.augment.setChecked(True)
        self.augment.setToolTip(
            "Fine-tuning: show each image or its mirror image at random (less overfitting); "
            "backbones other than the bundled one also get random crops"
        )
        self.patience = QSpinBox(minimum=0, maximum=100, value=0, specialValueText="auto")
        self.patience.setToolTip(
            "Stop when validation loss has not improved for this many epochs; the best epoch "
            "is kept either way. auto: 15 / 3"
        )
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
        side.addWidget(self._advanced())

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
        self.copy_btn.setToolTip(
            "The `python -m engine train …` command for these settings, to run the same job "
            "on another machine or in a script"
        )
        self.copy_btn.clicked.connect(self.copy_command_requested)
        self.cluster_btn = QPushButton("Copy command for a cluster")
        self.cluster_btn.setToolTip(
            "The same job as a `torchrun` command: one process per GPU on a multi-GPU machine (see README, Scaling out)"
        )
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

    def _advanced(self) -> QGroupBox:
        box = QGroupBox("Advanced")
        box.setCheckable(True)
        box.setChecked(False)
        form = QFormLayout(box)
        self.backbone_lr_mult = QDoubleSpinBox(
            decimals=3, minimum=0.0, maximum=10.0, singleStep=0.05, value=0.0, specialValueText="auto"
        )
        self.backbone_lr_mult.setToolTip(
            "Fine-tuning: the backbone's learning rate is the head's times this. auto: "
            "0.1; 0.3 for small pictures trained at their own size (more stages train)"
        )
        self.weight_decay = QDoubleSpinBox(decimals=6, minimum=0.0, maximum=1.0, singleStep=1e-4, value=1e-4)
        self.weight_decay.setToolTip("AdamW weight decay (both modes)")
        self.linear_probe_init = QCheckBox("Start the head from a linear probe")
        self.linear_probe_init.setChecked(True)
        self.linear_probe_init.setToolTip(
            "Fine-tuning: train the new head on frozen features first (LP-FT), so "
            "the first steps do not disturb the pretrained layers"
        )
        self.cache = QCheckBox("Reuse embeddings between runs")
        self.cache.setChecked(True)
        self.cache.setToolTip("Feature extraction keeps each image's features, so a rerun takes seconds")
        self.cache_dir = QLineEdit()
        self.cache_dir.setPlaceholderText("default cache folder")
        self.engine = QComboBox()
        for text, value in (
            ("Auto (ONNX Runtime on the CPU)", "auto"),
            ("ONNX Runtime", "onnxruntime"),
            ("PyTorch", "torch"),
        ):
            self.engine.addItem(text, value)
        self.engine.setToolTip(
            "What runs the frozen network on the CPU: ONNX Runtime is 2-3x faster than PyTorch "
            "there; GPUs always use PyTorch"
        )
        self.precision = QComboBox()
        for text, value in (("Auto (int8 when it agrees with fp32)", "auto"), ("fp32", "fp32"), ("int8", "int8")):
            self.precision.addItem(text, value)
        self.precision.setToolTip(
            "ONNX Runtime's precision: int8 is faster; auto makes it for folders of 4,000 "
            "images or more and uses it only when its features agree with fp32 on your own "
            "images"
        )
        form.addRow("Backbone LR ×", self.backbone_lr_mult)
        form.addRow("Weight decay", self.weight_decay)
        form.addRow(self.linear_probe_init)
        form.addRow(self.cache)
        form.addRow("Cache folder", self.cache_dir)
        self.balance = QComboBox()
        for text, value in (("Auto (when classes differ 3x or more)", "auto"), ("Always", "on"), ("Never", "off")):
            self.balance.addItem(text, value)
        self.balance.setToolTip("Weight the loss by inverse class frequency, so small classes count as much")
        form.addRow("Balance classes", self.balance)
        self.bn_stats = QComboBox()
        for text, value in (("Frozen (pretrained)", "frozen"), ("Updated from each batch", "update")):
            self.bn_stats.addItem(text, value)
        self.bn_stats.setToolTip(
            "Fine-tuning: BatchNorm layers keep the pretrained statistics (steadier, better on "
            "images unlike everyday photos) or re-estimate them from each batch"
        )
        form.addRow("BatchNorm statistics", self.bn_stats)
        self.small_images = QCheckBox("Fine-tune small pictures at their own size")
        self.small_images.setChecked(True)
        self.small_images.setToolTip(
            "Fine-tuning, bundled backbone family: pictures of at most 160 px train at "
            "128 px instead of being upscaled, which leaves time to train all but the "
            "first 3 stages (when the Model tab's stage count is auto)"
        )
        form.addRow("Small pictures", self.small_images)
        self.cross_fit = QCheckBox("Feature extraction learns from every labelled image (cross-fitting)")
        self.cross_fit.setChecked(True)
        self.cross_fit.setToolTip(
            "Without a validation folder: the saved head trains on all your labelled images, and 5 more heads, "
            "each trained on 4/5 of them, judge every image out of sample for the figures and the calibration. "
            "Off: 20% are held out for validation and never trained on"
        )
        form.addRow("Cross-fitting", self.cross_fit)
        self.features = QComboBox()
        for text, value in (
            ("Automatic: final, earlier layers too when clearly better", "auto"),
            ("Final features only", "final"),
            ("Final and earlier layers' features", "depths"),
        ):
            self.features.addItem(text, value)
        self.features.setToolTip(
            "Feature extraction: which of the frozen network's features the head reads. The earlier layers hold "
            "more about texture, strokes and position (scans, hand signs, clothing, characters); automatic keeps "
            "them only when they judge your images clearly better out of fold"
        )
        form.addRow("Features", self.features)
        form.addRow("Engine", self.engine)
        form.addRow("Precision", self.precision)
        # Collapsed by default: the group's check box shows or hides the rows (the values always apply).
        box.toggled.connect(lambda on: [w.setVisible(on) for w in box.findChildren(QWidget)])
        for w in box.findChildren(QWidget):
            w.setVisible(False)
        return box

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
        self.select_device(current or "auto")

    def select_device(self, value: str) -> None:
        """Select ``value``; one that is not on this machine stays chosen, marked (a run would say it is missing)."""
        i = self.device.findData(value)
        if i < 0:
            self.device.addItem(f"{value} (not found on this machine)", value)
            i = self.device.count() - 1
        self.device.setCurrentIndex(i)

    # ------------------------------------------------------------------------------------------------ settings
    def values(self) -> dict:
        """This tab's part of the training config (0 in a spin box means "auto": None)."""
        return {
            "epochs": self.epochs.value() or None,
            "batch_size": self.batch.value() or None,
            "lr": self.lr.value() or None,
            "augment": self.augment.isChecked(),
            "patience": self.patience.value() or None,
            "device": self.device.currentData() or "auto",
            "backbone_lr_mult": self.backbone_lr_mult.value() or None,
            "weight_decay": self.weight_decay.value(),
            "linear_probe_init": self.linear_probe_init.isChecked(),
            "cache": self.cache.isChecked(),
            "cache_dir": self.cache_dir.text().strip() or None,
            "engine": self.engine.currentData(),
            "precision": self.precision.currentData(),
            "balance": self.balance.currentData(),
            "bn_stats": self.bn_stats.currentData(),
            "small_images": "auto" if self.small_images.isChecked() else "off",
            "cross_fit": "auto" if self.cross_fit.isChecked() else "off",
            "features": self.features.currentData(),
        }

    def set_values(self, v: dict) -> None:
        for name, spin in (
            ("epochs", self.epochs),
            ("batch_size", self.batch),
            ("lr", self.lr),
            ("patience", self.patience),
            ("backbone_lr_mult", self.backbone_lr_mult),
            ("weight_decay", self.weight_decay),
        ):
            if name in v:
                spin.setValue(v[name] or 0)
        for name, box in (
            ("augment", self.augment),
            ("linear_probe_init", self.linear_probe_init),
            ("cache", self.cache),
        ):
            if name in v:
                box.setChecked(bool(v[name]))
        if "small_images" in v:
            self.small_images.setChecked(v["small_images"] != "off")
        if "cross_fit" in v:
            self.cross_fit.setChecked(v["cross_fit"] != "off")
        if "device" in v:
            self.select_device(v["device"] or "auto")
        if "cache_dir" in v:
            self.cache_dir.setText(v["cache_dir"] or "")
        for name, combo in (
            ("engine", self.engine),
            ("precision", self.precision),
            ("balance", self.balance),
            ("bn_stats", self.bn_stats),
            ("features", self.features),
        ):
            if name in v:
                combo.setCurrentIndex(max(0, combo.findData(v[name])))

    def save_settings(self, settings) -> None:
        save_values(settings, self.values())
        settings.setValue("train/runs_dir", self.runs_dir.text())

    def restore_settings(self, settings) -> None:
        self.set_values(load_values(settings, self.FIELDS))
        self.runs_dir.setText(str(settings.value("train/runs_dir", default_runs_dir())))

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
