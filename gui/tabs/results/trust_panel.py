"""Results > Confidence: how far the model's confidence can be trusted, measured on images it was not fitted on.

A reliability diagram (accuracy per confidence bin against the diagonal) with a sentence in words, and accuracy
against coverage with the user's target: what share of images the model answers when it must be at least that
right. *Use for predictions* saves the threshold with the model (model.json), so Predict marks the rest ``unsure``.
"""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QDoubleSpinBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from engine.trust.calibration import in_words, threshold_for


class TrustPanel(QWidget):
    threshold_saved = Signal(float)  # the target accuracy the user saved

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        self.words = QLabel("")
        self.words.setWordWrap(True)
        self.words.setTextFormat(Qt.RichText)
        root.addWidget(self.words)
        plots = QHBoxLayout()
        self.reliability = pg.PlotWidget(title="Reliability: accuracy per confidence")
        self.reliability.setLabel("bottom", "confidence shown")
        self.reliability.setLabel("left", "share right")
        self.coverage = pg.PlotWidget(title="Accuracy when answering only confident images")
        self.coverage.setLabel("bottom", "share of images answered")
        self.coverage.setLabel("left", "accuracy")
        for p in (self.reliability, self.coverage):
            p.getAxis("left").setWidth(44)
            p.setXRange(0, 1)
            plots.addWidget(p)
        root.addLayout(plots, 1)
        row = QHBoxLayout()
        row.addWidget(QLabel("Answer only when at least"))
        self.target = QDoubleSpinBox(decimals=1, minimum=50.0, maximum=100.0, singleStep=1.0, value=95.0, suffix=" %")
        self.target.setToolTip(
            "The accuracy you need; below the matching confidence, predictions are marked "
            "'unsure' (their best guess is kept)"
        )
        self.target.valueChanged.connect(self._show_target)
        row.addWidget(self.target)
        row.addWidget(QLabel("right:"))
        self.target_text = QLabel("")
        row.addWidget(self.target_text, 1)
        self.save_btn = QPushButton("Use for predictions")
        self.save_btn.setToolTip("Save this threshold with the model: Predict (app and command line) uses it")
        self.save_btn.clicked.connect(lambda: self.threshold_saved.emit(self.target.value() / 100))
        row.addWidget(self.save_btn)
        root.addLayout(row)
        self.curve: list[dict] = []
        self.marker = None

    def show_run(self, metrics: dict, meta: dict) -> None:
        cal = metrics.get("calibration")
        self.reliability.clear()
        self.coverage.clear()
        self.curve = (cal or {}).get("coverage") or []
        self.save_btn.setEnabled(bool(self.curve))
        self.target.setEnabled(bool(self.curve))
        if not cal:
            self.words.setText(
                "This run has no calibration measurement (saved before calibration existed, or "
                "without validation images): its confidences are the network's own."
            )
            self.target_text.setText("")
            return
        self.reliability.plot([0, 1], [0, 1], pen=pg.mkPen((150, 150, 150), width=1, style=Qt.DashLine))
        bins = [b for b in cal["bins"] if b["n"]]
        self.reliability.addItem(
            pg.BarGraphItem(
                x=[(b["lo"] + b["hi"]) / 2 for b in bins],
                height=[b["accuracy"] for b in bins],
                width=1 / 15 * 0.9,
                brush=(31, 119, 180, 160),
            )
        )
        self.reliability.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            pen=None,
            symbol="o",
            symbolSize=6,
            symbolBrush=(255, 127, 14),
        )
        self.coverage.plot(
            [p["coverage"] for p in self.curve],
            [p["accuracy"] for p in self.curve],
            pen=pg.mkPen((31, 119, 180), width=2),
        )
        self.marker = self.coverage.plot([], [], pen=None, symbol="o", symbolSize=9, symbolBrush=(214, 39, 40))
        unf = metrics.get("unfamiliar") or {}
        rate = unf.get("familiar_flag_rate")
        self.words.setText(
            f"{in_words(cal['bins'])} Calibrated with temperature {cal['temperature']:.2f}; expected calibration "
            f"error {100 * cal['ece_before']:.1f}% before, <b>{100 * cal['ece_after']:.1f}%</b> after "
            f"(measured on {cal['measured_on']}, {cal['n']} images"
            + (
                f"; on so many images even a perfectly calibrated model shows about {100 * cal['ece_noise_floor']:.1f}%"
                if isinstance(cal.get("ece_noise_floor"), float)
                else ""
            )
            + ")."
            + (
                f" About {100 * rate:.0f}% of images like the validation ones are marked unfamiliar."
                if rate is not None
                else ""
            )
        )
        saved = (meta.get("unsure") or {}).get("target_accuracy")
        self.target.blockSignals(True)
        self.target.setValue(100 * saved if isinstance(saved, (int, float)) else 95.0)
        self.target.blockSignals(False)
        self._show_target()

    def _show_target(self) -> None:
        if not self.curve:
            return
        hit = threshold_for(self.curve, self.target.value() / 100)
        if hit is None:
            best = max(p["accuracy"] for p in self.curve)
            self.target_text.setText(f"not reached on validation images (best {100 * best:.0f}%)")
            self.marker.setData([], [])
            return
        t, cov, acc = hit
        self.target_text.setText(
            f"answers {100 * cov:.0f}% of images ({100 * acc:.0f}% of those right); the rest "
            f"are 'unsure' (confidence below {100 * t:.0f}%)"
        )
        self.marker.setData([cov], [acc])
