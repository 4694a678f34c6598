"""Dataset > Map: every image as a point placed by its embedding (PCA at once, then t-SNE), coloured by class, with
the doctor's findings ringed. Hovering shows the picture; a click selects it in the image grid."""

from __future__ import annotations

import html
import os

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def _tip(x: float, y: float, data) -> str:
    path = data or ""
    return f"<img src='{html.escape(path)}' width='128'><br>{html.escape(os.path.basename(path))}" if path else ""


class DatasetMap(QWidget):
    image_clicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.caption = QLabel("Check dataset draws a map of all images here: similar images lie close together.")
        self.caption.setWordWrap(True)
        lay.addWidget(self.caption)
        self.plot = pg.PlotWidget()
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.plot.addLegend(offset=(10, 10))
        lay.addWidget(self.plot, 1)
        self.scatter: pg.ScatterPlotItem | None = None
        self.paths: list[str] = []
        self.labels = np.zeros(0, np.int64)
        self.flagged: set[str] = set()
        self.classes: list[str] = []

    def show_points(
        self, coords: np.ndarray, paths: list[str], labels, classes: list[str], flagged: set[str], what: str
    ) -> None:
        """Draw (or redraw with new coordinates: the t-SNE map replaces the PCA one)."""
        self.paths, self.labels, self.classes, self.flagged = list(paths), np.asarray(labels), classes, flagged
        self.plot.clear()
        brushes = [pg.mkBrush(*PALETTE[int(y) % len(PALETTE)], 170) for y in self.labels]
        ring = pg.mkPen((0, 0, 0), width=2)
        pens = [ring if p in flagged else pg.mkPen(None) for p in self.paths]
        sizes = [11 if p in flagged else 6 for p in self.paths]
        self.scatter = pg.ScatterPlotItem(
            x=coords[:, 0],
            y=coords[:, 1],
            data=self.paths,
            brush=brushes,
            pen=pens,
            size=sizes,
            hoverable=True,
            hoverSize=14,
            tip=_tip,
        )
        self.scatter.sigClicked.connect(self._clicked)
        self.plot.addItem(self.scatter)
        legend = self.plot.getPlotItem().legend
        legend.clear()
        for i, c in enumerate(classes):  # one entry per class (a sample item that is not plotted)
            legend.addItem(pg.ScatterPlotItem(brush=pg.mkBrush(*PALETTE[i % len(PALETTE)]), pen=None, size=9), c)
        self.caption.setText(
            f"{len(paths)} images, {what}; ringed: the doctor's findings. Hover for the picture, "
            "click to select it in Images."
        )

    def _clicked(self, item, points, ev=None) -> None:
        if len(points):
            self.image_clicked.emit(points[0].data())
