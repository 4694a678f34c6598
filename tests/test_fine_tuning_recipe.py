"""Fine-tuning's recipe: each Lite backbone at its own input size, small pictures at 128 px with more stages trained."""

from __future__ import annotations

from engine import TrainConfig, fit
from engine.config import PredictConfig
from engine.events import Callbacks
from tests.imagegen import draw_image


class Log(Callbacks):
    def __init__(self):
        self.lines = []

    def on_log(self, m):
        self.lines.append(m)


def test_efficientnet_lite1_and_lite2_are_listed_offline_and_train_at_their_own_input_size(flat_data, tmp_path):
    from engine.network.backbones import list_backbones
    from engine.predict.predictions import predict_folder

    infos = {b.name: b for b in list_backbones()}
    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        assert infos[name].weights_available and infos[name].input_size == size
    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "lite2"),
            backbone="efficientnet_lite2",
            epochs=30,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    meta = (tmp_path / "lite2" / "model.json").read_text()
    assert '"size": 260' in meta and res.metrics["val_accuracy"] >= 0.8
    rows = predict_folder(PredictConfig(res.run_dir, [str(flat_data / "squares")])).rows
    assert sum(r.prediction == "squares" for r in rows) >= 0.8 * len(rows)


def _pictures(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, side in enumerate(sizes):
        draw_image("circles", i).resize((side + 10, side)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_the_recipe_fine_tunes_small_pictures_at_128_px_with_more_stages_and_keeps_what_the_user_chose(tmp_path):
    from engine.network.backbones import load_backbone
    from engine.train.fine_tuning.recipe import choose, median_shorter_side

    bb = load_backbone("efficientnet_lite0")
    n = len(bb.net.stage_names)
    small = _pictures(tmp_path / "small", [96] * 7 + [300] * 2)  # median shorter side 96
    large = _pictures(tmp_path / "large", [200] * 5)
    assert median_shorter_side(small) == 96 and median_shorter_side(large) == 200

    def cached(n_trained):
        return True

    r = choose(bb, "auto", "auto", small, cached)
    assert (r.size, r.unfreeze, r.small, r.median_side) == (128, n - 3, True, 96) and "96 px" in r.reason
    assert r.lr_mult == 0.3 and choose(bb, "auto", "auto", small, cached, lr_mult=0.05).lr_mult == 0.05
    assert (choose(bb, 2, "auto", small, cached).size, choose(bb, 2, "auto", small, cached).unfreeze) == (128, 2)
    for args in (
        ("auto", "auto", large, cached),
        ("auto", "off", small, cached),
        ("auto", "auto", small, lambda n_trained: False),
    ):
        r = choose(bb, *args)
        assert (r.size, r.unfreeze, r.small, r.lr_mult) == (224, 3, False, 0.1), args
    assert choose(bb, "all", "auto", small, cached).size == 224  # every stage trained: nothing runs once


def test_a_small_pictures_run_trains_predicts_and_marks_unfamiliar_at_its_own_size(flat_data, tmp_path):
    """flat_data's pictures are 96 px: fine-tuning trains at 128 px with all but the first 3 stages, records it, and
    predict (ONNX Runtime for the pretrained "unfamiliar" embeddings, which take 224 px) gives the validation
    probabilities back and tells the training pictures from an unlike one."""
    import csv
    import json
    import os

    from engine.predict.predictions import predict_folder
    from tests.imagegen import draw_unlike

    log = Log()
    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "ft"),
            mode="fine-tuning",
            epochs=2,
            batch_size=8,
            seed=0,
            cache_dir=str(tmp_path / "c"),
        ),
        log,
    )
    recipe = res.metrics["fine_tuning_recipe"]
    assert recipe["small_pictures"] and recipe["input_size"] == 128 and recipe["unfreeze"] == 6
    meta = json.loads(open(os.path.join(res.run_dir, "model.json")).read())
    assert meta["preprocessing"]["size"] == 128 and meta["fine_tuning"]["unfreeze"] == 6
    assert any(m.startswith("Small pictures: your pictures are small (median shorter side") for m in log.lines)
    assert any("Fine-tuning the last 6 of 9 backbone stages" in m for m in log.lines)
    assert res.metrics["val_accuracy"] >= 0.75
    with open(os.path.join(res.run_dir, "val_predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    odd = tmp_path / "odd.png"
    draw_unlike(3).save(odd)
    out = predict_folder(PredictConfig(res.run_dir, [r["path"] for r in rows] + [str(odd)]))
    got = {r.path: r for r in out.rows}
    for r in rows:
        want = [float(r[f"p_{c}"]) for c in res.metrics["classes"]]
        assert max(abs(a - b) for a, b in zip(got[r["path"]].probabilities, want)) < 1e-3
    assert sum(got[r["path"]].status == "unfamiliar" for r in rows) <= 1
    assert got[str(odd)].status == "unfamiliar"
