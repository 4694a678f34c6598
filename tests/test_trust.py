"""Answers a user can trust: calibrated confidence, "unsure", "unfamiliar", and where the model looked."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import TrainConfig, fit
from engine.config import EvaluateConfig, PredictConfig
from engine.events import Callbacks
from engine.trust.calibration import (
    calibrate,
    ece_noise_floor,
    expected_calibration_error,
    fit_temperature,
    probabilities,
)
from tests.imagegen import draw_image, draw_unlike, make_flat_dataset


def test_temperature_fitting_recovers_a_known_temperature_and_keeps_top1():
    rng = np.random.default_rng(0)
    n, k, true_t = 4000, 5, 2.5
    base = rng.normal(0, 3, (n, k)).astype(np.float32)  # the "true" logits
    p = probabilities(base, 1.0)
    y = np.array([rng.choice(k, p=row) for row in p])  # labels drawn from softmax(base)
    over = base * true_t  # an over-confident network: logits scaled up by T
    t = fit_temperature(over, y)
    assert t == pytest.approx(true_t, rel=0.08)
    assert (probabilities(over, t).argmax(1) == over.argmax(1)).all()
    ece = expected_calibration_error
    assert ece(probabilities(over, t), y) < ece(probabilities(over, 1.0), y) / 2
    report = calibrate(over[:2000], y[:2000], over[2000:], y[2000:])
    assert report["measured_on"] == "test" and report["ece_after"] < report["ece_before"]
    assert report["log_loss_after"] < report["log_loss_before"]
    assert sum(b["n"] for b in report["bins"]) == 2000 and len(report["bins"]) == 15


def test_the_prior_on_the_temperature_stops_a_few_validation_images_from_sharpening_without_limit():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, (20, 3))
    y = z.argmax(1)  # every one right: plain log-loss keeps sharpening, to the bound
    assert fit_temperature(z, y, prior_sd=None) == pytest.approx(0.01, rel=0.05)
    assert 0.1 < fit_temperature(z, y) < 1.0  # the prior (log T ~ N(0, 0.5^2)) stops it


def test_the_unfamiliar_threshold_adds_training_distances_but_leaves_copies_out():
    from engine.trust.familiarity import familiarity_block, knn_distance, threshold

    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(300, 16)), rng.normal(size=(30, 16))
    block = familiarity_block(train, val)
    assert "leave-one-out" in block["threshold_from"]
    assert block["threshold"] == pytest.approx(
        threshold(np.r_[knn_distance(val, train), knn_distance(train, train, exclude_self=True)])
    )
    # a third of the training images filed twice: their zero distances would pull the quantile down
    copies = familiarity_block(np.r_[train, train[:100]], val)
    assert copies["threshold"] == pytest.approx(block["threshold"], rel=0.03)


def test_the_ece_noise_floor_is_what_a_perfectly_calibrated_model_measures():
    """On few images even a perfect model shows an ECE of several points: the floor says how much (bench-trust
    prints it beside each measured ECE)."""
    rng = np.random.default_rng(3)
    for n in (150, 900):
        conf = rng.uniform(0.4, 1.0, n)
        probs = np.stack([conf, 1 - conf], 1)
        measured = [expected_calibration_error(probs, np.where(rng.random(n) < conf, 0, 1)) for _ in range(300)]
        assert ece_noise_floor(probs) == pytest.approx(np.mean(measured), rel=0.1)
    big = rng.uniform(0.4, 1.0, 20000)
    assert ece_noise_floor(np.stack([big, 1 - big], 1)) < 0.01  # it shrinks as the images grow


def _probs_from_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("p_")]
    return {r["path"]: np.array([float(r[c]) for c in cols]) for r in rows if r.get("prediction")}


def test_calibrated_probabilities_agree_across_val_predictions_predict_and_evaluate(flat_data, tmp_path):
    """The same image gets the same calibrated probabilities in val_predictions.csv, the predict CSV and evaluate's
    log-loss; the run records its temperature and the measurement on images it was not fitted on. (Without
    cross-fitting: a cross-fitted run's val_predictions.csv holds the fold heads' judgements, by design not the
    saved head's.)"""
    from engine.predict.evaluate import evaluate
    from engine.predict.predictions import predict_folder

    fe_run = fit(
        TrainConfig(
            data=str(flat_data), out=str(tmp_path / "run"), epochs=30, seed=1, cross_fit="off",
            cache_dir=str(tmp_path / "cache"),
        )
    )  # fmt: skip
    run = Path(fe_run.run_dir)
    meta = json.loads((run / "model.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert meta["calibration"]["temperature"] == cal["temperature"] > 0
    assert cal["measured_on"] == "validation, two-fold" and cal["n"] == metrics["val_n"]
    assert {"ece_before", "ece_after", "log_loss_before", "log_loss_after", "coverage", "bins"} <= set(cal)
    val = _probs_from_csv(run / "val_predictions.csv")
    folder = tmp_path / "val"
    for i, p in enumerate(sorted(val)):
        cls = Path(p).parent.name
        (folder / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / cls / f"{i}{Path(p).suffix}")
    out = tmp_path / "p.csv"
    predict_folder(PredictConfig(str(run), [str(folder)], str(out)))
    pred = _probs_from_csv(out)
    names = {str(folder / Path(p).parent.name / f"{i}{Path(p).suffix}"): p for i, p in enumerate(sorted(val))}
    assert len(pred) == len(val)
    for q, p in names.items():
        assert np.abs(pred[q] - val[p]).max() < 1e-4
    ev = evaluate(EvaluateConfig(str(run), str(folder))).metrics
    labels = [Path(q).parent.name for q in names]
    classes = meta["classes"]
    ll = -np.mean([np.log(pred[q][classes.index(c)]) for q, c in zip(names, labels)])
    assert ev["log_loss"] == pytest.approx(ll, abs=1e-4)


@pytest.fixture(scope="module")
def trust_data(tmp_path_factory):
    """Shapes with enough validation images to set thresholds."""
    return make_flat_dataset(tmp_path_factory.mktemp("shapes"), n_per_class=30, seed=3)


@pytest.fixture(scope="module", params=["feature-extraction", "fine-tuning"])
def trust_run(request, trust_data, tmp_path_factory):
    res = fit(
        TrainConfig(
            data=str(trust_data),
            out=str(tmp_path_factory.mktemp("runs") / "run"),
            seed=0,
            mode=request.param,
            epochs=40 if request.param == "feature-extraction" else 2,
            cache_dir=str(tmp_path_factory.mktemp("cache")),
        )
    )
    assert res.run_dir
    return res


def test_unfamiliar_and_unsure_rows_on_planted_images(trust_run, tmp_path):
    from engine.predict.predictions import predict_folder

    meta = json.loads((Path(trust_run.run_dir) / "model.json").read_text())
    if meta["mode"] == "fine-tuning":  # tuned embeddings flag nothing unfamiliar: the pretrained network's are kept
        assert meta["unfamiliar"]["space"] == "pretrained" and meta["unfamiliar"]["dim"] == meta["feature_dim"]
        assert "frozen_stages" not in meta["unfamiliar"]

    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(12):  # new pictures of the classes it knows, saved like the training ones (JPEG)
        draw_image(("circles", "squares", "stripes")[i % 3], 90_000 + i).save(folder / f"shape{i:02d}.jpg")
    for i in range(9):
        draw_unlike(i).save(folder / f"unlike{i:02d}.png")
    out = tmp_path / "p.csv"
    res = predict_folder(PredictConfig(trust_run.run_dir, [str(folder)], str(out)))
    status = {Path(r.path).stem: r.status for r in res.rows}
    unlike = [s for n, s in status.items() if n.startswith("unlike")]
    shapes = [s for n, s in status.items() if n.startswith("shape")]
    assert unlike.count("unfamiliar") >= 8, status
    assert shapes.count("unfamiliar") <= 2, status  # the threshold flags about 5% of familiar images by design
    with open(out, encoding="utf-8", newline="") as f:
        assert {r["status"] for r in csv.DictReader(f)} <= {"ok", "unsure", "unfamiliar"}
    # "not sure": a threshold above every confidence marks every familiar image unsure, best guess kept
    strict = predict_folder(PredictConfig(trust_run.run_dir, [str(folder)], min_confidence=1.01))
    for r in strict.rows:
        assert r.status in ("unsure", "unfamiliar") and r.prediction
        if status[Path(r.path).stem] == "ok":
            assert r.status == "unsure"
    # a target accuracy picks the threshold from the run's accuracy-against-coverage measurement
    lenient = predict_folder(PredictConfig(trust_run.run_dir, [str(folder)], target_accuracy=0.5))
    assert all(r.status in ("ok", "unfamiliar") for r in lenient.rows)


def test_old_runs_without_a_temperature_still_load(fe_run, tmp_path):
    from engine.predict.predictions import predict_folder

    run = tmp_path / "old"
    shutil.copytree(fe_run.run_dir, run)
    meta = json.loads((run / "model.json").read_text())
    for key in ("calibration", "unsure", "unfamiliar"):
        meta.pop(key, None)
    (run / "model.json").write_text(json.dumps(meta))
    (run / "train_embeddings.safetensors").unlink()
    logs = []

    class Log(Callbacks):
        def on_log(self, m):
            logs.append(m)

    folder = tmp_path / "imgs"
    folder.mkdir()
    draw_image("squares", 5).save(folder / "a.png")
    draw_unlike(1).save(folder / "b.png")
    res = predict_folder(PredictConfig(str(run), [str(folder)]), Log())
    assert [r.status for r in res.rows] == ["ok", "ok"]
    assert sum("saved before calibration" in m for m in logs) == 1


def _square_image(path: Path, box: tuple[int, int, int, int]) -> None:
    im = Image.new("RGB", (224, 224), (235, 235, 235))
    ImageDraw.Draw(im).rectangle(box, fill=(40, 60, 220))
    im.save(path)


@pytest.mark.parametrize("mode", ["final", "depths", "fine-tuning"])
def test_heatmap_peaks_on_the_object(flat_data, tmp_path, mode):
    from engine.predict.heatmap import HeatmapConfig, heatmap

    if mode != "fine-tuning":  # a head on the final features (Grad-CAM), one on every depth (Layer-CAM, fused)
        run = fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "fe"), features=mode)).run_dir
        assert json.loads((Path(run) / "metrics.json").read_text())["depths"]["kept"] == (mode == "depths")
    else:
        run = fit(
            TrainConfig(
                data=str(flat_data), out=str(tmp_path / "ft"), mode="fine-tuning", epochs=1, batch_size=8, unfreeze=1
            )
        ).run_dir
    box = (140, 140, 204, 204)  # a blue square in the lower right on a plain background
    _square_image(tmp_path / "square.png", box)
    res = heatmap(HeatmapConfig(run, str(tmp_path / "square.png"), target="squares"))
    # at the run's input size: 224 px, or 128 px for fine-tuning these small (96 px) pictures
    # (engine/train/fine_tuning/recipe.py)
    size = 224 if mode != "fine-tuning" else 128
    assert res.heat.shape == (size, size) and res.image.shape == (size, size, 3)
    assert res.target == "squares" and 0.99 <= res.heat.max() <= 1.0
    # The heatmap comes from the last feature map (one cell is 32 px): the peak lies within a cell of the square,
    # and the heat there is well above the rest of the picture.
    cell, box = 32, tuple(round(v * size / 224) for v in box)
    y, x = np.unravel_index(np.argmax(res.heat), res.heat.shape)
    assert box[0] - cell <= x <= box[2] + cell and box[1] - cell <= y <= box[3] + cell, (x, y)
    near = np.zeros_like(res.heat, dtype=bool)
    near[box[1] - cell : box[3] + cell, box[0] - cell : box[2] + cell] = True
    assert res.heat[near].mean() > 2 * res.heat[~near].mean()
