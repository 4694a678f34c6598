"""Model tab: backbone list (size, input, offline availability), weights source, mode with advice, unfreeze."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QFileDialog, QGroupBox, QHBoxLayout, QHeaderView, QLabel,
                               QLineEdit, QPushButton, QRadioButton, QSpinBox, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from engine.backbones import DEFAULT_BACKBONE
from gui.settings import load_values, save_values

FE_TEXT = ("<b>Feature extraction</b> keeps the pretrained network frozen and trains only a new final layer on "
           "its features. Fast (each image is processed once), and the best choice when your images look like "
           "everyday photos and you have few of them.")
FT_TEXT = ("<b>Fine-tuning</b> also retrains the last stages of the network, with a lower learning rate. Slower "
           "(every epoch runs the network), better when your images look unlike everyday photos (medical, "
           "satellite, microscope, documents) and you have a few hundred images per class or more.")


class ModelTab(QWidget):
    """Owns the TrainConfig fields ``mode``, ``backbone``, ``weights``, ``download``, ``unfreeze``."""

    FIELDS = ["mode", "backbone", "weights", "download", "unfreeze"]

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
        self.fe = QRadioButton("Feature extraction")
        self.ft = QRadioButton("Fine-tuning")
        self.fe.setChecked(True)
        self.mode_group.addButton(self.fe)
        self.mode_group.addButton(self.ft)
        for btn, text in ((self.fe, FE_TEXT), (self.ft, FT_TEXT)):
            ml.addWidget(btn)
            lab = QLabel(text)
            lab.setWordWrap(True)
            lab.setContentsMargins(22, 0, 0, 6)
            ml.addWidget(lab)
        ul = QHBoxLayout()
        ul.addSpacing(22)
        ul.addWidget(QLabel("Stages to unfreeze (from the top):"))
        self.unfreeze = QSpinBox(minimum=1, maximum=40, value=2)
        self.unfreeze.setToolTip("More stages adapt more of the network: slower, needs more images")
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
        self.fe.toggled.connect(self._mode_changed)
        self.unfreeze_all.toggled.connect(lambda on: self.unfreeze.setEnabled(not on))
        self._mode_changed()
        self.recommend(None)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Backbone weights", "", "Weights (*.safetensors *.pth *.pt)")
        if path:
            self.w_path.setText(path)
            self.w_file.setChecked(True)

    def _mode_changed(self) -> None:
        ft = self.ft.isChecked()
        self.unfreeze.setEnabled(ft and not self.unfreeze_all.isChecked())
        self.unfreeze_all.setEnabled(ft)

    # ------------------------------------------------------------------------------------------------ settings
    def values(self) -> dict:
        return {"mode": self.mode(), "backbone": self.backbone(), "weights": self.weights_file(),
                "download": self.download.isChecked(), "unfreeze": self.unfreeze_value()}

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
        if "unfreeze" in values:
            self.unfreeze_all.setChecked(values["unfreeze"] == "all")
            if values["unfreeze"] != "all":
                self.unfreeze.setValue(int(values["unfreeze"]))

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
            ok.setToolTip("" if b.weights_available else "Not on this machine: pick a weights file, or allow the download")
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
        return "fine-tuning" if self.ft.isChecked() else "feature-extraction"

    def set_mode(self, mode: str) -> None:
        (self.ft if mode == "fine-tuning" else self.fe).setChecked(True)

    def unfreeze_value(self):
        return "all" if self.unfreeze_all.isChecked() else self.unfreeze.value()

    def weights_file(self) -> str | None:
        return self.w_path.text().strip() or None if self.w_file.isChecked() else None

    def recommend(self, ds) -> None:
        """Advice from the scanned folder: few images per class -> feature extraction."""
        if ds is None:
            self.advice.setText("Recommendation: open a dataset and this suggests a mode. Start with feature "
                                "extraction: it takes seconds and is a strong baseline.")
            return
        per_class = len(ds.samples) / max(1, len(ds.classes))
        if per_class < 150:
            text = (f"Recommendation for this dataset: <b>feature extraction</b>. With about {per_class:.0f} images "
                    "per class, fine-tuning has little to learn from and can overfit; try it afterwards only if "
                    "your images look unlike everyday photos.")
        else:
            text = (f"Recommendation for this dataset: start with <b>feature extraction</b> as a baseline (fast), "
                    f"then try <b>fine-tuning</b>: with about {per_class:.0f} images per class it often gains a few "
                    "points, especially on unusual images. Compare the two runs in the Results tab.")
        self.advice.setText(text)
