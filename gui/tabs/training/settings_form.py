"""The Training tab's settings: each widget bound to its field of the session (gui/session/binding.py); the runs
folder; the collapsed Advanced group."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from gui.session.binding import bind_check, bind_combo, bind_spin, bind_text, none_if_zero, zero_if_none
from gui.session.state import Session


def _combo(items: tuple[tuple[str, str], ...], tip: str) -> QComboBox:
    c = QComboBox()
    for text, value in items:
        c.addItem(text, value)
    c.setToolTip(tip)
    return c


class SettingsForm(QWidget):
    """How to train: the fields epochs ... features of ``TrainConfig`` and the runs folder, bound to the session."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        hp = QGroupBox("Settings")
        form = QFormLayout(hp)
        self.epochs = QSpinBox(minimum=0, maximum=1000, value=0, specialValueText="auto")
        self.epochs.setToolTip(
            "Fine-tuning: passes over the training images (auto: 5). Feature extraction's head is solved exactly "
            "(its regularisation chosen out of fold) and takes no epochs"
        )
        self.batch = QSpinBox(minimum=0, maximum=1024, value=0, specialValueText="auto")
        self.batch.setToolTip("Fine-tuning: images per step (auto: 32). Out of GPU memory? It is halved automatically")
        self.lr = QDoubleSpinBox(
            decimals=5, minimum=0.0, maximum=1.0, singleStep=0.0005, value=0.0, specialValueText="auto"
        )
        self.lr.setToolTip("Fine-tuning: learning rate of the new head (the backbone uses a tenth of it; auto: 0.001)")
        self.augment = QCheckBox("Mirror images")
        self.augment.setToolTip(
            "Fine-tuning: show each image or its mirror image at random (less overfitting); "
            "backbones other than the bundled one also get random crops"
        )
        self.patience = QSpinBox(minimum=0, maximum=100, value=0, specialValueText="auto")
        self.patience.setToolTip(
            "Fine-tuning: stop when validation loss has not improved for this many epochs; the best epoch is kept "
            "either way (auto: 3)"
        )
        self.device = QComboBox()
        self.device.addItem("Auto (GPU if available)", "auto")
        self.device.setToolTip("Where training runs")
        self.runs_dir = QLineEdit(session.runs_dir)
        self.runs_dir.setToolTip("Every finished run is saved here in its own folder")
        self.runs_dir.textChanged.connect(session.set_runs_dir)
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_runs)
        rd = QHBoxLayout()
        rd.addWidget(self.runs_dir)
        rd.addWidget(browse)
        for label, w in (
            ("Epochs", self.epochs), ("Batch size", self.batch), ("Learning rate", self.lr),
            ("Augmentation", self.augment), ("Early stopping", self.patience), ("Device", self.device),
        ):  # fmt: skip
            form.addRow(label, w)
        form.addRow("Runs folder", rd)
        col.addWidget(hp)
        col.addWidget(self._advanced())
        s = session
        for name, spin in (("epochs", self.epochs), ("batch_size", self.batch), ("lr", self.lr),
                           ("patience", self.patience)):  # fmt: skip
            bind_spin(s, name, spin, none_if_zero, zero_if_none)
        bind_check(s, "augment", self.augment)
        self._bind_device()

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
        self.weight_decay.setToolTip("Fine-tuning: AdamW weight decay")
        self.linear_probe_init = QCheckBox("Start the head from a linear probe")
        self.linear_probe_init.setToolTip(
            "Fine-tuning: train the new head on frozen features first (LP-FT), so "
            "the first steps do not disturb the pretrained layers"
        )
        self.cache = QCheckBox("Reuse embeddings between runs")
        self.cache.setToolTip("Feature extraction keeps each image's features, so a rerun takes seconds")
        self.cache_dir = QLineEdit()
        self.cache_dir.setPlaceholderText("default cache folder")
        self.engine = _combo(
            (("Auto (ONNX Runtime on the CPU)", "auto"), ("ONNX Runtime", "onnxruntime"), ("PyTorch", "torch")),
            "What runs the frozen network on the CPU: ONNX Runtime is 2-3x faster than PyTorch there; GPUs always "
            "use PyTorch",
        )
        self.precision = _combo(
            (("Auto (int8 when it agrees with fp32)", "auto"), ("fp32", "fp32"), ("int8", "int8")),
            "ONNX Runtime's precision: int8 is faster; auto makes it for folders of 4,000 images or more and uses it "
            "only when its features agree with fp32 on your own images",
        )
        self.balance = _combo(
            (("Auto (when classes differ 3x or more)", "auto"), ("Always", "on"), ("Never", "off")),
            "Weight the loss by inverse class frequency, so small classes count as much",
        )
        self.bn_stats = _combo(
            (("Frozen (pretrained)", "frozen"), ("Updated from each batch", "update")),
            "Fine-tuning: BatchNorm layers keep the pretrained statistics (steadier, better on images unlike "
            "everyday photos) or re-estimate them from each batch",
        )
        self.small_images = QCheckBox("Fine-tune small pictures at their own size")
        self.small_images.setToolTip(
            "Fine-tuning, bundled backbone family: pictures of at most 160 px train at 128 px instead of being "
            "upscaled, which leaves time to train all but the first 3 stages (when the Model tab's stage count is "
            "auto)"
        )
        self.cross_fit = QCheckBox("Feature extraction learns from every labelled image (cross-fitting)")
        self.cross_fit.setToolTip(
            "Without a validation folder: the saved head trains on all your labelled images, and 5 more heads, "
            "each trained on 4/5 of them, judge every image out of sample for the figures and the calibration. "
            "Off: 20% are held out for validation and never trained on"
        )
        self.features = _combo(
            (
                ("Automatic: final, earlier layers too when clearly better", "auto"),
                ("Final features only", "final"),
                ("Final and earlier layers' features", "depths"),
            ),  # fmt: skip
            "Feature extraction: which of the frozen network's features the head reads. The earlier layers hold "
            "more about texture, strokes and position (scans, hand signs, clothing, characters); automatic keeps "
            "them only when they judge your images clearly better out of fold",
        )
        for label, w in (
            ("Backbone LR ×", self.backbone_lr_mult), ("Weight decay", self.weight_decay),
            (None, self.linear_probe_init), (None, self.cache), ("Cache folder", self.cache_dir),
            ("Balance classes", self.balance),
            ("BatchNorm statistics", self.bn_stats), ("Small pictures", self.small_images),
            ("Cross-fitting", self.cross_fit), ("Features", self.features), ("Engine", self.engine),
            ("Precision", self.precision),
        ):  # fmt: skip
            form.addRow(w) if label is None else form.addRow(label, w)
        s = self.session
        bind_spin(s, "backbone_lr_mult", self.backbone_lr_mult, none_if_zero, zero_if_none)
        bind_spin(s, "weight_decay", self.weight_decay)
        bind_check(s, "linear_probe_init", self.linear_probe_init)
        bind_check(s, "cache", self.cache)
        bind_text(s, "cache_dir", self.cache_dir)
        for name in ("engine", "precision", "balance", "bn_stats", "features"):
            bind_combo(s, name, getattr(self, name))
        bind_check(s, "small_images", self.small_images, lambda on: "auto" if on else "off", lambda v: v != "off")
        bind_check(s, "cross_fit", self.cross_fit, lambda on: "auto" if on else "off", lambda v: v != "off")
        # Collapsed by default: the group's check box shows or hides the rows (the values always apply).
        box.toggled.connect(lambda on: [w.setVisible(on) for w in box.findChildren(QWidget)])
        for w in box.findChildren(QWidget):
            w.setVisible(False)
        return box

    def _bind_device(self) -> None:
        """The device list arrives after start-up's discovery; a stored device not on this machine stays chosen,
        marked (a run would say it is missing)."""
        self.device.currentIndexChanged.connect(
            lambda _i: self.device.currentData() and self.session.set("device", self.device.currentData())
        )
        self.session.changed.connect(lambda name, value: self.select_device(value) if name == "device" else None)
        self.select_device(self.session.get("device"))

    def set_devices(self, devices: list[tuple[str, str]]) -> None:
        current = self.session.get("device")
        self.device.blockSignals(True)
        self.device.clear()
        self.device.addItem("Auto (GPU if available)", "auto")
        for label, value in devices:
            self.device.addItem(label, value)
        self.device.blockSignals(False)
        self.select_device(current or "auto")

    def select_device(self, value: str) -> None:
        i = self.device.findData(value)
        if i < 0:
            self.device.addItem(f"{value} (not found on this machine)", value)
            i = self.device.count() - 1
        if i != self.device.currentIndex():
            self.device.setCurrentIndex(i)

    def _browse_runs(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Runs folder", self.runs_dir.text())
        if d:
            self.runs_dir.setText(d)
