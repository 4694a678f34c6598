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

from gui.session.binding import bind_check
from gui.session.state import Session
from gui.tabs.model.advice import advice, fine_tuning_estimate

AUTO_TEXT = (
    "<b>Automatic (recommended)</b> does both for you: feature extraction first (its result shows in "
    "seconds), then fine-tuning starting from it, within the time budget below. Fine-tuning stops early when "
    "it cannot catch up. The more reliable of the two becomes the result; both stay in Results."
)
FE_TEXT = (
    "<b>Feature extraction</b> keeps the pretrained network frozen and trains only a new final layer on "
    "its features: the last layer's, and its earlier layers' too where they tell your classes apart better "
    "(strokes, textures, one kind of picture). Fast (each image is processed once), and the best choice when "
    "you have few images, or pictures like everyday photos."
)
FT_TEXT = (
    "<b>Fine-tuning</b> also retrains the last stages of the network, with a lower learning rate. Slower "
    "(each epoch retrains those stages on every image), better when your images look unlike everyday photos "
    "(medical, satellite, microscope, documents) and you have a few hundred images per class or more. Small "
    "pictures (160 px or less) train at their own size, which leaves time to retrain most of the network."
)


class ModelTab(QWidget):
    """Which network and how to reuse it: the fields ``mode``, ``backbone``, ``weights``, ``download``,
    ``unfreeze`` and ``budget``, bound to the session; the advice and the fine-tuning estimate follow every setting
    they read (gui/tabs/model/advice.py)."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.backbones = []
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
        self.unfreeze_all.toggled.connect(lambda on: self.unfreeze.setEnabled(not on))
        self._bind()
        session.follow(("mode",), self.recommend)
        session.follow(("mode", "backbone", "epochs", "unfreeze", "device"), self.show_estimate)
        self.recommend()
        self.show_estimate()

    def _bind(self) -> None:
        s = self.session
        show_mode = {"auto": self.auto, "fine-tuning": self.ft}
        bind_check(s, "download", self.download)
        self.mode_group.buttonToggled.connect(lambda *_: s.set("mode", self.mode()))
        self.mode_group.buttonToggled.connect(self._mode_changed)
        self.table.itemSelectionChanged.connect(lambda: self.backbones and s.set("backbone", self.backbone()))
        self.w_file.toggled.connect(lambda *_: s.set("weights", self.weights_file()))
        self.w_path.textChanged.connect(lambda *_: s.set("weights", self.weights_file()))
        self.unfreeze.valueChanged.connect(lambda *_: s.set("unfreeze", self.unfreeze_value()))
        self.unfreeze_all.toggled.connect(lambda *_: s.set("unfreeze", self.unfreeze_value()))
        self.budget.valueChanged.connect(lambda v: s.set("budget", float(v) or None))

        def show(name, value) -> None:
            if name == "mode":
                show_mode.get(value, self.fe).setChecked(True)
            elif name == "backbone":
                self.select_backbone(value)
            elif name == "weights" and value != self.weights_file():
                self.w_path.setText(value or "")
                (self.w_file if value else self.w_default).setChecked(True)
            elif name == "unfreeze" and value != self.unfreeze_value():
                self.unfreeze_all.setChecked(value == "all")
                if value != "all":
                    self.unfreeze.setValue(0 if value == "auto" else int(value))
            elif name == "budget":
                if (value or 0) != self.budget.value():
                    self.budget.blockSignals(True)
                    self.budget.setValue(int(round(value or 0)))
                    self.budget.blockSignals(False)
                if not self.following_estimate:
                    self.budget_set_by_user = bool(value)

        s.changed.connect(show)
        for name in ("mode", "backbone", "weights", "unfreeze", "budget"):
            show(name, s.get(name))
        self._mode_changed()

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
        self.following_estimate = False  # the budget is being set from the estimate, not by the user
        return row

    def show_estimate(self) -> None:
        """The fine-tuning estimate for the open dataset with the current backbone, stages, epochs and device; until
        the user sets a budget, the budget follows it with room to spare (twice it, at least 2 minutes more): an
        estimate from another folder or a quieter machine can be short, and a budget that runs out before the first
        epoch wastes the wait."""
        est = fine_tuning_estimate(self.session)
        if est is None:
            self.estimate.setText("")
            return
        text, minutes = est
        self.estimate.setText(f"Fine-tuning estimate: {text}")
        if not self.budget_set_by_user:
            self.following_estimate = True
            try:
                self.session.set("budget", float(max(1, int(max(2 * minutes, minutes + 2) + 0.999))))
            finally:
                self.following_estimate = False

    def _mode_changed(self, *_args) -> None:
        ft = self.ft.isChecked() or self.auto.isChecked()
        self.unfreeze.setEnabled(ft and not self.unfreeze_all.isChecked())
        self.unfreeze_all.setEnabled(ft)
        self.budget.setEnabled(self.auto.isChecked())

    def set_backbones(self, infos: list) -> None:
        """The list from start-up's discovery; the session's backbone is selected (a name not listed stays the
        session's, with nothing selected)."""
        self.backbones = infos
        self.loading.setVisible(False)
        self.table.blockSignals(True)
        self.table.setRowCount(len(infos))
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
        self.table.clearSelection()
        self.select_backbone(self.session.get("backbone"))
        self.table.blockSignals(False)

    def backbone(self) -> str:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return self.session.get("backbone")
        return self.table.item(rows[0].row(), 0).data(Qt.UserRole)

    def select_backbone(self, name: str) -> None:
        """Select ``name`` in the list (the session keeps it until the list arrives)."""
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).data(Qt.UserRole) == name and self.backbone() != name:
                self.table.selectRow(r)

    def mode(self) -> str:
        return "auto" if self.auto.isChecked() else "fine-tuning" if self.ft.isChecked() else "feature-extraction"

    def unfreeze_value(self):
        return "all" if self.unfreeze_all.isChecked() else (self.unfreeze.value() or "auto")

    def weights_file(self) -> str | None:
        return self.w_path.text().strip() or None if self.w_file.isChecked() else None

    def recommend(self) -> None:
        """The advice for the open folder and the chosen mode (gui/tabs/model/advice.py)."""
        self.advice.setText(advice(self.session.get("mode"), self.session.dataset))
