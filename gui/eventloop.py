"""Wait for a condition while the real Qt event loop runs (for the self-test and the measuring tools).

A ``processEvents()`` + ``sleep()`` loop would distort what they measure (stalls, streaming), so this runs a
``QEventLoop`` and polls ``cond`` from a 20 ms timer.
"""
from __future__ import annotations

import time
from typing import Callable


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
