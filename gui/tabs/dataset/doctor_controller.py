"""Check dataset, from the window's side: the doctor job with the training settings, then the map's t-SNE job, and
their results routed to the Dataset tab."""

from __future__ import annotations

import dataclasses
import os

from PySide6.QtCore import QObject

from engine.doctor.findings import DoctorConfig, MapConfig, doctor, tsne_map
from gui.jobs.controller import PROJECTION


class DatasetChecks(QObject):
    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window

    def start(self) -> None:
        """Check dataset: the doctor on the loaded folder with the training settings (backbone, split, cache)."""
        if self.w.busy():
            self.w.show_error("Another job is running: stop it or wait for it to finish.")
            return
        if self.w.dataset_tab.scanning or self.w.dataset_tab.dataset is None:
            self.w.show_error("Open an image folder first and wait until its classes are listed.")
            return
        cfg = self.w.train_config()
        run = self.w.results_tab.run_dir
        same = run and os.path.abspath(self.w.results_tab.data_folder() or "") == os.path.abspath(cfg.data)
        names = {f.name for f in dataclasses.fields(DoctorConfig)}
        doc = DoctorConfig(
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k in names}, run=run if same else None
        )
        d = self.w.dataset_tab
        d.scan_started(cfg.data, "Checking")
        self.w.start_main(
            d,
            doctor,
            doc,
            done=self._checked,
            failed=self.w.scan_failed,
            signals={"progress": d.scan_progress_update, "log": self.w.status_label.setText},
        )

    def _checked(self, res) -> None:
        self.w.last_result = res
        d = self.w.dataset_tab
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
        d.doctor_finished(res, note)
        if not res.cancelled and res.features is not None and len(res.features) >= 5:
            self.w.jobs.start(PROJECTION, tsne_map, MapConfig(res.features), done=self._mapped, failed=self._map_failed)

    def _mapped(self, coords) -> None:
        self.w.dataset_tab.show_map(coords, "placed by t-SNE (neighbours in the map are similar images)")

    def _map_failed(self, message: str, details: str) -> None:
        self.w.dataset_tab.map.caption.setText(f"The finer map could not be computed: {message}")
