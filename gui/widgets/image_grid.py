"""Small shared widgets: a lazily loaded image grid and helpers to open/reveal files."""

from __future__ import annotations

import os
import subprocess
import sys

from PySide6.QtCore import QAbstractListModel, QModelIndex, QSize, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QListView, QWidget

from gui.widgets.thumbs import ThumbnailLoader


def open_file(path: str) -> None:
    QDesktopServices.openUrl(QUrl.fromLocalFile(path))


def reveal_in_file_manager(path: str) -> None:
    """Show the file in Explorer/Finder (selected where the platform allows), else open its folder."""
    try:
        if sys.platform.startswith("win"):
            subprocess.Popen(["explorer", "/select,", os.path.normpath(path)])
            return
        if sys.platform == "darwin":
            subprocess.Popen(["open", "-R", path])
            return
    except OSError:
        pass
    QDesktopServices.openUrl(QUrl.fromLocalFile(os.path.dirname(path)))


class ImageListModel(QAbstractListModel):
    """Items of (path, caption, tooltip); icons come from a shared ThumbnailLoader when the view asks."""

    def __init__(self, loader: ThumbnailLoader, parent=None) -> None:
        super().__init__(parent)
        self.loader = loader
        self.items: list[tuple[str, str, str]] = []
        self.row_of: dict[str, list[int]] = {}
        loader.ready.connect(self._thumb_ready)

    def set_items(self, items: list[tuple[str, str, str]]) -> None:
        self.beginResetModel()
        self.items = list(items)
        self.row_of = {}
        for i, (p, _, _) in enumerate(self.items):
            self.row_of.setdefault(p, []).append(i)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 (Qt's own signature; the index is never mutated)
        return 0 if parent.isValid() else len(self.items)

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        path, caption, tip = self.items[index.row()]
        if role == Qt.DisplayRole:
            return caption
        if role == Qt.DecorationRole:
            return self.loader.icon(path)  # only rows the view paints are ever loaded
        if role == Qt.ToolTipRole:
            return tip or path
        if role == Qt.UserRole:
            return path
        return None

    def _thumb_ready(self, path: str) -> None:
        for r in self.row_of.get(path, []):
            idx = self.index(r)
            self.dataChanged.emit(idx, idx, [Qt.DecorationRole])


class ImageGrid(QListView):
    """Icon-mode grid with uniform item sizes (smooth scrolling on tens of thousands of items)."""

    opened = Signal(str)

    def __init__(self, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setViewMode(QListView.IconMode)
        self.setResizeMode(QListView.Adjust)
        self.setMovement(QListView.Static)
        self.setUniformItemSizes(True)
        self.setLayoutMode(QListView.Batched)
        self.setBatchSize(200)
        self.setIconSize(QSize(loader.size, loader.size))
        self.setGridSize(QSize(loader.size + 24, loader.size + 40))
        self.setWordWrap(False)
        self.setTextElideMode(Qt.ElideMiddle)
        self.setSelectionMode(QListView.ExtendedSelection)
        self.model_ = ImageListModel(loader, self)
        self.setModel(self.model_)
        self.doubleClicked.connect(lambda idx: self.opened.emit(idx.data(Qt.UserRole)))
        self.opened.connect(open_file)

    def set_items(self, items: list[tuple[str, str, str]]) -> None:
        self.model_.set_items(items)

    def selected_paths(self) -> list[str]:
        return [i.data(Qt.UserRole) for i in self.selectedIndexes()]
