"""Unbalanced classes and sorting photos by prediction."""

from __future__ import annotations

import numpy as np

from engine import TrainConfig, fit
from engine.config import PredictConfig
from engine.events import Callbacks
from engine.train.head import balanced_class_weights
from tests.imagegen import draw_image, make_flat_dataset


class Log(Callbacks):
    def __init__(self):
        self.lines = []

    def on_log(self, m):
        self.lines.append(m)


def test_class_weights_change_the_loss_on_an_unbalanced_folder_only(tmp_path):
    balanced = make_flat_dataset(tmp_path / "balanced", n_per_class=12)
    unbalanced = make_flat_dataset(tmp_path / "unbalanced", n_per_class=24, classes=("circles", "squares"))
    for p in sorted((unbalanced / "squares").iterdir())[6:]:
        p.unlink()  # 24 circles, 6 squares: 4x
    assert balanced_class_weights(np.array([0] * 24 + [1] * 6), 2) is not None
    assert balanced_class_weights(np.array([0] * 12 + [1] * 12), 2) is None
    cache = str(tmp_path / "cache")
    runs = {}
    for name, data in (("balanced", balanced), ("unbalanced", unbalanced)):
        for mode in ("auto", "off"):
            log = Log()
            res = fit(
                TrainConfig(
                    data=str(data), out=str(tmp_path / f"{name}-{mode}"), balance=mode, epochs=5, cache_dir=cache
                ),
                log,
            )
            runs[name, mode] = (res, any("unbalanced" in m for m in log.lines))
    (b_auto, b_said), (b_off, _) = runs["balanced", "auto"], runs["balanced", "off"]
    assert not b_said and [h["train_loss"] for h in b_auto.history] == [h["train_loss"] for h in b_off.history]
    (u_auto, u_said), (u_off, _) = runs["unbalanced", "auto"], runs["unbalanced", "off"]
    assert u_said and [h["train_loss"] for h in u_auto.history] != [h["train_loss"] for h in u_off.history]
    assert u_auto.metrics["val_balanced_accuracy"] is not None


def test_sort_into_copies_by_class_and_never_overwrites(fe_run, tmp_path):
    from engine.predict.predictions import predict_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, cls in enumerate(("circles", "squares", "stripes", "circles")):
        draw_image(cls, 70_000 + i).save(photos / f"p{i}.jpg")
    (photos / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "sorted"
    (out / "circles").mkdir(parents=True)
    (out / "circles" / "p0.jpg").write_bytes(b"mine")  # already there: must survive
    res = predict_folder(PredictConfig(fe_run.run_dir, [str(photos)], sort_into=str(out)))
    by_status = {r.path: r for r in res.rows}
    placed = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert (out / "circles" / "p0.jpg").read_bytes() == b"mine"
    assert len(placed) == 1 + 4 and "Sorted 4 image(s)" in res.sorted_summary
    for r in res.rows:
        if r.error:
            continue
        folder = {"unsure": "_unsure", "unfamiliar": "_unfamiliar"}.get(r.status, r.prediction)
        names = [p for p in placed if p.startswith(folder + "/")]
        assert any(n.startswith(f"{folder}/{r.path.rsplit('/', 1)[1][:-4]}") for n in names), (r, placed)
    assert all((photos / f"p{i}.jpg").exists() for i in range(4))  # nothing moved
    assert sum(r.error != "" for r in by_status.values()) == 1  # the broken file is reported, not sorted
