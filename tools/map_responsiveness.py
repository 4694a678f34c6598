"""The dataset map's worst event-loop stall with many points, while the pointer hovers and the view pans.

    xvfb-run -a -s "-screen 0 1280x800x24" python tools/map_responsiveness.py [N]

Draws N points (default 5,000; synthetic embeddings of 10 classes, 5% ringed as findings, each with an image path
for the hover picture) in the real ``DatasetMap``, then moves the pointer across the plot (hover tooltips), drags
it (pans) and zooms, while a 10 ms timer records the longest gap between its ticks (``gui.jobs.eventloop.StallMeter``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
from PySide6.QtCore import QPoint
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    app = QApplication(sys.argv[:1])  # noqa: F841  (kept alive for the whole run)
    from PIL import Image

    from engine.doctor.findings import pca_2d
    from gui.jobs.eventloop import StallMeter, wait_until
    from gui.tabs.dataset.map import DatasetMap

    tmp = tempfile.mkdtemp(prefix="ts-map-")
    Image.new("RGB", (128, 96), (200, 80, 40)).save(os.path.join(tmp, "a.jpg"))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    feats = rng.normal(0, 1, (10, 64))[labels] + rng.normal(0, 0.6, (n, 64))
    paths = [os.path.join(tmp, "a.jpg")] * n
    m = DatasetMap()
    m.resize(900, 650)
    m.show()
    t0 = time.perf_counter()
    m.show_points(
        pca_2d(feats.astype(np.float32)),
        [f"{p}#{i}" for i, p in enumerate(paths)],
        labels,
        [f"class {i}" for i in range(10)],
        {f"{p}#{i}" for i, p in enumerate(paths[: n // 20])},
        "test",
    )
    wait_until(lambda: False, 0.5)
    print(f"{n} points drawn in {time.perf_counter() - t0:.2f} s (including 0.5 s of idle event loop)")
    view = m.plot.viewport()
    meter = StallMeter()
    meter.start()
    w, h = view.width(), view.height()
    for i in range(200):  # hover: the pointer crossing the cloud
        QTest.mouseMove(view, QPoint(int(w * (0.1 + 0.8 * i / 200)), int(h * (0.5 + 0.3 * np.sin(i / 15)))))
        wait_until(lambda: False, 0.01)
    hover = meter.stop()
    meter.start()
    vb = m.plot.getViewBox()
    (x0, x1), (y0, y1) = vb.viewRange()
    for i in range(100):  # pans (what a drag does, step by step) and zooms (the wheel)
        vb.translateBy(x=(x1 - x0) * 0.01 * (1 if i < 50 else -1), y=(y1 - y0) * 0.005)
        if i % 20 == 10:
            vb.scaleBy((0.8, 0.8))
        wait_until(lambda: False, 0.015)
    pan = meter.stop()
    print(f"worst event-loop stall: hovering {hover:.0f} ms, panning and zooming {pan:.0f} ms")
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
