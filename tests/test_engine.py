"""Engine behaviour a user relies on: layouts, split, both modes, cancel, predict CSV, evaluate, export, safety."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import CancelToken, EngineError, TrainConfig, fit
from engine.config import EvaluateConfig, ExportConfig, PredictConfig
from engine.data.folder import scan, stratified_split
from engine.events import Callbacks
from tests.imagegen import draw_image, make_flat_dataset, make_split_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_importing_engine_loads_no_qt():
    """At run time, not only in the source (import-linter checks that): no library the engine loads pulls Qt in, so
    ``python -m engine`` runs on a machine without a screen."""
    code = (
        "import sys, engine, engine.train.fit, engine.predict.predictions, engine.predict.evaluate, "
        "engine.predict.export, engine.__main__;"
        "bad = [m for m in sys.modules"
        " if m.split('.')[0] in ('PySide6', 'shiboken6', 'pyqtgraph', 'PyQt5', 'PyQt6')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_shipped_packages_hold_no_benchmark_code():
    """The wheel (and the bundle, which collects engine and gui) holds engine/ and gui/ only: the benchmarks live in
    benchmarks/, which the package list leaves out (import-linter keeps the product from importing them)."""
    from setuptools import find_packages

    shipped = find_packages(str(ROOT), include=["engine*", "gui*"])
    assert shipped and all(p.split(".")[0] in ("engine", "gui") for p in shipped)
    assert not [p for pkg in ("engine", "gui") for p in (ROOT / pkg).rglob("bench*.py")]
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "doctor" in r.stdout and "onnx" in r.stdout, r.stderr


def test_training_reuses_a_scan_with_the_same_split_and_rescans_otherwise(flat_data, tmp_path, monkeypatch):
    """The window hands fit the folder it already scanned: no second scan when the split settings match (and the
    caller's dataset is not changed by files fit drops); other split settings scan again."""
    import engine.train.fit as tr

    ds = scan(flat_data, val_split=0.2, seed=0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    ds.samples.append(type(ds.samples[0])(str(tmp_path / "broken.jpg"), 0, "train"))  # found bad only when decoded
    n_before = len(ds.samples)
    scans = []
    monkeypatch.setattr(tr, "scan", lambda *a, **k: scans.append(a) or scan(*a, **k))
    res = fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "a"), epochs=3, val_split=0.2, seed=0), dataset=ds)
    assert res.run_dir and scans == []
    assert any(p.endswith("broken.jpg") for p, _ in res.skipped) and len(ds.samples) == n_before
    res = fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "b"), epochs=3, val_split=0.3, seed=0), dataset=ds)
    assert res.run_dir and len(scans) == 1 and res.metrics["n_val"] != len(ds.split("val"))


def test_flat_split_is_stratified_and_reproducible(flat_data):
    a = scan(flat_data, val_split=0.25, test_split=0.15, seed=3)
    b = scan(flat_data, val_split=0.25, test_split=0.15, seed=3)
    c = scan(flat_data, val_split=0.25, test_split=0.15, seed=4)
    assert a.layout == "flat" and a.classes == ["circles", "squares", "stripes"]
    assert [(s.path, s.split) for s in a.samples] == [(s.path, s.split) for s in b.samples]
    assert [(s.path, s.split) for s in a.samples] != [(s.path, s.split) for s in c.samples]
    for cls, counts in a.counts().items():  # every class gets each split; about its share overall
        assert min(counts.values()) >= 1 and sum(counts.values()) == 14, cls
    n_val = sum(c["val"] for c in a.counts().values())
    assert 0.1 <= n_val / 42 <= 0.4


def test_split_keeps_a_training_image_for_tiny_classes():
    labels = [0] * 1 + [1] * 2 + [2] * 3 + [3] * 300
    keys = [f"img{i}.jpg" for i in range(len(labels))]
    for seed in range(20):
        out = stratified_split(labels, 0.2, 0.1, seed=seed, keys=keys)
        assert out[0] == "train"
        assert sorted(out[1:3]) == ["train", "val"]
        assert sorted(out[3:6]) == ["test", "train", "val"]
        big = out[6:]
        assert 0.12 <= big.count("val") / 300 <= 0.28 and 0.05 <= big.count("test") / 300 <= 0.15


def test_presplit_layout_with_other_spellings(tmp_path):
    make_split_dataset(tmp_path, names=("Training", "VALID", "testing"), n=(6, 3, 2))
    ds = scan(tmp_path)
    assert ds.layout == "pre-split"
    assert ds.counts() == {"circles": {"train": 6, "val": 3, "test": 2}, "squares": {"train": 6, "val": 3, "test": 2}}


