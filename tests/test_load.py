"""Prediction over many small images keeps memory steady (rows stream; pixels never accumulate)."""

from __future__ import annotations

import os
import resource

from PIL import Image

from engine.events import Callbacks


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_predicting_many_images_keeps_memory_steady(fe_run, tmp_path):
    """CI runs 600 images; `TS_LOAD=20000 pytest -k memory_steady -s` is the documented long run."""
    from engine.config import PredictConfig
    from engine.predict.predictions import predict_folder

    n = int(os.environ.get("TS_LOAD", "600"))
    folder = tmp_path / "many"
    colours = [(220, 40, 40), (40, 60, 220), (40, 170, 60)]
    for i in range(n):
        sub = folder / f"part{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), colours[i % 3]).save(sub / f"{i:05d}.png")
    samples = []

    class Track(Callbacks):
        def on_predictions(self, rows):
            samples.append((len(rows), _rss_mb()))

    res = predict_folder(PredictConfig(fe_run.run_dir, str(folder), str(tmp_path / "out.csv"), batch_size=32), Track())
    assert len(res.rows) == n and res.n_errors == 0
    rss = [m for _, m in samples]
    quarter = rss[len(rss) // 4]
    growth = max(rss[len(rss) // 4 :]) - quarter
    print(
        f"\n{n} images in {res.seconds:.1f} s ({n / res.seconds:.0f} img/s); RSS after a quarter {quarter:.0f} MB, "
        f"peak {max(rss):.0f} MB, growth after the first quarter {growth:.0f} MB"
    )
    assert growth < 60 + n * 0.002  # rows only (~1 KB each), no pixels
