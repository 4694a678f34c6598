"""Live loss/accuracy plots: signals append to buffers, a QTimer redraws at 10 Hz with ``setData``."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QHBoxLayout, QWidget

from engine.events import BatchMetrics, EpochMetrics

pg.setConfigOptions(antialias=True, background="w", foreground="k")


class LivePlots(QWidget):
    """Two plots (loss, accuracy) with a running train curve per step and train/val points per epoch."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.loss_plot = pg.PlotWidget(title="Loss")
        self.acc_plot = pg.PlotWidget(title="Accuracy")
        for p in (self.loss_plot, self.acc_plot):
            # No grid: pyqtgraph's grid lines made each repaint ~80 ms instead of ~8 ms on a 2-core CPU (measured),
            # enough to stall the event loop while training.
            p.setLabel("bottom", "epoch")
            # A fixed width for the tick labels: by default the axis resizes whenever their text gets wider or
            # narrower ("0.3" -> "0.25"), which re-lays out the whole plot; that made the slowest repaints
            # 88-98 ms instead of 50-63 ms (2-core CPU, 24-bit X screen, measured).
            p.getAxis("left").setWidth(52)
            p.addLegend(offset=(-10, 10))
            lay.addWidget(p)
        blue, orange = (31, 119, 180), (255, 127, 14)
        line = {"symbol": "o", "symbolSize": 5, "connect": "finite"}  # (a NaN point breaks the line: _break)
        self.curves = {
            "train_loss_live": self.loss_plot.plot(pen=pg.mkPen(blue + (90,), width=1)),
            "train_loss": self.loss_plot.plot(pen=pg.mkPen(blue, width=2), name="train", **line),
            "val_loss": self.loss_plot.plot(pen=pg.mkPen(orange, width=2), name="validation", **line),
            "train_acc_live": self.acc_plot.plot(pen=pg.mkPen(blue + (90,), width=1)),
            "train_acc": self.acc_plot.plot(pen=pg.mkPen(blue, width=2), name="train", **line),
            "val_acc": self.acc_plot.plot(pen=pg.mkPen(orange, width=2), name="validation", **line),
        }
        self.clear()
        self.timer = QTimer(self)
        self.timer.setInterval(100)  # 10 Hz
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    MAX_MARKERS = 40
    # --mode auto: each half's validation curve against the seconds since the run started, on the same plots
    RACE = {"feature-extraction": ((255, 127, 14), "feature extraction"), "fine-tuning": ((44, 160, 44), "fine-tuning")}

    def clear(self) -> None:
        if getattr(self, "race", False):  # back to the train/validation curves and their legend
            for key in [k for k in self.curves if k.startswith("race:")]:
                plot = self.loss_plot if key.endswith(":loss") else self.acc_plot
                plot.removeItem(self.curves.pop(key))
            for p, prefix in ((self.loss_plot, "_loss"), (self.acc_plot, "_acc")):
                legend = p.getPlotItem().legend
                legend.clear()
                legend.addItem(self.curves["train" + prefix], "train")
                legend.addItem(self.curves["val" + prefix], "validation")
        self.data = {k: ([], []) for k in self.curves}
        self.race = False
        self.group, self.group_seen = "", False
        for p in (self.loss_plot, self.acc_plot):
            p.setLabel("bottom", "epoch")
        self.dirty = True
        self.updates = 0

    def _start_race(self) -> None:
        """The first epoch of an automatic run: validation curves per strategy, x in seconds."""
        self.race = True
        for key in [k for k in self.curves if not k.startswith("race:")]:
            self.data[key] = ([], [])
            self.curves[key].setData([], [])
        for p in (self.loss_plot, self.acc_plot):
            p.setLabel("bottom", "seconds since start")
            p.getPlotItem().legend.clear()
        for strategy, (colour, name) in self.RACE.items():
            for what, plot in (("loss", self.loss_plot), ("acc", self.acc_plot)):
                key = f"race:{strategy}:{what}"
                pen = pg.mkPen(colour, width=2)
                self.curves[key] = plot.plot(
                    pen=pen, symbol="o", symbolSize=5, connect="finite", name=f"{name} (validation)"
                )
                self.data[key] = ([], [])

    def add_batch(self, m: BatchMetrics) -> None:
        if self.race:  # batches carry no strategy or time: the race shows epochs only
            return
        x = (m.epoch - 1) + m.step / max(1, m.steps)
        for key, y in (("train_loss_live", m.loss), ("train_acc_live", m.accuracy)):
            self.data[key][0].append(x)
            self.data[key][1].append(y)
        self.dirty = True

    def _break(self, m: EpochMetrics, keys) -> None:
        """Feature extraction's head reports one point per regularisation strength, for each feature set in turn
        ("final features, C 0.01", then "with the earlier layers, C 0.0003"): a gap between the sets, so that the
        plot shows two paths rather than one curve jumping back up."""
        group = m.label.rsplit(", C ", 1)[0]
        if group != getattr(self, "group", "") and self.group_seen:
            for key in keys:
                xs, ys = self.data[key]
                if xs:
                    xs.append(xs[-1])
                    ys.append(float("nan"))
        self.group, self.group_seen = group, True

    def add_epoch(self, m: EpochMetrics) -> None:
        if m.strategy:
            if not self.race:
                self._start_race()
            if m.label:
                self._break(m, [f"race:{m.strategy}:{what}" for what in ("loss", "acc")])
            for what, y in (("loss", m.val_loss), ("acc", m.val_accuracy)):
                if y == y:
                    xs, ys = self.data[f"race:{m.strategy}:{what}"]
                    xs.append(m.elapsed)
                    ys.append(y)
            self.dirty = True
            return
        if m.label:
            self._break(m, ["train_loss", "val_loss", "train_acc", "val_acc"])
        for key, y in (
            ("train_loss", m.train_loss),
            ("val_loss", m.val_loss),
            ("train_acc", m.train_accuracy),
            ("val_acc", m.val_accuracy),
        ):
            if y == y:  # skip NaN (no validation split)
                self.data[key][0].append(float(m.epoch))
                self.data[key][1].append(y)
        self.dirty = True

    def point_count(self) -> int:
        return sum(sum(1 for v in ys if v == v) for _, ys in self.data.values())  # (not the gaps between sets)

    def redraw(self) -> None:
        if not self.dirty:
            return
        for key, curve in self.curves.items():
            xs, ys = self.data[key]
            if not key.endswith("_live"):
                # Epoch markers only while they can be told apart: 4 x 200 markers made each repaint ~20 ms longer
                # (50 -> 22-26 ms per repaint on a 2-core CPU, measured), which the event loop felt while training.
                symbol = "o" if len(xs) <= self.MAX_MARKERS else None
                if curve.opts["symbol"] != symbol:
                    curve.setSymbol(symbol)
            curve.setData(xs, ys)
        self.dirty = False
        self.updates += 1
