"""Messy real-world input and faults: the engine must finish or say clearly what to change, and lose nothing."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import CancelToken, EngineError, TrainConfig, fit
from engine.config import EvaluateConfig, PredictConfig
from engine.data.folder import scan
from engine.events import Callbacks
from tests.imagegen import draw_image, make_flat_dataset

ROOT = Path(__file__).resolve().parents[1]


def make_bad_corpus(root: Path) -> dict[str, bool]:
    """Two classes of good images plus every kind of odd file; returns {file name: expected readable}."""
    make_flat_dataset(root, n_per_class=8, classes=("circles", "squares"))
    c, s = root / "circles", root / "squares"
    expect = {}

    def add(path: Path, readable: bool):
        expect[path.name] = readable

    (c / "zero.jpg").write_bytes(b"")
    add(c / "zero.jpg", False)
    good = (s / "squares_000.jpg").read_bytes()
    (s / "truncated.jpg").write_bytes(good[: len(good) // 2])
    add(s / "truncated.jpg", False)
    (c / "text.png").write_text("hello, I am not a PNG")
    add(c / "text.png", False)
    buf = Path(root / "tmp.png")
    draw_image("circles", 5).save(buf)
    raw = bytearray(buf.read_bytes())
    buf.unlink()
    raw[60:160] = os.urandom(100)  # valid header, corrupt compressed data
    (c / "corrupt-data.png").write_bytes(bytes(raw))
    add(c / "corrupt-data.png", False)
    Image.new("1", (20000, 20000)).save(c / "bomb.png", optimize=True)
    add(c / "bomb.png", False)
    draw_image("circles", 6).convert("CMYK").save(c / "cmyk.jpg")
    add(c / "cmyk.jpg", True)
    Image.fromarray(np.asarray(draw_image("squares", 7).convert("L"), dtype=np.uint16) * 257).save(s / "grey16.png")
    add(s / "grey16.png", True)
    draw_image("circles", 8).convert("RGBA").save(c / "rgba.png")
    add(c / "rgba.png", True)
    draw_image("squares", 9).convert("P").save(s / "palette.gif")
    add(s / "palette.gif", True)
    frames = [draw_image("squares", 10 + i).convert("P") for i in range(3)]
    frames[0].save(s / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add(s / "animated.gif", True)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(c / "one-pixel.png")
    add(c / "one-pixel.png", True)
    rot = draw_image("circles", 11)
    exif = rot.getexif()
    exif[0x0112] = 6
    rot.save(c / "exif-rotated.jpg", exif=exif)
    add(c / "exif-rotated.jpg", True)
    draw_image("squares", 12).save(s / "ünïcødé name with spaces.jpg")
    add(s / "ünïcødé name with spaces.jpg", True)
    draw_image("circles", 13).save(c / "UPPER.JPEG")
    add(c / "UPPER.JPEG", True)
    (c / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (s / "notes.txt").write_text("not an image extension: ignored")
    return expect


def test_bad_image_corpus_through_every_job(tmp_path):
    from engine.predict.evaluate import evaluate
    from engine.predict.predictions import predict_folder

    root = tmp_path / "messy"
    expect = make_bad_corpus(root)
    bad = {n for n, ok in expect.items() if not ok}
    ds = scan(root, val_split=0.25)
    for mode, extra in (("feature-extraction", {"epochs": 5}), ("fine-tuning", {"epochs": 1, "unfreeze": 1})):
        res = fit(TrainConfig(data=str(root), out=str(tmp_path / mode), mode=mode, cache=False, **extra))
        skipped = {Path(p).name: r for p, r in res.skipped}
        assert set(skipped) == bad, mode
        assert all(r for r in skipped.values())
        with open(tmp_path / mode / "split.csv", encoding="utf-8") as f:
            used = {Path(r["path"]).name for r in csv.DictReader(f)}
        assert {n for n, ok in expect.items() if ok} <= used
    assert "too large" in {Path(p).name: r for p, r in ds.skipped}["bomb.png"]
    ev = evaluate(EvaluateConfig(str(tmp_path / "feature-extraction"), str(root)))
    assert ev.metrics["n"] == 16 + sum(expect.values()) and {Path(p).name for p, _ in ev.skipped} == bad
    out = tmp_path / "pred.csv"
    predict_folder(PredictConfig(str(tmp_path / "fine-tuning"), str(root), str(out)))
    with open(out, encoding="utf-8") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == set(expect) | {p.name for p in root.rglob("*_0*.jpg")}
    for name, ok in expect.items():
        assert bool(rows[name]["error"]) != ok, name


def test_bad_folders_get_a_run_or_one_clear_message(tmp_path):
    root = make_flat_dataset(tmp_path / "d", n_per_class=6, classes=("circles", "squares"))
    (root / "empty class").mkdir()
    (root / ".hidden").mkdir()
    draw_image("circles", 1).save(root / ".hidden" / "x.jpg")
    (root / "circles" / ".secret.jpg").write_bytes(b"hidden file")
    os.symlink(root / "circles", root / "circles" / "loop")  # a symlink loop inside a class
    uni = root / "Ünïcødé class ñ"
    uni.mkdir()
    for i in range(2):
        draw_image("stripes", i).save(uni / f"{i}.png")
    single = root / "lonely"
    single.mkdir()
    draw_image("triangles", 0).save(single / "only.png")
    ds = scan(root, val_split=0.3)
    assert ds.classes == ["circles", "lonely", "squares", "Ünïcødé class ñ"]
    assert any("empty class" in w and "no readable images" in w for w in ds.warnings)
    assert any("lonely" in w and "only 1" in w for w in ds.warnings)
    assert ds.counts()["lonely"] == {"train": 1, "val": 0, "test": 0}
    assert ds.counts()["circles"]["train"] + ds.counts()["circles"]["val"] == 6  # loop not followed twice
    assert not any(".secret" in s.path or ".hidden" in s.path for s in ds.samples)
    res = fit(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=3, val_split=0.3, cache=False))
    assert res.run_dir and json.loads(Path(res.run_dir, "model.json").read_text())["classes"][3] == "Ünïcødé class ñ"


def test_unreadable_subfolder_and_vanishing_files_are_reported(tmp_path, monkeypatch):
    import engine.data.folder as data

    root = make_flat_dataset(tmp_path / "d", n_per_class=5, classes=("circles", "squares"))
    (root / "squares" / "private").mkdir()
    real_walk = os.walk

    def walk(top, onerror=None, followlinks=False):  # root bypasses chmod, so simulate the permission error
        for dirpath, dirnames, filenames in real_walk(top, onerror=onerror, followlinks=followlinks):
            if "private" in dirnames:
                dirnames.remove("private")
                onerror(PermissionError(13, "Permission denied", os.path.join(dirpath, "private")))
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(data.os, "walk", walk)
    real_check = data.check_image
    gone = str(root / "circles" / "circles_002.jpg")
    monkeypatch.setattr(
        data, "check_image", lambda p: "file disappeared while scanning" if p == gone else real_check(p)
    )
    ds = scan(root)
    reasons = dict(ds.skipped)
    assert "permission" in reasons[str(root / "squares" / "private")].lower()
    assert reasons[gone] == "file disappeared while scanning"
    assert len(ds.samples) == 9
    # Predicting the same folder: the unlistable subfolder is a row with its reason, not silently missing
    from engine.predict.predictions import predict_folder

    run = fit(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=2, val_split=0.4)).run_dir
    res = predict_folder(PredictConfig(run, str(root), str(tmp_path / "p.csv")))
    with open(tmp_path / "p.csv", encoding="utf-8") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert "permission" in rows[str(root / "squares" / "private")]["error"].lower()
    assert len(rows) == 11 and res.n_errors == 1  # 10 images (predict reads files itself) + the folder


@pytest.mark.parametrize("phase", ["scanning", "embedding", "training"])
def test_cancel_in_each_phase_leaves_the_engine_usable(flat_data, tmp_path, phase):
    from engine.events import Progress

    cancel = CancelToken()

    class CancelAt(Callbacks):
        def on_progress(self, p: Progress):
            if p.phase == phase:
                cancel.cancel()

        def on_train_batch_end(self, m):
            if phase == "training":
                cancel.cancel()

    mode = "fine-tuning" if phase == "training" else "feature-extraction"
    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "c"),
            mode=mode,
            epochs=2,
            batch_size=8,
            unfreeze=1,
            cache_dir=str(tmp_path / "cache"),
            linear_probe_init=False,
        ),
        CancelAt(),
        cancel,
    )
    assert res.cancelled and res.run_dir is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert fit(
        TrainConfig(data=str(flat_data), out=str(tmp_path / "after"), epochs=2, cache_dir=str(tmp_path / "cache"))
    ).run_dir


def test_cancel_during_prediction(fe_run, flat_data):
    from engine.predict.predictions import predict_folder

    cancel = CancelToken()

    class StopAfterFirstChunk(Callbacks):
        def on_predictions(self, rows):
            cancel.cancel()

    res = predict_folder(
        PredictConfig(fe_run.run_dir, str(flat_data), None, batch_size=4), StopAfterFirstChunk(), cancel
    )
    assert res.cancelled and 0 < len(res.rows) < 42 and res.csv_path is None


def test_disk_full_when_saving_keeps_earlier_runs(flat_data, tmp_path, monkeypatch):
    import safetensors.numpy
    import safetensors.torch

    runs = tmp_path / "runs"
    first = fit(TrainConfig(data=str(flat_data), out=str(runs / "first"), epochs=2))
    before = {p.name: p.read_bytes() for p in Path(first.run_dir).iterdir()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(safetensors.numpy, "save_file", full)  # a rerun from cached features never loads torch
    with pytest.raises(EngineError, match="No space left on device.*earlier runs are untouched"):
        fit(TrainConfig(data=str(flat_data), out=str(runs / "second"), epochs=2))
    assert sorted(p.name for p in runs.iterdir()) == ["first"]
    assert {p.name: p.read_bytes() for p in Path(first.run_dir).iterdir()} == before
    monkeypatch.undo()
    assert fit(TrainConfig(data=str(flat_data), out=str(runs / "third"), epochs=2)).run_dir


def test_fine_tuning_a_folder_bigger_than_memory_keeps_pixels_on_disk(flat_data, tmp_path, monkeypatch):
    """Decoded images that would not fit in memory go to a file on disk (same training, same result) instead of
    the process being killed; with no room on disk either, one clear message before anything is decoded."""
    import shutil

    import engine.data.decode

    cfg = dict(
        data=str(flat_data),
        mode="fine-tuning",
        epochs=2,
        batch_size=8,
        unfreeze="all",
        seed=0,
        cache_dir=str(tmp_path / "cache"),
    )
    in_memory = fit(TrainConfig(out=str(tmp_path / "ram"), **cfg))
    logs = []

    class Log(Callbacks):
        def on_log(self, m):
            logs.append(m)

    monkeypatch.setattr(engine.data.decode, "available_memory", lambda: 100_000)  # 100 kB: nothing fits
    on_disk = fit(TrainConfig(out=str(tmp_path / "disk"), **cfg), Log())
    assert any("would not fit in memory" in m for m in logs)
    assert on_disk.metrics["val_accuracy"] == in_memory.metrics["val_accuracy"]
    with open(Path(on_disk.run_dir) / "history.csv") as a, open(Path(in_memory.run_dir) / "history.csv") as b:
        losses = [[float(r["train_loss"]), float(r["val_loss"])] for r in csv.DictReader(a)]
        assert np.allclose(losses, [[float(r["train_loss"]), float(r["val_loss"])] for r in csv.DictReader(b)])
    assert not list((tmp_path / "cache").glob("pixels-*")), "the pixel file was left behind"

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(EngineError, match="more than the memory available.*Use feature extraction"):
        fit(TrainConfig(out=str(tmp_path / "none"), **cfg))
    assert not (tmp_path / "none").exists()


def test_runs_folder_that_cannot_be_created_is_a_clear_message(flat_data, tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    with pytest.raises(EngineError, match="Cannot create the runs folder"):
        fit(TrainConfig(data=str(flat_data), out=str(blocker / "run"), epochs=2))


def _check_left_behind(runs: Path, cache: Path) -> tuple[int, int]:
    """Every run folder is complete and loadable; every cache file loads. Returns (complete runs, temp dirs)."""
    from engine.network.model import load_model
    from engine.runs import list_runs

    complete = 0
    temps = 0
    for p in runs.iterdir() if runs.exists() else []:
        if p.name.startswith(".tmp"):
            temps += 1  # an interrupted run: hidden, never listed
            continue
        load_model(str(p))
        complete += 1
    assert len(list_runs(str(runs))) == complete
    for f in cache.glob("*.safetensors") if cache.exists() else []:
        from safetensors import safe_open

        with safe_open(str(f), framework="numpy") as h:
            if f.name.endswith(".backbone.safetensors"):
                assert h.metadata()["weights_id"] and all(h.get_tensor(k).size for k in h.keys())
            else:
                assert h.get_tensor("features").shape[0] == len(json.loads(h.metadata()["keys"]))
    return complete, temps


@pytest.mark.parametrize("kills", [int(os.environ.get("TS_KILLS", "3"))])
def test_sigkill_at_random_moments_leaves_nothing_torn(flat_data, tmp_path, kills):
    """Kill a CLI training with SIGKILL at random points; what is left is complete or hidden, never torn.

    CI runs 3 kills; `TS_KILLS=30 pytest -k sigkill` runs the long version (see docs/reliability.md)."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    rng = random.Random(1)
    env = dict(os.environ)
    for i in range(kills):
        cmd = [
            sys.executable,
            "-m",
            "engine",
            "train",
            str(flat_data),
            "--out",
            str(runs / f"r{i}"),
            "--epochs",
            "5",
            "--cache-dir",
            str(cache),
            "--quiet",
        ]
        if i % 2:
            cmd += ["--mode", "fine-tuning", "--epochs", "1", "--unfreeze", "1"]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 9.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        _check_left_behind(runs, cache)
    complete, temps = _check_left_behind(runs, cache)
    assert complete + temps <= kills
