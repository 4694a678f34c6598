"""Run one engine job in a QThread and turn its callbacks into Qt signals (STYLE.md section 2, examples 4-5).

The worker is a parentless QObject moved to a QThread; ``thread.started -> worker.run``; when the job returns,
``finished``/``failed`` (or ``cancelled``) fire and the thread quits by itself. Cancel sets the engine's CancelToken
directly from the GUI thread (a queued slot would never run while ``run`` blocks). Widgets are never touched from the
worker thread.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from engine.events import (
    BatchMetrics,
    Callbacks,
    Cancelled,
    CancelToken,
    EngineError,
    EpochMetrics,
    PredictionRow,
    Progress,
)


class _SignalCallbacks(Callbacks):
    def __init__(self, worker: JobWorker) -> None:
        self.w = worker

    def on_log(self, message: str) -> None:
        self.w.log.emit(message)

    def on_progress(self, progress: Progress) -> None:
        self.w.progress.emit(progress)

    def on_train_batch_end(self, metrics: BatchMetrics) -> None:
        self.w.batch.emit(metrics)

    def on_train_epoch_end(self, metrics: EpochMetrics) -> None:
        self.w.epoch.emit(metrics)

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        self.w.predictions.emit(list(rows))


def lower_this_thread_priority() -> None:
    """Give the calling thread (a job thread and the PyTorch/decoding threads it starts, which inherit it; the
    thumbnail loader) a lower CPU priority than the GUI thread, so a busy 2-core machine still repaints promptly.
    Linux allows this per thread; elsewhere it is a no-op."""
    import os
    import sys
    import threading

    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError):
            pass


class JobWorker(QObject):
    """Calls ``fn(*args, callbacks=..., cancel=...)`` in its thread and reports through signals."""

    log = Signal(str)
    progress = Signal(object)
    batch = Signal(object)
    epoch = Signal(object)
    predictions = Signal(object)
    finished = Signal(object)  # the job's return value
    failed = Signal(str, str)  # user message, details
    cancelled = Signal()  # the job stopped because it was asked to (not a failure: no message to show)

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.cancel_token = CancelToken()

    @Slot()
    def run(self) -> None:
        lower_this_thread_priority()
        try:
            result = self.fn(*self.args, callbacks=_SignalCallbacks(self), cancel=self.cancel_token, **self.kwargs)
        except Cancelled:
            self.cancelled.emit()
        except EngineError as exc:
            self.failed.emit(str(exc), "")
        except MemoryError:
            self.failed.emit("Ran out of memory. Try a smaller batch size or fewer images.", traceback.format_exc())
        except Exception as exc:  # any bug or library error becomes a message; the app stays usable
            msg = str(exc)
            if "out of memory" in msg.lower():
                msg = "The GPU ran out of memory. Lower the batch size, or train on the CPU."
            else:
                msg = f"The job failed: {exc.__class__.__name__}: {msg[:300]}"
            self.failed.emit(msg, traceback.format_exc())
        else:
            self.finished.emit(result)


class Job(QObject):
    """Owns a worker and its thread. ``done`` fires once, after the thread has really finished.

    ``finished``/``failed``/``cancelled`` are the worker's, relayed in the GUI thread unless the job was superseded
    (``supersede()``: a newer job of the same kind replaced it), so a late result of an old folder scan never
    overwrites the newer one's.
    """

    done = Signal()
    finished = Signal(object)
    failed = Signal(str, str)
    cancelled = Signal()

    def __init__(self, worker: JobWorker, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker = worker
        self.superseded = False
        self.thread = QThread()
        self.thread.setObjectName(f"job-{getattr(worker.fn, '__name__', 'engine')}")
        worker.moveToThread(self.thread)
        self.thread.started.connect(worker.run)
        # Direct: the worker's own thread ends its event loop (QThread.quit is thread-safe). Queued to the GUI thread,
        # the quit never ran while the GUI thread sat in wait(), so closing the window during start-up's backbone
        # discovery hung for wait()'s whole 30 s.
        worker.finished.connect(self.thread.quit, Qt.DirectConnection)
        worker.failed.connect(self.thread.quit, Qt.DirectConnection)
        worker.cancelled.connect(self.thread.quit, Qt.DirectConnection)
        worker.finished.connect(self._finished)  # queued: these run in the GUI thread
        worker.failed.connect(self._failed)
        worker.cancelled.connect(self._cancelled)
        self.thread.finished.connect(self._cleanup)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self.worker.cancel_token.cancel()

    def supersede(self) -> None:
        """Cancel, and never relay this job's end."""
        self.superseded = True
        self.cancel()

    def is_running(self) -> bool:
        return self.thread.isRunning()

    def wait(self, ms: int = 30000) -> bool:
        return self.thread.wait(ms)

    @Slot(object)
    def _finished(self, result) -> None:
        if not self.superseded:
            self.finished.emit(result)

    @Slot(str, str)
    def _failed(self, message: str, details: str) -> None:
        if not self.superseded:
            self.failed.emit(message, details)

    @Slot()
    def _cancelled(self) -> None:
        if not self.superseded:
            self.cancelled.emit()

    @Slot()
    def _cleanup(self) -> None:
        self.worker.deleteLater()
        self.done.emit()


def start_job(parent: QObject, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
    """Create a job for ``fn``; connect its signals, then call ``job.start()``.

    Connect worker signals only to methods of QObjects that live in the GUI thread (never to a lambda): PySide
    runs a lambda in the emitting thread, and touching a widget from the worker thread crashes.
    """
    return Job(JobWorker(fn, *args, **kwargs), parent)
