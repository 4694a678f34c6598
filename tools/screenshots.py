"""Drive the real app on real data and save a screenshot of each tab (run under xvfb-run for a real X window).

    xvfb-run -s "-screen 0 1280x800x24" python tools/screenshots.py ../shared/datasets/flowers \
        ../shared/datasets/hymenoptera docs/screenshots

Also prints each job's summary line.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

from PySide6.QtWidgets import QApplication


def wait(app, cond, timeout=900.0):
    from gui.jobs.eventloop import wait_until

    t = time.time()
    if not wait_until(cond, timeout):
        raise TimeoutError
    return time.time() - t


def browse_and_check(app, w, browse_data, shot) -> None:
    """Shots 1, 6 and 7: the Dataset tab on the browse folder, its check and its map."""
    w.scan_folder(os.path.abspath(browse_data))
    s = wait(app, lambda: w.dataset_tab.dataset is not None)
    print(f"scanned {len(w.dataset_tab.dataset.samples)} images in {s:.1f} s")
    wait(app, lambda: len(w.loader.pending) == 0, 60)
    shot("1-dataset.png")
    d = w.dataset_tab  # Check dataset on the same folder: findings, then the map (PCA, then t-SNE)
    d.check_btn.click()
    wait(app, lambda: d.doctor.summary.text().startswith("Checked") and not w.busy())  # (busy starts a moment later)
    print("check:", d.doctor.summary.text())
    has_labels = re.search(r"<b>\d+</b> label", d.doctor.summary.text())  # (a folder may have none)
    shown = "label" if has_labels else "near-duplicate"
    d.doctor.filter.setCurrentIndex(d.doctor.filter.findData(shown))
    if d.doctor.table.rowCount():
        d.doctor.table.selectRow(0)
    wait(app, lambda: len(w.loader.pending) == 0, 60)
    shot("6-check.png")
    wait(app, lambda: "t-SNE" in d.map.caption.text(), 600)
    d.views.setCurrentWidget(d.map)
    shot("7-map.png")
    d.views.setCurrentIndex(0)


def label_pile(app, w, folder, shot) -> None:
    """The Label tab on ``folder`` read as an unsorted pile; a simulated user answers six batches with each image's
    own folder name (as the labelling benchmark does), then accepts nothing: the shot shows the suggestions."""
    if not os.path.isdir(folder):
        return
    t = w.label_tab
    os.environ["TRANSFER_STUDIO_DATA"] = tempfile.mkdtemp(prefix="ts-shots-labels-")  # (labels file: not the user's)
    w.start_labelling(folder)
    wait(app, lambda: t.pile is not None and bool(t.batch) and not t.round_running)
    for _ in range(6):  # (six batches: past the five random checks the estimate starts at, on hymenoptera)
        for p in list(t.batch):
            t.assign(os.path.basename(os.path.dirname(p)), [p])
        wait(app, lambda: not t.round_running and not t.round_pending)
    wait(app, lambda: len(w.loader.pending) == 0, 60)
    shot("10-label.png")


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    browse_data, train_data, out = sys.argv[1:]
    for d in (browse_data, train_data):
        if not os.path.isdir(d):
            print(f"skipped: {d} not found (the shared datasets are not on this machine)")
            return 0
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="ts-shots-")
    app = QApplication(sys.argv[:1])
    from gui.selftest import backbones_listed, scratch_window

    w = scratch_window(tmp)
    wait(app, lambda: backbones_listed(w))

    def shot(name):
        for _ in range(30):
            app.processEvents()
            time.sleep(0.02)
        w.grab().save(os.path.join(out, name))
        print("saved", name)

    label_pile(app, w, os.path.join(os.path.abspath(train_data), "train"), shot)
    if os.environ.get("SCREENSHOTS_ONLY_LABEL"):  # (set: only 10-label.png)
        w.close()
        return 0
    if not os.environ.get("SCREENSHOTS_SKIP_CHECK"):  # (set: keep 1, 6 and 7 as they are; minutes less)
        browse_and_check(app, w, browse_data, shot)
    w.scan_folder(os.path.abspath(train_data))
    wait(app, lambda: w.dataset_tab.dataset is not None and w.dataset_tab.dataset.root == os.path.abspath(train_data))
    w.tabs.setCurrentWidget(w.model_tab)
    shot("2-model.png")  # Automatic, the window's default, with the fine-tuning estimate for this folder
    w.start_training()
    wait(app, lambda: not w.busy())  # the race plot keeps both curves when the run is over
    shot("3-training.png")
    print("automatic:", w.last_result.message)
    w.results_tab.refresh_runs()
    w.results_tab.runs_table.selectAll()
    w.results_tab.open_run(w.last_result.run_dir)
    w.results_tab.show_cell(0, 1)
    w.results_tab.galleries.setCurrentIndex(1)
    w.tabs.setCurrentWidget(w.results_tab)
    wait(app, lambda: len(w.loader.pending) == 0, 60)
    shot("4-results.png")
    w.results_tab.galleries.setCurrentWidget(w.results_tab.trust)
    shot("8-confidence.png")
    w.results_tab.galleries.setCurrentIndex(1)
    grid = w.results_tab.mistakes
    if grid.model().rowCount():
        grid.setCurrentIndex(grid.model().index(0, 0))
        w.results_tab.heatmap_btn.click()
        dlg = w.results_tab.heatmaps.dialog
        wait(app, lambda: dlg.result is not None or "No heatmap" in dlg.caption.text(), 120)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        dlg.grab().save(os.path.join(out, "9-heatmap.png"))
        print("saved 9-heatmap.png")
        dlg.close()
    w.tabs.setCurrentWidget(w.predict_tab)
    val = os.path.join(os.path.abspath(train_data), "val")
    w.predict_tab.folder.setText(val)
    w.predict_tab.top_k.setValue(2)
    w.predict_tab.request_prediction()
    wait(app, lambda: not w.busy())
    print("prediction:", w.predict_tab.status.text())
    w.predict_tab.table.sortByColumn(3, w.predict_tab.table.horizontalHeader().sortIndicatorOrder().AscendingOrder)
    wait(app, lambda: len(w.loader.pending) == 0, 60)
    shot("5-predict.png")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