def test_a_class_only_in_the_test_folder_is_named_before_training_not_scored_as_errors(tmp_path):
    """Training/glioma but Testing/glioma_tumor: the model had an output it could never learn, and its test images
    silently counted as errors (test accuracy 0.667 on an otherwise perfect run)."""
    make_split_dataset(tmp_path, names=("Training",), n=(8,), classes=("circles", "squares"))
    make_split_dataset(tmp_path, names=("Testing",), n=(3,), classes=("circles", "squares", "stripes"))
    (tmp_path / "Training" / "squares").rename(tmp_path / "Training" / "glioma")
    (tmp_path / "Testing" / "squares").rename(tmp_path / "Testing" / "glioma_tumor")
    ds = scan(tmp_path)
    said = " ".join(ds.warnings)
    assert "Class 'glioma_tumor' (3 images) is only in the validation or test folder" in said
    assert "Is it 'glioma' of the training folder under another name?" in said
    stripes = next(w for w in ds.warnings if w.startswith("Class 'stripes' (3 images)"))
    assert stripes.endswith("Add its images to the training folder, or remove it.")  # no far-fetched name
    with pytest.raises(EngineError, match="glioma_tumor.*cannot learn it"):
        fit(TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), cache=False))
    assert not (tmp_path / "run").exists()


def test_unreadable_files_are_listed_not_fatal(tmp_path):
    root = make_flat_dataset(tmp_path / "d", n_per_class=4, classes=("circles", "squares"))
    (root / "circles" / "empty.jpg").write_bytes(b"")
    (root / "circles" / "notes.png").write_text("this is not an image")
    good = (root / "squares" / "squares_000.jpg").read_bytes()
    (root / "squares" / "cut.JPG").write_bytes(good[: len(good) * 2 // 3])
    (root / "squares" / "readme.txt").write_text("ignored: not an image extension")
    (root / "squares" / ".DS_Store").write_bytes(b"\0\0")
    ds = scan(root, val_split=0.25)
    reasons = dict((Path(p).name, r) for p, r in ds.skipped)
    assert {"empty.jpg", "notes.png"} <= set(reasons)
    assert "0 bytes" in reasons["empty.jpg"]
    # A truncated JPEG may pass the header check; then decoding drops it and says why.
    res = fit(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=3, cache=False))
    skipped = {Path(p).name: r for p, r in res.skipped}
    assert {"empty.jpg", "notes.png", "cut.JPG"} <= set(skipped)
    with open(tmp_path / "run" / "skipped.csv", encoding="utf-8") as f:
        assert {Path(r["path"]).name for r in csv.DictReader(f)} == {"empty.jpg", "notes.png", "cut.JPG"}


def test_folder_errors_say_what_to_change(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="No readable images") as empty:
        scan(tmp_path / "empty")
    assert "other kinds" not in str(empty.value)
    for c in ("glioma", "healthy"):  # a scanner's export the app cannot read: say what is there and what to do
        (tmp_path / "dicom" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "dicom" / c / f"slice{i}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(EngineError, match=r"other kinds: \.dcm \(6\).*export them as PNG"):
        scan(tmp_path / "dicom")
    make_flat_dataset(tmp_path / "one", n_per_class=3, classes=("circles",))
    with pytest.raises(EngineError, match="Only one class"):
        scan(tmp_path / "one")


def test_feature_extraction_run_folder(fe_run):
    run = Path(fe_run.run_dir)
    for name in (
        "model.safetensors",
        "model.json",
        "metrics.json",
        "history.csv",
        "split.csv",
        "skipped.csv",
        "val_predictions.csv",
    ):
        assert (run / name).is_file(), name
    meta = json.loads((run / "model.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert meta["classes"] == ["circles", "squares", "stripes"] and meta["mode"] == "feature-extraction"
    assert meta["preprocessing"]["size"] == 224 and meta["versions"]["torch"]
    assert metrics["status"] == "completed"
    assert metrics["val_accuracy"] >= 0.85  # the synthetic classes are easy for an ImageNet backbone
    lo, hi = metrics["val_accuracy_ci95"]
    assert lo <= metrics["val_accuracy"] <= hi
    # no validation folder: cross-fitted, so every labelled image trained the saved head and every one was judged
    # out of fold (the confusion matrix and val_predictions.csv hold them all)
    with open(run / "split.csv") as f:
        splits = [r["split"] for r in csv.DictReader(f)]
    assert set(splits) == {"train"} and metrics["validation"]["method"] == "cross-validated"
    assert metrics["validation"]["folds"] == 5 and sum(metrics["validation"]["fold_sizes"]) == len(splits)
    with open(run / "val_predictions.csv") as f:
        judged = [r["path"] for r in csv.DictReader(f)]
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["val_n"] == len(splits) == len(set(judged)) > 0
    assert set(metrics["per_class"]) == set(meta["classes"])
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["epochs_run"]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(rows[0])
    with open(run / "split.csv") as f:
        assert len(list(csv.DictReader(f))) == 42


def test_fine_tuning_learns_and_saves(flat_data, tmp_path):
    epochs = []

    class Rec(Callbacks):
        def on_train_epoch_end(self, m):
            epochs.append(m)

    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "ft"),
            mode="fine-tuning",
            epochs=2,
            batch_size=8,
            unfreeze=1,
            seed=0,
        ),
        Rec(),
    )
    assert res.run_dir and not res.cancelled
    assert [m.epoch for m in epochs] == [1, 2]
    assert res.metrics["val_accuracy"] >= 0.75 and res.metrics["train_images_per_s"] > 0
    from engine.network.model import load_model

    loaded = load_model(res.run_dir)
    assert loaded.meta["mode"] == "fine-tuning" and loaded.meta["config"]["unfreeze"] == 1


def test_cancel_during_training_keeps_best_epoch(flat_data, tmp_path):
    cancel = CancelToken()

    class StopAfterFirstEpoch(Callbacks):
        def on_train_batch_end(self, m):
            if m.epoch == 2:
                cancel.cancel()

    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "c"),
            mode="fine-tuning",
            epochs=4,
            batch_size=8,
            unfreeze=1,
            linear_probe_init=False,
        ),
        StopAfterFirstEpoch(),
        cancel,
    )
    assert res.cancelled and res.run_dir
    metrics = json.loads(Path(res.run_dir, "metrics.json").read_text())
    assert metrics["status"] == "cancelled" and metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1


