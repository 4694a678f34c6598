"""Model tab: backbone list (size, input, offline availability), weights source, mode with advice, unfreeze."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.network.backbones import DEFAULT_BACKBONE
from engine.train.auto import MIN_COMPARED, too_few_to_compare
from gui.settings import load_values, save_values

AUTO_TEXT = (
    "<b>Automatic (recommended)</b> does both for you: feature extraction first (its result shows in "
    "seconds), then fine-tuning starting from it, within the time budget below. Fine-tuning stops early when "
    "it cannot catch up. The more reliable of the two becomes the result; both stay in Results."
)
FE_TEXT = (
    "<b>Feature extraction</b> keeps the pretrained network frozen and trains only a new final layer on "
    "its features. Fast (each image is processed once), and the best choice when your images look like "
    "everyday photos and you have few of them."
)
FT_TEXT = (
    "<b>Fine-tuning</b> also retrains the last stages of the network, with a lower learning rate. Slower "
    "(each epoch retrains those stages on every image), better when your images look unlike everyday photos "
    "(medical, satellite, microscope, documents) and you have a few hundred images per class or more. Small "
    "pictures (160 px or less) train at their own size, which leaves time to retrain most of the network."
)


class ModelTab(QWidget):
    """Owns the TrainConfig fields ``mode``, ``backbone``, ``weights``, ``download``, ``unfreeze``, ``budget``."""

    FIELDS = ["mode", "backbone", "weights", "download", "unfreeze", "budget"]

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.backbones = []
        self.wanted_backbone = DEFAULT_BACKBONE  # selected once the list arrives (start-up discovery)
        root = QVBoxLayout(self)

        bb = QGroupBox("Pretrained network (backbone)")
        bl = QVBoxLayout(bb)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Backbone", "Parameters", "Input", "Weights offline"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setSelectionMode(QTableWidget.SingleSelection)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.loading = QLabel("Looking for backbones and their weights…")
        bl.addWidget(self.loading)
        bl.addWidget(self.table)
        wl = QHBoxLayout()
        self.w_default = QRadioButton("Default pretrained weights (ImageNet)")
        self.w_file = QRadioButton("Weights from a file:")
        self.w_default.setChecked(True)
        self.w_path = QLineEdit()
        self.w_path.setPlaceholderText(".safetensors or .pth (loaded safely: no code is run)")
        self.w_browse = QPushButton("Browse…")
        self.w_browse.clicked.connect(self._browse)
        self.download = QCheckBox("Allow download if missing")
        self.download.setToolTip("torchvision weights not yet on this machine are downloaded (needs internet)")
        for w in (self.w_default, self.w_file, self.w_path, self.w_browse, self.download):
            wl.addWidget(w)
        bl.addLayout(wl)
        root.addWidget(bb, 2)

        mg = QGroupBox("How to reuse it")
        ml = QVBoxLayout(mg)
        self.mode_group = QButtonGroup(self)
        self.auto = QRadioButton("Automatic")
        self.fe = QRadioButton("Feature extraction")
        self.ft = QRadioButton("Fine-tuning")
        self.auto.setChecked(True)
        for btn, text in ((self.auto, AUTO_TEXT), (self.fe, FE_TEXT), (self.ft, FT_TEXT)):
            self.mode_group.addButton(btn)
            ml.addWidget(btn)
            lab = QLabel(text)
            lab.setWordWrap(True)
            lab.setContentsMargins(22, 0, 0, 6)
            ml.addWidget(lab)
            if btn is self.auto:
                ml.addLayout(self._budget_row())
        ul = QHBoxLayout()
        ul.addSpacing(22)
        ul.addWidget(QLabel("Stages to unfreeze (from the top):"))
        self.unfreeze = QSpinBox(minimum=0, maximum=40, value=0, specialValueText="auto")
        self.unfreeze.setToolTip(
            "More stages adapt more of the network: slower, needs more images. auto: the last "
            "3; small pictures (160 px or less), trained at 128 px: all but the first 3"
        )
        self.unfreeze_all = QCheckBox("all")
        ul.addWidget(self.unfreeze)
        ul.addWidget(self.unfreeze_all)
        ul.addStretch(1)
        ml.addLayout(ul)
        self.advice = QLabel()
        self.advice.setWordWrap(True)
        self.advice.setStyleSheet("background: #eef5ff; padding: 6px; border-radius: 4px;")
        ml.addWidget(self.advice)
        root.addWidget(mg, 1)
        self.mode_group.buttonToggled.connect(self._mode_changed)
        self.unfreeze_all.toggled.connect(lambda on: self.unfreeze.setEnabled(not on))
        self._mode_changed()
        self.recommend(None)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Backbone weights", "", "Weights (*.safetensors *.pth *.pt)")
        if path:
            self.w_path.setText(path)
            self.w_file.setChecked(True)

    def _budget_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        row.addSpacing(22)
        row.addWidget(QLabel("Time budget for fine-tuning:"))
        self.budget = QSpinBox(minimum=0, maximum=24 * 60, value=0, suffix=" min", specialValueText="no limit")
        self.budget.setToolTip(
            "Fine-tuning stops when this time is up (keeping its best epoch so far); no limit: its planned epochs"
        )
        row.addWidget(self.budget)
        self.estimate = QLabel()
        self.estimate.setStyleSheet("color: #555;")
        row.addWidget(self.estimate, 1)
        self.budget_set_by_user = False
        self.budget.valueChanged.connect(lambda _v: setattr(self, "budget_set_by_user", True))
        return row

    def show_estimate(self, text: str, minutes: float) -> None:
        """The fine-tuning estimate for the open dataset; until the user sets a budget, it follows the estimate with
        room to spare (twice it, at least 2 minutes more): an estimate from another folder or a quieter machine can
        be short, and a budget that runs out before the first epoch wastes the wait."""
        self.estimate.setText(f"Fine-tuning estimate: {text}")
        if not self.budget_set_by_user:
            self.budget.blockSignals(True)
            self.budget.setValue(max(1, int(max(2 * minutes, minutes + 2) + 0.999)))
            self.budget.blockSignals(False)

    def _mode_changed(self, *_args) -> None:
        ft = self.ft.isChecked() or self.auto.isChecked()
        self.unfreeze.setEnabled(ft and not self.unfreeze_all.isChecked())
        self.unfreeze_all.setEnabled(ft)
        self.budget.setEnabled(self.auto.isChecked())

    # ------------------------------------------------------------------------------------------------ settings
    def values(self) -> dict:
        return {
            "mode": self.mode(),
            "backbone": self.backbone(),
            "weights": self.weights_file(),
            "download": self.download.isChecked(),
            "unfreeze": self.unfreeze_value(),
            "budget": float(self.budget.value()) or None,
        }

    def set_values(self, values: dict) -> None:
        if "mode" in values:
            self.set_mode(values["mode"])
        if values.get("backbone"):
            self.select_backbone(values["backbone"])
        if "weights" in values:
            self.w_path.setText(values["weights"] or "")
            (self.w_file if values["weights"] else self.w_default).setChecked(True)
        if "download" in values:
            self.download.setChecked(bool(values["download"]))
        if "budget" in values:
            self.budget.blockSignals(True)
            self.budget.setValue(int(round(values["budget"] or 0)))
            self.budget.blockSignals(False)
            self.budget_set_by_user = bool(values["budget"])
        if "unfreeze" in values:
            self.unfreeze_all.setChecked(values["unfreeze"] == "all")
            if values["unfreeze"] != "all":
                self.unfreeze.setValue(0 if values["unfreeze"] == "auto" else int(values["unfreeze"]))

    def save_settings(self, settings) -> None:
        save_values(settings, self.values())

    def restore_settings(self, settings) -> None:
        self.set_values(load_values(settings, self.FIELDS))

    def set_backbones(self, infos: list) -> None:
        self.backbones = infos
        self.loading.setVisible(False)
        self.table.setRowCount(len(infos))
        select = 0
        for r, b in enumerate(infos):
            name = QTableWidgetItem(b.title)
            name.setData(Qt.UserRole, b.name)
            name.setToolTip(b.weights_where)
            self.table.setItem(r, 0, name)
            self.table.setItem(r, 1, QTableWidgetItem(f"{b.params_m:.1f} M"))
            self.table.setItem(r, 2, QTableWidgetItem(f"{b.input_size} px"))
            ok = QTableWidgetItem("yes" if b.weights_available else "no")
            ok.setForeground(Qt.darkGreen if b.weights_available else Qt.darkRed)
            ok.setToolTip(
                "" if b.weights_available else "Not on this machine: pick a weights file, or allow the download"
            )
            self.table.setItem(r, 3, ok)
            if b.name == DEFAULT_BACKBONE:
                select = r
        self.table.selectRow(select)
        self.select_backbone(self.wanted_backbone)

    def backbone(self) -> str:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return self.wanted_backbone
        return self.table.item(rows[0].row(), 0).data(Qt.UserRole)

    def select_backbone(self, name: str) -> None:
        """Select ``name`` in the list (or remember it until the list arrives)."""
        self.wanted_backbone = name
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).data(Qt.UserRole) == name:
                self.table.selectRow(r)

    def mode(self) -> str:
        return "auto" if self.auto.isChecked() else "fine-tuning" if self.ft.isChecked() else "feature-extraction"

    def set_mode(self, mode: str) -> None:
        {"auto": self.auto, "fine-tuning": self.ft}.get(mode, self.fe).setChecked(True)

    def unfreeze_value(self):
        return "all" if self.unfreeze_all.isChecked() else (self.unfreeze.value() or "auto")

    def weights_file(self) -> str | None:
        return self.w_path.text().strip() or None if self.w_file.isChecked() else None

    def recommend(self, ds) -> None:
        """Advice from the scanned folder: few images per class -> feature extraction."""
        if ds is None:
            self.advice.setText(
                "Recommendation: <b>Automatic</b>. It tries feature extraction (seconds) and then "
                "fine-tuning, and keeps whichever gives more reliable answers on your images."
            )
            return
        per_class = len(ds.samples) / max(1, len(ds.classes))
        n_val = len(ds.split("val"))
        if self.auto.isChecked() and too_few_to_compare(n_val):
            text = (
                f"Recommendation for this dataset: <b>Automatic</b>. With {n_val} validation images it keeps feature "
                f"extraction without trying fine-tuning: too few to compare the two (at least {MIN_COMPARED} are "
                "needed)."
            )
        elif self.auto.isChecked():
            text = (
                f"Recommendation for this dataset: <b>Automatic</b>. With about {per_class:.0f} images per "
                "class it "
                + (
                    "will most likely keep feature extraction (fine-tuning has little to learn from), but checks."
                    if per_class < 150
                    else "has enough images for fine-tuning to pay off if your images look unlike "
                    "everyday photos; it measures both on your validation images."
                )
            )
        elif per_class < 150:
            text = (
                f"Recommendation for this dataset: <b>feature extraction</b>. With about {per_class:.0f} images "
                "per class, fine-tuning has little to learn from and can overfit; try it afterwards only if "
                "your images look unlike everyday photos."
            )
        else:
            text = (
                f"Recommendation for this dataset: start with <b>feature extraction</b> as a baseline (fast), "
                f"then try <b>fine-tuning</b>: with about {per_class:.0f} images per class it often gains a few "
                "points, especially on unusual images. Compare the two runs in the Results tab."
            )
        self.advice.setText(text)
