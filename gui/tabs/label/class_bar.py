"""The Label tab's row of class buttons ("1 cat (12)"): a click labels the selected thumbnails with that class."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QPushButton, QScrollArea, QWidget


class ClassBar(QScrollArea):
    """Its own row that scrolls sideways: ten classes of clothing in the tool bar above made the window 1,420 px
    wide, wider than the screen. Hidden while there is no class."""

    chosen = Signal(str)  # a class's button was clicked

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        row = QWidget()
        self.buttons = QHBoxLayout(row)
        self.buttons.setContentsMargins(0, 0, 0, 0)
        self.setWidget(row)
        self.setVisible(False)

    def show_classes(self, classes: list[str], counts: dict[str, int]) -> None:
        """One button per class, in order (the first nine carry their number key), with its count of labels."""
        while self.buttons.count():
            w = self.buttons.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        for i, c in enumerate(classes):
            key = f"{i + 1} " if i < 9 else ""
            b = QPushButton(f"{key}{c} ({counts.get(c, 0)})")
            b.clicked.connect(self._slot(c))
            self.buttons.addWidget(b)
        self.buttons.addStretch(1)
        self.setVisible(bool(classes))
        button = QPushButton("0").sizeHint().height()  # (the layout's own hint is not current until shown)
        self.setFixedHeight(button + self.horizontalScrollBar().sizeHint().height() + 2)

    def _slot(self, c: str):
        def clicked() -> None:
            self.chosen.emit(c)

        return clicked
