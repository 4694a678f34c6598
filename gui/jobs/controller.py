"""Starting, stopping and routing engine jobs: the one place the window goes through to run anything.

Jobs run in lanes: ``"main"`` (training, prediction, export, opening a folder to label: one at a time, the user's
work), ``"scan"`` (the Dataset tab's folder scan: a new one supersedes the old), ``"discovery"`` (start-up's backbone
list), ``"heatmap"`` (one image explained), ``"projection"`` (the dataset map's t-SNE) and ``"label"`` (a labelling
round on embeddings in memory): a new request supersedes the old, and they may run beside a training. Each job's end
goes to the handlers given when it started, so a failure or a stop reaches only the tab whose job it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject

from gui.jobs.worker import Job, start_job

MAIN, SCAN, DISCOVERY, HEATMAP, PROJECTION, LABEL = "main", "scan", "discovery", "heatmap", "projection", "label"


class JobController(QObject):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.lanes: dict[str, Job | None] = {lane: None for lane in (MAIN, SCAN, DISCOVERY, HEATMAP, PROJECTION, LABEL)}

    def job(self, lane: str = MAIN) -> Job | None:
        return self.lanes[lane]

    def busy(self, lane: str = MAIN) -> bool:
        job = self.lanes[lane]
        return job is not None and job.is_running()

    def start(
        self,
        lane: str,
        fn: Callable[..., Any],
        *args: Any,
        done: Callable,
        failed: Callable,
        cancelled: Callable | None = None,
        on_log: Callable[[str], None] | None = None,
        on_progress: Callable | None = None,
        on_batch: Callable | None = None,
        on_epoch: Callable | None = None,
        on_predictions: Callable | None = None,
        **kwargs: Any,
    ) -> Job:
        """Run ``fn(*args, callbacks=..., cancel=..., **kwargs)`` in a new thread.

        ``done(result)``, ``failed(message, details)`` and ``cancelled()`` receive its end (bound methods of
        GUI-thread objects, never lambdas: see ``start_job``); ``on_log``, ``on_progress``, ``on_batch``, ``on_epoch``
        and ``on_predictions`` receive the engine's reports (engine/events.py) the same way. A job still running in
        the lane is superseded (cancelled, its end never delivered); the caller refuses first where that is wrong.
        """
        hooks = {"log": on_log, "progress": on_progress, "batch": on_batch, "epoch": on_epoch,
                 "predictions": on_predictions}  # fmt: skip
        old = self.lanes[lane]
        if old is not None and old.is_running():
            old.supersede()
            old.wait(5000)
        job = start_job(self, fn, *args, **kwargs)
        for name, slot in hooks.items():
            if slot is not None:
                getattr(job.worker, name).connect(slot)
        job.finished.connect(done)
        job.failed.connect(failed)
        if cancelled is not None:
            job.cancelled.connect(cancelled)
        self.lanes[lane] = job
        job.start()
        return job

    def cancel(self, lane: str = MAIN) -> bool:
        """Ask the lane's job to stop (cooperatively, within a batch); False when none is running."""
        if not self.busy(lane):
            return False
        self.lanes[lane].cancel()
        return True

    def wait(self, lane: str, ms: int) -> bool:
        job = self.lanes[lane]
        return job is None or job.wait(ms)

    def running(self) -> list[Job]:
        return [j for j in self.lanes.values() if j is not None and j.is_running()]
