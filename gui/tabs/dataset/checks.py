"""Check dataset, the Dataset tab's own job: the doctor with the session's settings, then the map's t-SNE, and the
fixes a finding offers (exclude, move to class, undo), each followed by a fresh scan of the folder."""

from __future__ import annotations

import dataclasses
import html
import os

from PySide6.QtCore import QObject

from engine.data.edits import add_to_exclude_list, exclude_list_for, move_to_class, undo_last_move
from engine.doctor.findings import DoctorConfig, MapConfig, doctor, pca_2d, tsne_map
from engine.events import EngineError
from gui.jobs.controller import PROJECTION


class DatasetChecks(QObject):
    """Runs the doctor for ``tab`` (a DatasetTab) and applies what its findings offer."""

    def __init__(self, tab) -> None:
        super().__init__(tab)
        self.tab = tab
        self.session = tab.session
        self.checked = None  # the last DoctorResult
        d = tab.doctor
        d.exclude_requested.connect(self.exclude)
        d.move_requested.connect(self.move)
        d.undo_requested.connect(self.undo_move)

    def start(self) -> None:
        """The doctor on the open folder with the session's backbone, split and cache (the open run's accuracy is
        re-scored without leaked images when it was trained on this folder)."""
        s = self.session
        if s.scanning or s.dataset is None:
            s.fail("Open an image folder first and wait until its classes are listed.")
            return
        cfg = s.train_config()
        same = s.run_dir and os.path.abspath(s.run_data or "") == os.path.abspath(cfg.data)
        names = {f.name for f in dataclasses.fields(DoctorConfig)}
        doc = DoctorConfig(
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k in names}, run=s.run_dir if same else None
        )
        if s.start_main(doctor, doc, done=self._checked, failed=self._failed, stopping=self.tab.stopping,
                        on_progress=self.tab.scan_progress_update, on_log=s.status.emit):  # fmt: skip
            self.tab.scan_started(cfg.data, "Checking")

    def _failed(self, message: str, details: str) -> None:
        self.tab.check_ended()
        self.tab.status.setText(html.escape(message))
        self.session.fail(message, details)

    def _checked(self, res) -> None:
        self.session.finished(res)
        t = self.tab
        t.check_ended()
        if res.cancelled:
            t.status.setText("Check stopped; nothing changed.")
            return
        t.status.setText(f"<b>{html.escape(res.dataset.root)}</b> checked: see the Check and Map views.")
        t.doctor.show_result(res, self._note(res))
        t.views.setCurrentWidget(t.doctor)
        self.checked = res
        self.show_map(pca_2d(res.features), "placed by their two principal components (a finer map is computed)")
        if res.features is not None and len(res.features) >= 5:
            self.session.jobs.start(
                PROJECTION, tsne_map, MapConfig(res.features), done=self._mapped, failed=self._map_failed
            )

    @staticmethod
    def _note(res) -> str:
        note = ""
        if res.leaked_eval:
            note = f"{res.leaked_eval} validation/test image(s) have a copy in train, which flatters the accuracy."
            r = res.rescored
            if r and r["accuracy_without_leaks"] is not None:
                note += (
                    f" The open run's validation accuracy {100 * r['accuracy']:.1f}% is "
                    f"{100 * r['accuracy_without_leaks']:.1f}% without them."
                )
        if res.label_note:
            note = f"{note} {res.label_note}".strip()
        elif res.label_precision is not None and res.counts()["label"]:
            note = (
                f"{note} About {100 * res.label_precision:.0f}% of the {res.counts()['label']} images listed as "
                "probably in the wrong class are estimated to be mislabelled on this folder; look before moving."
            ).strip()
        return note

    def _mapped(self, coords) -> None:
        self.show_map(coords, "placed by t-SNE (neighbours in the map are similar images)")

    def _map_failed(self, message: str, details: str) -> None:
        self.tab.map.caption.setText(f"The finer map could not be computed: {message}")

    def show_map(self, coords, what: str) -> None:
        res = self.checked
        labels = [s.label for s in res.dataset.samples]
        self.tab.map.show_points(coords, res.paths, labels, res.dataset.classes, {f.path for f in res.findings}, what)

    # ------------------------------------------------------------------------------------------------ fixes
    def exclude(self, paths: list[str]) -> None:
        """Leave ``paths`` out of training: the folder's exclude list grows (files stay), the scan updates."""
        s = self.session
        folder = s.dataset.root
        csv_path = s.exclude_for(folder) or exclude_list_for(folder)
        n = add_to_exclude_list(csv_path, paths)
        s.remember(s.excludes, folder, csv_path)
        self.tab.doctor.resolved(paths, f"{len(paths)} excluded ({n} on this folder's exclude list)")
        self.tab.request_scan(folder)

    def move(self, path: str, cls: str) -> None:
        text = f"Move {path} into the '{cls}' folder? (Undo last move puts it back.)"
        if not self.tab.confirm("Move to class", text):
            return
        root = self.session.dataset.root
        try:
            dst = move_to_class(root, path, cls)
        except (EngineError, OSError) as exc:
            self.tab.doctor.summary.setText(f"Could not move it: {exc}")
            return
        self.tab.doctor.resolved([path], f"moved to {dst}")
        self.tab.request_scan(root)

    def undo_move(self) -> None:
        try:
            last = undo_last_move()
        except EngineError as exc:
            self.tab.doctor.summary.setText(str(exc))
            return
        self.tab.doctor.summary.setText("Nothing to undo." if last is None else f"Put back: {last['from']}")
        if last is not None and self.session.dataset is not None:
            self.tab.request_scan(self.session.dataset.root)
