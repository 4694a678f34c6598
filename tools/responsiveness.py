"""Measure the GUI's worst event-loop stall while real jobs run (10 ms QTimer, longest gap), under a real event loop.

    xvfb-run -a python tools/responsiveness.py TRAIN_DATA PREDICT_FOLDER

Trains feature extraction (empty embedding cache) and fine-tuning (2 epochs) on TRAIN_DATA, then predicts
PREDICT_FOLDER, and prints the worst stall of each job plus the number of rows streamed before the job ended.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import gui  # noqa: F401  (sets the GUI's OpenMP policy before torch loads)
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication


def wait(cond, timeout=1800.0):
    from gui.eventloop import wait_until

    wait_until(cond, timeout)


def main() -> int:
    train, predict = map(os.path.abspath, sys.argv[1:3])
    for d in (train, predict):
        if not os.path.isdir(d):
            print(f"skipped: {d} not found")
            return 0
    tmp = tempfile.mkdtemp(prefix="ts-resp-")
    os.environ["TRANSFER_STUDIO_CACHE"] = os.path.join(tmp, "cache")
    app = QApplication(sys.argv[:1])
    from gui.main_window import MainWindow

    s = QSettings(os.path.join(tmp, "s.ini"), QSettings.IniFormat)
    s.setValue("train/runs_dir", os.path.join(tmp, "runs"))
    w = MainWindow(s)
    w.resize(1280, 800)
    w.show()
    wait(lambda: w.model_tab.table.rowCount() > 0)
    w.scan_folder(train)
    wait(lambda: w.dataset_tab.dataset is not None)
    for mode, epochs in (() if os.environ.get("TS_PREDICT_ONLY") else (("feature-extraction", 0), ("fine-tuning", 2))):
        w.model_tab.set_mode(mode)
        w.training_tab.epochs.setValue(epochs)
        t0 = time.time()
        w.start_training()
        wait(lambda: not w.busy())
        wait(lambda: w.last_result is not None)
        print(f"{mode}: {time.time() - t0:.1f} s, {w.status_label.text()}")
        w.last_result = None
    if os.environ.get("TS_PREDICT_ONLY"):
        from engine import TrainConfig, fit

        res = fit(TrainConfig(data=train, out=os.path.join(tmp, "runs", "fe"), epochs=5))
        w.open_run(res.run_dir)
    w.tabs.setCurrentWidget(w.predict_tab)
    streamed = []
    t0 = time.time()
    w.start_prediction(predict, 3)
    timer = QTimer()
    timer.setInterval(500)
    timer.timeout.connect(lambda: streamed.append(w.predict_tab.model.rowCount()))
    timer.start()
    wait(lambda: not w.busy())
    timer.stop()
    n = w.predict_tab.model.rowCount()
    print(f"predict: {n} files in {time.time() - t0:.1f} s, {w.status_label.text()}; rows visible at 0.5 s "
          f"intervals: {streamed[:3]} ... {streamed[-3:]}")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