def test_cancel_before_any_epoch_saves_nothing(flat_data, tmp_path):
    cancel = CancelToken()
    cancel.cancel()
    res = fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "none")), cancel=cancel)
    assert res.cancelled and res.run_dir is None and "nothing was saved" in res.message
    assert not (tmp_path / "none").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_predict_csv_has_a_row_per_image_file(fe_run, tmp_path):
    from engine.predict.predictions import predict_folder

    folder = tmp_path / "new"
    (folder / "sub" / "deeper").mkdir(parents=True)
    draw_image("circles", 999).save(folder / "a circle é.png")
    draw_image("squares", 998).save(folder / "sub" / "b.JPEG")
    draw_image("stripes", 997).save(folder / "sub" / "deeper" / "c.webp")
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    res = predict_folder(PredictConfig(fe_run.run_dir, str(folder), str(out), top_k=2))
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "path",
        "prediction",
        "confidence",
        "p_circles",
        "p_squares",
        "p_stripes",
        "top_k",
        "status",
        "error",
    ]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"a circle é.png", "b.JPEG", "c.webp", "broken.jpg"}
    assert by_name["broken.jpg"]["error"] and by_name["broken.jpg"]["prediction"] == ""
    assert by_name["broken.jpg"]["status"] == "error" and by_name["b.JPEG"]["status"] in ("ok", "unsure")
    assert by_name["a circle é.png"]["prediction"] == "circles"
    assert by_name["b.JPEG"]["prediction"] == "squares"
    assert by_name["c.webp"]["prediction"] == "stripes"
    for r in rows:
        if not r["error"]:
            probs = [float(r[f"p_{c}"]) for c in ("circles", "squares", "stripes")]
            assert abs(sum(probs) - 1) < 1e-4 and float(r["confidence"]) == pytest.approx(max(probs), abs=1e-6)
    assert all(r["path"].startswith(str(folder)) for r in rows)
    assert len(res.rows) == 4 and res.n_errors == 1
    # one photo, or files and folders together, in the order given
    one = predict_folder(PredictConfig(fe_run.run_dir, str(folder / "sub" / "b.JPEG")))
    assert [(Path(r.path).name, r.prediction) for r in one.rows] == [("b.JPEG", "squares")]
    mixed = predict_folder(PredictConfig(fe_run.run_dir, [str(folder / "notes.txt"), str(folder / "sub" / "deeper")]))
    assert [Path(r.path).name for r in mixed.rows] == ["notes.txt", "c.webp"] and mixed.rows[0].error
    with pytest.raises(EngineError, match="Not found"):
        predict_folder(PredictConfig(fe_run.run_dir, str(folder / "missing.jpg")))


