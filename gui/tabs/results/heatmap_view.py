"""*Where it looked*: an image as the network saw it, with its Grad-CAM heatmap laid over it (a toggle)."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QObject, Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import QCheckBox, QDialog, QLabel, QVBoxLayout


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.55) -> np.ndarray:
    """RGB uint8: ``image`` blended with a colour map of ``heat`` (0-1) where the heat is."""
    import pyqtgraph as pg

    colours = pg.colormap.get("inferno").map(heat, mode="byte")[..., :3].astype(np.float32)
    alpha = (strength * np.sqrt(np.clip(heat, 0, 1)))[..., None]
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def to_pixmap(rgb: np.ndarray, size: int) -> QPixmap:
    rgb = np.ascontiguousarray(rgb)
    h, w, _ = rgb.shape
    img = QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888).copy()
    return QPixmap.fromImage(img).scaled(size, size, Qt.KeepAspectRatio, Qt.SmoothTransformation)


class HeatmapDialog(QDialog):
    """Non-modal: the window keeps working while the heatmap is computed in the background."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Where the model looked")
        lay = QVBoxLayout(self)
        self.caption = QLabel("")
        self.caption.setWordWrap(True)
        self.picture = QLabel()
        self.picture.setAlignment(Qt.AlignCenter)
        self.picture.setMinimumSize(448, 448)
        self.toggle = QCheckBox("Show the heatmap (bright: what raised the score of this class most)")
        self.toggle.setChecked(True)
        self.toggle.toggled.connect(self._draw)
        for w in (self.caption, self.picture, self.toggle):
            lay.addWidget(w)
        self.result = None

    def computing(self, path: str) -> None:
        self.result = None
        self.caption.setText(f"Computing the heatmap of {path} …")
        self.picture.clear()
        self.show()
        self.raise_()

    def show_result(self, res) -> None:
        if res.cancelled:
            return
        self.result = res
        self.caption.setText(
            f"<b>{res.path}</b><br>Predicted <b>{res.prediction}</b> ({res.confidence:.0%}); "
            f"heatmap for <b>{res.target}</b>."
        )
        self._draw()

    def show_failure(self, message: str, details: str = "") -> None:
        self.caption.setText(f"No heatmap: {message}")

    def shown_image(self) -> np.ndarray | None:
        """What the picture shows now (RGB uint8), or None while computing."""
        r = self.result
        if r is None:
            return None
        return overlay(r.image, r.heat) if self.toggle.isChecked() else r.image

    def _draw(self) -> None:
        rgb = self.shown_image()
        if rgb is not None:
            self.picture.setPixmap(to_pixmap(rgb, 448))


class Heatmaps(QObject):
    """*Where it looked…* for a tab: one dialog, the heatmap computed in its own lane (training or prediction may be
    running), on the session's device."""

    def __init__(self, session, parent) -> None:
        super().__init__(parent)
        self.session, self.parent_widget = session, parent
        self.dialog: HeatmapDialog | None = None

    def explain(self, run_dir: str, path: str) -> None:
        from engine.predict.heatmap import HeatmapConfig, heatmap
        from gui.jobs.controller import HEATMAP

        if self.dialog is None:
            self.dialog = HeatmapDialog(self.parent_widget.window())
        self.dialog.computing(path)
        cfg = HeatmapConfig(run_dir, path, device=self.session.get("device"))
        self.session.jobs.start(HEATMAP, heatmap, cfg, done=self.dialog.show_result, failed=self.dialog.show_failure)
