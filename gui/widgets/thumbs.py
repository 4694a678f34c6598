"""Lazy thumbnails: decoded at thumbnail size in a QThreadPool, turned into icons on the GUI thread, cached."""

from __future__ import annotations

from collections import OrderedDict

from PySide6.QtCore import QObject, QRunnable, QSize, Qt, QThreadPool, Signal
from PySide6.QtGui import QColor, QIcon, QImage, QImageReader, QPainter, QPixmap

from gui.jobs.worker import lower_this_thread_priority

THUMB = 96


class _Emitter(QObject):
    loaded = Signal(str, QImage)


class _LoadThumb(QRunnable):
    def __init__(self, path: str, size: int, emitter: _Emitter) -> None:
        super().__init__()
        self.path, self.size, self.emitter = path, size, emitter

    def run(self) -> None:
        # Below the GUI thread: thumbnails decoding at full priority beside a job delayed repaints by ~100 ms
        # (stall traces while a training job scanned its folder).
        lower_this_thread_priority()
        img = read_image(self.path, self.size)
        self.emitter.loaded.emit(self.path, QImage() if img.isNull() else _on_square(img, self.size))


def read_image(path: str, size: int) -> QImage:
    """``path`` scaled to fit ``size`` px (null when unreadable), as the engine sees it: Qt scales a 16-bit grey
    image by 65535, so the 12-bit values of a scan showed nearly black; those go through the engine's decoder."""
    reader = QImageReader(path)
    if reader.imageFormat() != QImage.Format_Grayscale16:  # (known from the header, before decoding)
        reader.setAutoTransform(True)  # EXIF orientation
        src = reader.size()
        if src.isValid() and src.width() > 0 and src.height() > 0:
            # Decode straight to thumbnail size (JPEG decoders scale while decoding): fast on large photos.
            reader.setScaledSize(src.scaled(size, size, Qt.KeepAspectRatio))
        return reader.read()
    from engine.data.folder import open_rgb

    try:
        im = open_rgb(path)
    except Exception:
        return QImage()
    scale = size / max(im.width, im.height)  # fitted to size either way, as Qt's scaled read does
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    return QImage(im.tobytes(), im.width, im.height, 3 * im.width, QImage.Format_RGB888).copy()


def _on_square(img: QImage, size: int) -> QImage:
    """The thumbnail centred on a transparent size x size canvas. Every icon then has the same size, so grids with
    uniform item sizes (laid out from one item) leave room for every caption: a wide first thumbnail once made the
    rows too short and clipped the captions of taller ones."""
    if img.width() > size or img.height() > size:  # a decoder that ignored the scaled size
        img = img.scaled(size, size, Qt.KeepAspectRatio, Qt.SmoothTransformation)
    canvas = QImage(size, size, QImage.Format_ARGB32_Premultiplied)
    canvas.fill(Qt.transparent)
    painter = QPainter(canvas)  # painting on a QImage is allowed off the GUI thread
    painter.drawImage((size - img.width()) // 2, (size - img.height()) // 2, img)
    painter.end()
    return canvas


class ThumbnailLoader(QObject):
    """``icon(path)`` returns a cached icon or a placeholder and loads the real one in the background;
    ``ready(path)`` fires when it arrives."""

    ready = Signal(str)

    def __init__(self, parent: QObject | None = None, size: int = THUMB, capacity: int = 4000) -> None:
        super().__init__(parent)
        self.size = size
        self.capacity = capacity
        self.cache: OrderedDict[str, QIcon] = OrderedDict()
        self.pending: set[str] = set()
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self.emitter = _Emitter()
        self.emitter.loaded.connect(self._on_loaded)
        ph = QPixmap(QSize(size, size))
        ph.fill(QColor(225, 225, 225))
        self.placeholder = QIcon(ph)
        broken = QPixmap(QSize(size, size))
        broken.fill(QColor(240, 200, 200))
        self.broken = QIcon(broken)

    def icon(self, path: str) -> QIcon:
        icon = self.cache.get(path)
        if icon is not None:
            self.cache.move_to_end(path)
            return icon
        if path not in self.pending:
            self.pending.add(path)
            self.pool.start(_LoadThumb(path, self.size, self.emitter))
        return self.placeholder

    def _on_loaded(self, path: str, img: QImage) -> None:
        self.pending.discard(path)
        self.cache[path] = self.broken if img.isNull() else QIcon(QPixmap.fromImage(img))
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        self.ready.emit(path)

    def shutdown(self) -> None:
        self.pool.clear()
        self.pool.waitForDone(3000)