def test_evaluate_scores_a_labelled_folder(fe_run, tmp_path):
    from engine.predict.evaluate import evaluate

    data = make_flat_dataset(tmp_path / "holdout", n_per_class=4, seed=7)
    res = evaluate(EvaluateConfig(fe_run.run_dir, str(data)))
    m = res.metrics
    assert m["n"] == 12 and m["accuracy"] >= 0.8
    assert np.array(m["confusion_matrix"]).shape == (3, 3)
    bad = make_flat_dataset(tmp_path / "other", n_per_class=2, classes=("circles", "triangles"))
    with pytest.raises(EngineError, match="does not know: triangles"):
        evaluate(EvaluateConfig(fe_run.run_dir, str(bad)))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_gives_predicts_calibrated_probabilities(fe_run, flat_data, tmp_path, fmt):
    """The exported network's second output is the calibrated probabilities predict writes on the fp32 path (within
    1e-4), and its first the logits whose top-1 they share."""
    import torch

    from engine.data.decode import decode_one
    from engine.network.model import load_model
    from engine.predict.export import export_model
    from engine.predict.predictions import predict_folder

    out = tmp_path / f"model.{fmt}"
    export_model(ExportConfig(fe_run.run_dir, fmt, str(out)))
    side = json.loads(Path(str(out) + ".json").read_text())
    loaded = load_model(fe_run.run_dir)
    assert side["classes"] == ["circles", "squares", "stripes"] and side["temperature"] == loaded.temperature
    rows = predict_folder(PredictConfig(fe_run.run_dir, [str(flat_data / "squares")], engine="torch")).rows[:6]
    pre = loaded.preprocessing
    u8 = np.stack([decode_one(r.path, pre, pre.size)[0] for r in rows]).transpose(0, 3, 1, 2)
    x = (u8 / 255.0 - np.array(pre.mean).reshape(1, 3, 1, 1)) / np.array(pre.std).reshape(1, 3, 1, 1)
    x = x.astype(np.float32)
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits, probs = sess.run(None, {"images": x})
    else:
        m = torch.jit.load(str(out))
        with torch.inference_mode():
            logits, probs = (t.numpy() for t in m(torch.from_numpy(x)))
    expected = np.array([r.probabilities for r in rows])
    assert np.abs(probs - expected).max() < 1e-4
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_embedding_cache_is_reused_and_rebuilt_when_damaged(flat_data, tmp_path):
    cache = tmp_path / "cache"
    cfg = dict(data=str(flat_data), epochs=5, cache_dir=str(cache), engine="torch")  # (one cache file to tear)
    first = fit(TrainConfig(out=str(tmp_path / "r1"), **cfg))
    assert first.metrics["embeddings_from_cache"] == 0 and first.metrics["embed_images_per_s"] > 0
    assert "train_images_per_s" not in first.metrics  # the backbone does not train in feature extraction
    second = fit(TrainConfig(out=str(tmp_path / "r2"), **cfg))
    assert second.metrics["embeddings_from_cache"] == 42 and second.metrics["embed_images_per_s"] is None
    assert second.metrics["val_accuracy"] == first.metrics["val_accuracy"]
    (cache_file,) = [p for p in cache.glob("*.safetensors") if p.name.count(".") == 1]  # the final features'
    assert len(list(cache.glob("*.depths2.safetensors"))) == 1  # the earlier layers' beside them
    cache_file.write_bytes(cache_file.read_bytes()[:200])  # torn write
    logs = []

    class Log(Callbacks):
        def on_log(self, m):
            logs.append(m)

    third = fit(TrainConfig(out=str(tmp_path / "r3"), **cfg), Log())
    assert third.metrics["embeddings_from_cache"] == 0
    assert any("damaged" in m for m in logs)
    # The backbone's weights kept beside the embeddings (for reruns without torch): a torn copy is never used.
    (snapshot,) = cache.glob("*.backbone.safetensors")
    snapshot.write_bytes(snapshot.read_bytes()[:1000])
    fourth = fit(TrainConfig(out=str(tmp_path / "r4"), **cfg))
    assert fourth.metrics["embeddings_from_cache"] == 42 and "backbone not run" not in fourth.metrics["device"]
    assert fourth.metrics["val_accuracy"] == first.metrics["val_accuracy"]
    from engine.network.model import load_model

    load_model(fourth.run_dir)
    fifth = fit(TrainConfig(out=str(tmp_path / "r5"), **cfg))  # rewritten by the fourth run
    assert "backbone not run" in fifth.metrics["device"]
    # `python -m engine cache`: what is stored, and --clear deletes only the cache's own files
    from engine.embed.cache import cache_contents, clear_cache

    (entry,) = [e for e in cache_contents(str(cache)) if e["key"] != "-"]  # (besides the files-read index)
    assert entry["backbone"] == "efficientnet_lite0" and entry["images"] == 42
    assert len(entry["files"]) == 3  # the final features, the earlier layers' and the backbone's weights
    (cache / "notes.txt").write_text("mine")
    stored = sum(e["bytes"] for e in cache_contents(str(cache)))
    assert clear_cache(str(cache)) == stored
    assert cache_contents(str(cache)) == [] and [p.name for p in cache.iterdir()] == ["notes.txt"]
    assert fit(TrainConfig(out=str(tmp_path / "r6"), **cfg)).metrics["embeddings_from_cache"] == 0


