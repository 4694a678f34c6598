"""Wait for a condition while the real Qt event loop runs, and measure how long it stalls (for the self-test and
the measuring tools in tools/).

A ``processEvents()`` + ``sleep()`` loop would distort what they measure (stalls, streaming), so this runs a
``QEventLoop`` and polls ``cond`` from a 20 ms timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QElapsedTimer, QObject, QTimer


def wait_until(cond: Callable[[], bool], timeout_s: float = 900.0) -> bool:
    """Run the event loop until ``cond()`` is true or ``timeout_s`` passes; returns ``cond()``."""
    from PySide6.QtCore import QEventLoop, QTimer

    start = time.perf_counter()
    if cond():
        return True
    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: (cond() or time.perf_counter() - start > timeout_s) and loop.quit())
    timer.start()
    loop.exec()
    timer.stop()
    return cond()


class StallMeter(QObject):
    """A 10 ms timer that records the longest gap between its ticks: how long the event loop was blocked."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.timer = QTimer(self)
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.clock = QElapsedTimer()
        self.worst_ms = 0.0

    def start(self) -> None:
        self.worst_ms = 0.0
        self.clock.start()
        self.timer.start()

    def stop(self) -> float:
        self.timer.stop()
        return self.worst_ms

    def _tick(self) -> None:
        gap = self.clock.restart()
        self.worst_ms = max(self.worst_ms, max(0.0, gap - 10.0))
