"""The window's one state: the draft training config, the open folder and run, the lists kept between launches, and
the jobs. Tabs bind their widgets to its fields and start their work through it; nothing reads a setting from
another tab's widget.

Modelled on napari's evented ``ViewerModel`` (panels built from their slice of one model) and Orange's ``Setting``
attributes with ``ConcurrentWidgetMixin`` (a widget's busy/ready, cancel and failure written once):

* every ``TrainConfig`` field the window sets is a field here; ``set(name, value)`` emits ``changed(name, value)``
  when the value changes, and views derived from fields subscribe with :meth:`follow` (the estimate, the advice,
  the cross-fitting note follow every field they read);
* settings are written on change, debounced (``SAVE_AFTER_MS``), under the same keys as before (``train/<field>``),
  so a crash keeps them;
* :meth:`start_main` is the one way to run the user's work (training, prediction, export, sorting, the check,
  opening a pile): the refusal "another job is running" is said here once, ``busy_changed`` drives every Start/Stop
  button, and :meth:`stop` calls the owner's own ``stopping`` hook, given at start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from PySide6.QtCore import QObject, QSettings, QTimer, Signal

from engine.config import TrainConfig
from engine.paths import default_runs_dir
from engine.runs import new_run_name
from gui.jobs.controller import MAIN, JobController
from gui.settings import load_values, save_values

SAVE_AFTER_MS = 400
BUSY = "Another job is running: stop it or wait for it to finish."
# TrainConfig fields the window does not hold as settings: the folder comes from the open dataset, the run folder
# is made per run
PER_RUN = ("data", "out", "overwrite", "exclude", "labels")
FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_RUN]
WINDOW_DEFAULTS = {"mode": "auto"}  # where the window starts differently from the command line


class Session(QObject):
    changed = Signal(str, object)  # a config field's name and new value
    dataset_changed = Signal(object)  # the open Dataset (None: none open)
    run_changed = Signal(str)  # the run shown in Results and used by Predict
    runs_dir_changed = Signal(str)  # where runs are saved (the Results tab lists them)
    busy_changed = Signal(bool)  # the main lane started or ended a job
    error = Signal(str, str)  # a message for the user (and details), shown by the window
    status = Signal(str)  # a line for the status bar
    show_tab = Signal(object)  # a tab asks to be shown (the window brings it to the front)
    trained = Signal(object)  # a training job's FitResult (the Results tab shows it)
    label_requested = Signal(str)  # a folder to open in the Label tab (a pile with no class folders)
    open_labelled = Signal(str, str)  # a folder and the labels file its classes come from (Train on these labels)

    def __init__(self, settings: QSettings | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        defaults = TrainConfig()
        self.values: dict[str, Any] = {name: getattr(defaults, name) for name in FIELDS} | WINDOW_DEFAULTS
        self.runs_dir = default_runs_dir()
        self.dataset = None
        self.scanning = False  # a folder is being scanned or checked (what Start would train is not settled)
        self.run_dir = ""
        self.run_data = ""  # the folder the open run was trained on
        self.recent: list[str] = []
        self.excludes: dict[str, str] = {}  # folder -> its exclude list (train's --exclude)
        self.labels_for: dict[str, str] = {}  # folder -> the labels file its classes come from (train's --labels)
        self.jobs = JobController(self)
        self.owner = None  # the stopping hook of whoever runs the main lane's job
        self.last_result = None  # the last job's result (tests and tools read it)
        self.last_error = ""
        self._save_timer = QTimer(self, singleShot=True, interval=SAVE_AFTER_MS)
        self._save_timer.timeout.connect(self.save)
        self.restore()

    # ------------------------------------------------------------------------------------------------ fields
    def get(self, name: str) -> Any:
        return self.values[name]

    def set(self, name: str, value: Any) -> None:
        """Set a config field; views bound to it and derived from it follow, and the settings are saved soon."""
        if name not in self.values:
            raise KeyError(name)
        if self.values[name] == value:
            return
        self.values[name] = value
        self.changed.emit(name, value)
        self.save_soon()

    def update(self, values: dict) -> None:
        for name, value in values.items():
            if name in self.values:
                self.set(name, value)

    def follow(self, names: Iterable[str], slot: Callable[[], None], dataset: bool = True) -> None:
        """Call ``slot()`` whenever one of the fields ``names`` changes (and, with ``dataset``, when another folder
        opens): how a derived view stays true to what it is derived from."""
        wanted = set(names)
        self.changed.connect(lambda name, _value: slot() if name in wanted else None)
        if dataset:
            self.dataset_changed.connect(lambda _ds: slot())

    def train_config(self, out: str | None = None) -> TrainConfig:
        """The training config the window describes; ``out`` defaults to a new run folder in the runs folder."""
        ds = self.dataset
        data = ds.root if ds is not None else ""
        name = new_run_name(self.get("backbone"), self.get("mode"))
        out = out or os.path.join(self.runs_dir or default_runs_dir(), name)
        return TrainConfig(
            data=data, out=out, exclude=self.exclude_for(data) if data else None,
            labels=ds.labels_file if ds is not None else None, **self.values,
        )  # fmt: skip

    def apply(self, cfg: TrainConfig) -> None:
        """Take every field of ``cfg`` (its folder's exclude list and labels file are remembered for it)."""
        self.update({name: getattr(cfg, name) for name in FIELDS})
        if cfg.data:
            self.remember(self.excludes, cfg.data, cfg.exclude)
            self.remember(self.labels_for, cfg.data, cfg.labels)

    # ------------------------------------------------------------------------------------------------ folder, run
    def set_dataset(self, ds) -> None:
        self.dataset = ds
        if ds is not None:
            self.add_recent(ds.root)
        self.dataset_changed.emit(ds)

    def set_run(self, run_dir: str, data: str = "") -> None:
        self.run_dir, self.run_data = run_dir, data
        self.run_changed.emit(run_dir)

    def exclude_for(self, folder: str) -> str | None:
        return self.excludes.get(os.path.abspath(folder))

    def labels_file_for(self, folder: str) -> str | None:
        return self.labels_for.get(os.path.abspath(folder))

    def remember(self, table: dict[str, str], folder: str, path: str | None) -> None:
        if path:
            table[os.path.abspath(folder)] = os.path.abspath(path)
        else:
            table.pop(os.path.abspath(folder), None)
        self.save_soon()

    def add_recent(self, folder: str) -> None:
        self.recent = [folder] + [r for r in self.recent if r != folder][:9]
        self.save_soon()

    def set_runs_dir(self, folder: str) -> None:
        if folder != self.runs_dir:
            self.runs_dir = folder
            self.runs_dir_changed.emit(folder)
            self.save_soon()

    # ------------------------------------------------------------------------------------------------ jobs
    def busy(self) -> bool:
        return self.jobs.busy(MAIN)

    def start_main(
        self,
        fn: Callable[..., Any],
        *args: Any,
        done: Callable,
        failed: Callable,
        stopping: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> bool:
        """Run the user's work in the main lane, or refuse (once, here) while another such job runs. ``stopping``:
        called when the user stops this job; the rest as ``JobController.start`` (``on_log``, ``on_progress``,
        ``on_batch``, ``on_epoch``, ``on_predictions`` connect the job's reports)."""
        if self.busy():
            self.fail(BUSY)
            return False
        self.owner = stopping
        job = self.jobs.start(MAIN, fn, *args, done=done, failed=failed, **kwargs)
        job.done.connect(self._ended)
        self.busy_changed.emit(True)
        return True

    def _ended(self) -> None:
        self.owner = None
        self.busy_changed.emit(False)

    def stop(self) -> None:
        """Stop the user's job (cooperatively: its best so far is kept)."""
        if self.jobs.cancel(MAIN) and self.owner is not None:
            self.owner()

    def fail(self, message: str, details: str = "") -> None:
        self.last_error = message
        self.error.emit(message, details)

    def finished(self, result) -> None:
        self.last_result = result

    # ------------------------------------------------------------------------------------------------ settings
    def save_soon(self) -> None:
        if self.settings is not None:
            self._save_timer.start()

    def save(self) -> None:
        s = self.settings
        if s is None:
            return
        save_values(s, self.values)
        s.setValue("train/runs_dir", self.runs_dir)
        s.setValue("data/recent", self.recent)
        s.setValue("data/excludes", json.dumps(self.excludes))
        s.setValue("data/labels", json.dumps(self.labels_for))
        s.sync()  # QSettings writes its file via a temporary file and rename

    def restore(self) -> None:
        s = self.settings
        if s is None:
            return
        for name, value in load_values(s, FIELDS).items():
            self.values[name] = value
        self.runs_dir = str(s.value("train/runs_dir", default_runs_dir()) or default_runs_dir())
        recent = s.value("data/recent", []) or []
        self.recent = [recent] if isinstance(recent, str) else [r for r in recent if isinstance(r, str)][:10]
        for key, attr in (("data/excludes", "excludes"), ("data/labels", "labels_for")):
            try:
                setattr(self, attr, dict(json.loads(str(s.value(key, "{}")))))
            except (ValueError, TypeError):
                setattr(self, attr, {})