def test_a_rerun_checks_no_header_again_but_sees_a_file_broken_since(tmp_path, monkeypatch):
    """The header check of every image was a quarter of a cached rerun: files decoded before and unchanged (size and
    modification time) are taken as they are, and a file rewritten since is checked, skipped and reported."""
    import time

    from engine.data import folder

    data = make_flat_dataset(tmp_path / "data", n_per_class=6)
    files = sorted(str(p) for p in data.rglob("*") if p.is_file())
    old = time.time() - 60  # (a file modified in the last two seconds is not remembered: its time may repeat)
    for p in files:
        os.utime(p, (old, old))
    cfg = dict(data=str(data), epochs=3, cache_dir=str(tmp_path / "cache"))
    fit(TrainConfig(out=str(tmp_path / "r1"), **cfg))
    checked = []
    real = folder.check_image
    monkeypatch.setattr(folder, "check_image", lambda p: checked.append(p) or real(p))
    second = fit(TrainConfig(out=str(tmp_path / "r2"), **cfg))
    assert checked == [] and second.metrics["embeddings_from_cache"] == len(files)
    Path(files[0]).write_bytes(b"this is no longer an image")
    os.utime(files[0], (old, old))  # even with its old time: its size changed
    third = fit(TrainConfig(out=str(tmp_path / "r3"), **cfg))
    assert [os.path.abspath(p) for p in checked] == [os.path.abspath(files[0])]
    assert [os.path.abspath(p) for p, _ in third.skipped] == [os.path.abspath(files[0])]
    assert third.metrics["embeddings_from_cache"] == len(files) - 1


def test_malicious_pickle_is_refused(tmp_path):
    import pickle

    from engine.network.backbones import load_state_dict_file

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "weights.pth"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(EngineError, match="Refused"):
        load_state_dict_file(str(bad))
    assert not marker.exists()


def test_tampered_model_json_is_rejected(fe_run, tmp_path):
    import shutil

    from engine.network.model import load_model

    run = tmp_path / "run"
    shutil.copytree(fe_run.run_dir, run)
    meta = json.loads((run / "model.json").read_text())
    meta["classes"] = meta["classes"][:2]
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="does not match model.json"):
        load_model(str(run))
    (run / "model.json").write_text("{not json")
    with pytest.raises(EngineError, match="damaged"):
        load_model(str(run))


def test_torchvision_backbone_from_a_local_weights_file(flat_data, tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "r"),
            backbone="resnet18",
            weights=str(weights),
            epochs=3,
            cache=False,
        )
    )
    meta = json.loads(Path(res.run_dir, "model.json").read_text())
    assert meta["backbone"] == "resnet18" and meta["preprocessing"]["mode"] == "center-crop"
    assert meta["feature_dim"] == 512


def test_missing_torchvision_weights_say_how_to_proceed(flat_data, tmp_path):
    with pytest.raises(EngineError, match="not on this machine.*efficientnet_lite0.*--weights"):
        fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "r"), backbone="resnet18"))


def test_out_of_memory_falls_back_to_a_smaller_batch(flat_data, tmp_path, monkeypatch):
    import torch

    import engine.train.fine_tuning.loop as tr

    real = tr.forward_backward
    calls = {"n": 0}

    def flaky(model, x, *a, **k):
        calls["n"] += 1
        if len(x) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, x, *a, **k)

    monkeypatch.setattr(tr, "forward_backward", flaky)
    logs = []

    class Log(Callbacks):
        def on_log(self, m):
            logs.append(m)

    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "oom"),
            mode="fine-tuning",
            epochs=1,
            batch_size=16,
            unfreeze=1,
            linear_probe_init=False,
        ),
        Log(),
    )
    assert res.run_dir
    assert any("retrying this epoch with batch size 8" in m for m in logs)
    assert any("retrying this epoch with batch size 4" in m for m in logs)


def test_exception_in_training_loop_leaves_nothing_half_written(flat_data, tmp_path, monkeypatch):
    import engine.train.fine_tuning.loop as tr

    def boom(*a, **k):
        raise ValueError("simulated failure inside the loop")

    monkeypatch.setattr(tr, "forward_backward", boom)
    with pytest.raises(ValueError, match="simulated"):
        fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "x"), mode="fine-tuning", epochs=1))
    assert not (tmp_path / "x").exists()
    monkeypatch.undo()
    # and the engine is usable for the next job
    assert fit(TrainConfig(data=str(flat_data), out=str(tmp_path / "y"), epochs=2)).run_dir


def test_cli_train_predict_export(flat_data, tmp_path):
    env = dict(os.environ)
    run = tmp_path / "cli-run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "train",
            str(flat_data),
            "--out",
            str(run),
            "--epochs",
            "5",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["run"] == str(run) and summary["status"] == "completed"
    assert "embedding 42/42" in r.stderr and "img/s" in r.stderr  # the backbone's progress
    assert "head, final features, C 0.0003: train loss" in r.stderr  # the head's, one line per strength tried
    out_csv = tmp_path / "p.csv"
    r = subprocess.run(
        [sys.executable, "-m", "engine", "predict", str(run), str(flat_data / "circles"), "--csv", str(out_csv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    with open(out_csv, encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 14
    r = subprocess.run(
        [sys.executable, "-m", "engine", "train", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "error: Folder not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "engine", "cache", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )  # filled by the training above
    assert r.returncode == 0 and "efficientnet_lite0" in r.stdout and " 42 " in r.stdout, r.stdout + r.stderr


def test_numpy_head_matches_torch_training():
    """The NumPy head trainer (which lets a rerun skip importing torch) takes the same steps as nn.Linear +
    cross-entropy + torch.optim.AdamW with cosine decay."""
    import torch

    from engine.train.head import HeadAdamW, loss_and_gradients

    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 3)
    w, b = (p.detach().numpy().copy() for p in ref.parameters())
    opt = HeadAdamW([w, b], 3e-3, 1e-4, total_steps=20)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=20)
    for _ in range(20):
        x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
        ref_opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        sched.step()
        loss, _, grads = loss_and_gradients(x.numpy(), y.numpy(), w, b)
        opt.step(grads)
        assert abs(loss - ref_loss.item()) < 1e-5
    assert np.abs(w - ref.weight.detach().numpy()).max() < 1e-5
    assert np.abs(b - ref.bias.detach().numpy()).max() < 1e-5
    assert abs(opt.lr - sched.get_last_lr()[0]) < 1e-12


def test_rerun_from_cached_features_needs_no_torch_and_saves_the_same_model(flat_data, tmp_path):
    """A second feature-extraction run on the same images trains from the cache without importing torch (the
    import alone takes seconds), and its run folder holds the same model as the first run's."""
    from safetensors.numpy import load_file

    from engine.network.model import load_model

    cfg = dict(data=str(flat_data), epochs=5, cache_dir=str(tmp_path / "cache"))
    first = fit(TrainConfig(out=str(tmp_path / "r1"), **cfg))
    script = (
        "import json, sys\n"
        "from engine import TrainConfig, fit\n"
        f"r = fit(TrainConfig(out=sys.argv[1], **{cfg!r}))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'run': r.run_dir, 'metrics': r.metrics}))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "r2")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["torch"] is False
    assert out["metrics"]["embeddings_from_cache"] == 42 and "backbone not run" in out["metrics"]["device"]
    assert out["metrics"]["val_accuracy"] == first.metrics["val_accuracy"]
    a, b = load_file(str(tmp_path / "r1" / "model.safetensors")), load_file(str(tmp_path / "r2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert load_model(out["run"]).classes == first.metrics["classes"]


def test_every_cpu_gets_the_int8_flavour_it_runs_exactly(monkeypatch, tmp_path):
    """CPUs with and without VNNI both get a7 (the flavour both compute to the same values), in a graph file named
    after it (older flavours' files are not reused); the benchmark's override is checked."""
    from engine.network import onnx_runtime as ob

    monkeypatch.delenv(ob.FLAVOUR_ENV, raising=False)
    for vnni in (True, False):
        monkeypatch.setattr(ob, "has_vnni", lambda v=vnni: v)
        assert ob.int8_flavour() == "a7"
        assert ob.graph_paths(str(tmp_path), "efficientnet_lite0", "w")[1].endswith(".int8-a7.onnx")
    monkeypatch.setenv(ob.FLAVOUR_ENV, "v8")
    assert ob.int8_flavour() == "v8"
    assert ob.graph_paths(str(tmp_path), "efficientnet_lite0", "w")[1].endswith(".int8-v8.onnx")
    monkeypatch.setenv(ob.FLAVOUR_ENV, "int4")
    with pytest.raises(EngineError, match="use one of"):
        ob.int8_flavour()


@pytest.mark.parametrize("flavour", ["v8", "a7"])
def test_each_int8_flavour_agrees_with_fp32_on_a_synthetic_folder(flavour, flat_data, tmp_path):
    """The shipped flavour (a7) and the VNNI candidate (v8) are built and checked on every CPU: the graph's structure
    (leading convolutions in fp32; a7's activations held to 0..127, v8's left at 8 bits) and its features computed
    exactly (what a CPU that never saturates runs: any CPU for a7, a VNNI CPU for v8) agree with fp32 past the
    thresholds --precision auto applies. Where this CPU runs the flavour exactly, its own kernels give the same
    features. (The fully quantised graph VNNI CPUs got before, s8, failed here: worst cosine 0.85.)"""
    import onnx

    from engine.embed.embeddings import _sample_pixels
    from engine.network import int8 as q
    from engine.network import onnx_runtime as ob
    from engine.network.backbones import load_backbone

    bb = load_backbone()
    pre = bb.preprocessing
    paths = sorted(str(p) for p in flat_data.rglob("*.jpg"))
    calib, sample = _sample_pixels(paths, pre, ob.CALIBRATION, 0), _sample_pixels(paths, pre, ob.SAMPLE, 1)
    fp32, path = str(tmp_path / "fp32.onnx"), str(tmp_path / f"{flavour}.onnx")
    ob.export_graph(bb.net, pre, fp32)
    info = q.quantize(fp32, path, [ob._normalise(calib[i : i + 8], pre) for i in range(0, len(calib), 8)], flavour)
    assert info["flavour"] == flavour and len(info["kept_in_fp32"]) == q.FP32_LEADING_CONVS
    g = onnx.load(path).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    quantised = [producer.get(c.input[1]) == "DequantizeLinear" for c in convs]
    assert not any(quantised[: q.FP32_LEADING_CONVS]) and all(quantised[q.FP32_LEADING_CONVS :])
    tops = [n for n in g.node if n.op_type == "Clip" and n.name.endswith("_u8top_clip")]
    assert bool(tops) == (flavour == "a7")
    ref = ob.OrtForward(fp32, pre, "fp32")(sample)
    exact = ob.OrtForward(path, pre, "int8", exact=True)(sample)
    cos = ob.agreement(exact, ref)
    assert cos.min() >= ob.MIN_COSINE and cos.mean() >= ob.MIN_MEAN_COSINE, (cos.min(), cos.mean())
    if flavour == "a7" or ob.has_vnni():
        assert ob.agreement(ob.OrtForward(path, pre, "int8")(sample), exact).mean() > 0.999


def test_int8_graph_with_taps_agrees_with_fp32_on_every_part(flat_data, tmp_path):
    """The graph that also returns the intermediate stages' features (engine/network/depths.py) quantised as the app
    makes it: the taps' pooling and the output's Concat stay in float (quantised, one 7-bit scale was shared by the
    final features and the taps, and the final features agreed with fp32 at 0.93), so the final features and the
    taps each agree with fp32 past --precision auto's thresholds, and the final features are those of the graph
    without taps."""
    import onnx

    from engine.embed.embeddings import _sample_pixels
    from engine.network import int8 as q
    from engine.network import onnx_runtime as ob
    from engine.network.backbones import load_backbone

    bb = load_backbone()
    pre, final_dim = bb.preprocessing, bb.net.final_dim
    paths = sorted(str(p) for p in flat_data.rglob("*.jpg"))
    calib, sample = _sample_pixels(paths, pre, ob.CALIBRATION, 0), _sample_pixels(paths, pre, ob.SAMPLE, 1)
    batches = [ob._normalise(calib[i : i + 8], pre) for i in range(0, len(calib), 8)]
    graphs = {}
    for name, taps in (("plain", False), ("taps", True)):
        bb.net.with_taps(taps)
        fp32, path = str(tmp_path / f"{name}.fp32.onnx"), str(tmp_path / f"{name}.int8.onnx")
        ob.export_graph(bb.net, pre, fp32)
        info = q.quantize(fp32, path, batches, "a7")
        graphs[name] = (ob.OrtForward(fp32, pre, "fp32")(sample), ob.OrtForward(path, pre, "int8", exact=True)(sample))
    g = onnx.load(path).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    assert not any(producer.get(i) == "DequantizeLinear" for n in g.node if n.op_type == "Concat" for i in n.input)
    ref, int8 = graphs["taps"]
    assert ref.shape[1] > final_dim
    for part in (slice(0, final_dim), slice(final_dim, None)):
        cos = ob.agreement(int8[:, part], ref[:, part])
        assert cos.min() >= ob.MIN_COSINE and cos.mean() >= ob.MIN_MEAN_COSINE, (part, cos.min(), cos.mean())
    assert np.allclose(int8[:, :final_dim], graphs["plain"][1], atol=1e-5)
    assert info["taps_pooled_in_float"] > 0
    assert ob.graph_paths(str(tmp_path), "efficientnet_lite0", "w", taps=True)[1].endswith(".int8-a7.r2.onnx")


def test_onnx_runtime_embedding_paths_keep_apart_and_predict_like_evaluate(flat_data, tmp_path, monkeypatch):
    """The frozen backbone through ONNX Runtime: fp32 features match PyTorch's; int8 is used only when its features
    agree with fp32 on the user's images (else it falls back and says so); each path has its own cache file; a run
    made with int8 features predicts with them (predict agrees with evaluate); --engine torch is the old path."""
    import torch

    from engine.embed.cache import _cache_key
    from engine.embed.embeddings import embed_files
    from engine.network import onnx_runtime as ob
    from engine.network.backbones import LITE0_PREPROCESSING, load_backbone
    from engine.predict.evaluate import evaluate
    from engine.predict.predictions import predict_folder

    keys = {_cache_key("efficientnet_lite0", "w", LITE0_PREPROCESSING, v) for v in ("torch", "ort-fp32", "ort-int8")}
    assert len(keys) == 3
    paths = sorted(str(p) for p in flat_data.rglob("*.jpg"))[:24]
    bb, cpu = load_backbone(), torch.device("cpu")
    f_torch, _, _, s_torch = embed_files(paths, bb, cpu, engine="torch")
    f_fp32, _, _, s_fp32 = embed_files(
        paths, bb, cpu, cache_dir=str(tmp_path / "c"), engine="onnxruntime", precision="fp32"
    )
    assert s_torch["features"]["engine"] == "torch" and s_fp32["features"]["precision"] == "fp32"
    assert ob.agreement(f_fp32, f_torch).min() > 0.9999
    logs = []
    _, _, _, s_small = embed_files(
        paths, bb, cpu, cache_dir=str(tmp_path / "c2"), engine="auto", precision="auto", log=logs.append
    )  # 24 images: the one-time int8 calibration would not pay off
    assert s_small["features"]["precision"] == "fp32" and "not made" in s_small["features"]["reason"]
    assert any("too few for the int8 graph" in m for m in logs)
    assert not list((tmp_path / "c2" / "graphs").glob("*.int8*"))
    monkeypatch.setattr(ob, "INT8_MIN_IMAGES", 10)
    _, _, _, s_auto = embed_files(
        paths, bb, cpu, cache_dir=str(tmp_path / "c2b"), engine="auto", precision="auto", log=logs.append
    )
    d = s_auto["features"]
    assert d["engine"] == "onnxruntime" and d["checked_images"] > 0
    assert d["int8_flavour"] == ob.int8_flavour() == "a7"  # the flavour every CPU runs exactly
    assert list((tmp_path / "c2b" / "graphs").glob(f"*.int8-{ob.int8_flavour()}.onnx"))
    # int8 exactly when its features agree with fp32 on this folder, else fp32 and the log says why: whatever the CPU
    agrees = d["min_cosine"] >= ob.MIN_COSINE and d["mean_cosine"] >= ob.MIN_MEAN_COSINE
    assert (d["precision"], d["reason"]) == (
        ("int8", "agrees with fp32") if agrees else ("fp32", "int8 disagreed with fp32")
    )
    assert agrees or any("using fp32" in m for m in logs)
    monkeypatch.setattr(ob, "MIN_COSINE", 1.01)  # agreement made to fail: fp32, and the log says why
    logs = []
    shutil.copytree(tmp_path / "c2b" / "graphs", tmp_path / "c4" / "graphs")  # the graphs, not the embeddings
    _, _, _, s_strict = embed_files(
        paths, bb, cpu, cache_dir=str(tmp_path / "c4"), engine="auto", precision="auto", log=logs.append
    )
    assert (s_strict["features"]["precision"], s_strict["features"]["reason"]) == ("fp32", "int8 disagreed with fp32")
    assert any("using fp32" in m for m in logs)
    monkeypatch.undo()
    run = fit(
        TrainConfig(
            data=str(flat_data), out=str(tmp_path / "int8"), precision="int8", epochs=20, cache_dir=str(tmp_path / "c3")
        )
    )
    meta = json.loads((Path(run.run_dir) / "model.json").read_text())
    made = meta["features"]
    assert (made["engine"], made["precision"], made["reason"]) == ("onnxruntime", "int8", "asked for")
    assert ".int8-" in made["graph"] and "images of this folder" in made["calibrated_on"]
    logs = []

    class Log(Callbacks):
        def on_log(self, m):
            logs.append(m)

    rows = predict_folder(PredictConfig(run.run_dir, [str(flat_data)]), Log()).rows
    assert not any("predicting with fp32" in m for m in logs)  # the run's own int8 graph
    acc = sum(r.prediction == Path(r.path).parent.name for r in rows) / len(rows)
    assert evaluate(EvaluateConfig(run.run_dir, str(flat_data))).metrics["accuracy"] == pytest.approx(acc)
