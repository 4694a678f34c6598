"""``transfer-studio --self-test``: prove an installed or frozen app works end to end, headless.

Creates the main window (offscreen), makes a tiny image folder, trains the default backbone by feature extraction
and by fine-tuning through the app's own worker thread, predicts the folder to a CSV, checks the CSV, and exits
0; on any failure it prints what failed and exits 1.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time


def _say(msg: str) -> None:
    if sys.stdout is not None:
        print(f"self-test: {msg}", flush=True)


def _make_images(root: str) -> None:
    from PIL import Image, ImageDraw

    for ci, (name, colour) in enumerate((("red", (220, 40, 40)), ("blue", (40, 60, 220)))):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(8):
            im = Image.new("RGB", (64 + i, 64), (240, 240, 240))
            d = ImageDraw.Draw(im)
            if ci == 0:
                d.ellipse([8, 8, 56, 56], fill=colour)
            else:
                d.rectangle([8 + i, 8, 56, 56], fill=colour)
            im.save(os.path.join(root, name, f"{i}.png"))


def scratch_window(tmp: str):
    """The real main window with throwaway settings and runs folder under ``tmp``, 1280x800, shown (for the
    self-test and the measuring tools in tools/)."""
    from PySide6.QtCore import QSettings

    from gui.main_window import MainWindow

    settings = QSettings(os.path.join(tmp, "settings.ini"), QSettings.IniFormat)
    settings.setValue("train/runs_dir", os.path.join(tmp, "runs"))
    win = MainWindow(settings)
    win.resize(1280, 800)
    win.show()
    return win


def backbones_listed(win) -> bool:
    """The start-up discovery has filled the backbone list (or said why it could not)."""
    return win.model_tab.table.rowCount() > 0 or "Backbones:" in win.model_tab.loading.text()


def run_self_test(timeout_s: float = 600.0) -> int:
    from PySide6.QtWidgets import QApplication

    from gui.jobs.eventloop import wait_until

    t0 = time.perf_counter()
    app = QApplication.instance() or QApplication([sys.argv[0], "-platform", "offscreen"])  # noqa: F841 (kept alive)
    from engine.config import PredictConfig
    from engine.predict.predictions import predict_folder

    tmp = tempfile.mkdtemp(prefix="ts-selftest-")
    os.environ["TRANSFER_STUDIO_CACHE"] = os.path.join(tmp, "cache")

    def wait(cond, what: str) -> None:
        if not wait_until(cond, timeout_s):
            raise RuntimeError(f"timed out waiting for {what}")

    win = None
    try:
        data = os.path.join(tmp, "images")
        _make_images(data)
        win = scratch_window(tmp)
        wait(lambda: backbones_listed(win), "the backbone list")
        if win.model_tab.backbone() != "efficientnet_lite0":
            raise RuntimeError("the bundled EfficientNet-Lite0 is not available")
        win.scan_folder(data)
        # The same notion of "scan finished" that Start training uses.
        wait(lambda: not win.session.scanning or bool(win.last_error), "the folder scan")
        if win.last_error:
            raise RuntimeError(win.last_error)
        runs = {}
        for mode, epochs in (("feature-extraction", 10), ("fine-tuning", 1)):
            # feature extraction through ONNX Runtime int8 (the fastest CPU path must work in the bundle too)
            win.session.update(
                {
                    "mode": mode,
                    "epochs": epochs,
                    "engine": "onnxruntime" if mode == "feature-extraction" else "auto",
                    "precision": "int8" if mode == "feature-extraction" else "auto",
                }
            )
            win.session.last_result = None
            win.start_training()
            wait(lambda: (not win.busy() and win.last_result is not None) or bool(win.last_error), f"{mode}")
            if win.last_error:
                raise RuntimeError(f"{mode}: {win.last_error}")
            res = win.last_result
            if not res.run_dir:
                raise RuntimeError(f"{mode}: no run was saved ({res.message})")
            runs[mode] = res.run_dir
            feats = res.metrics.get("features") or {}
            _say(
                f"{mode}: val accuracy {res.metrics.get('val_accuracy')}, features {feats.get('precision', '-')}"
                f"{' (flavour ' + feats['int8_flavour'] + ')' if feats.get('int8_flavour') else ''} ({res.run_dir})"
            )
            if mode == "feature-extraction" and (res.metrics.get("features") or {}).get("precision") != "int8":
                raise RuntimeError(f"feature extraction did not run through ONNX Runtime int8: {res.metrics}")
        out = os.path.join(tmp, "predictions.csv")
        predict_folder(PredictConfig(runs["fine-tuning"], [data], out, top_k=2))
        with open(out, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if (
            len(rows) != 16
            or any(r["error"] for r in rows)
            or not all(r["prediction"] in ("red", "blue") for r in rows)
        ):
            raise RuntimeError(f"unexpected CSV: {len(rows)} rows")
        correct = sum(1 for r in rows if r["path"].split(os.sep)[-2] == r["prediction"])
        _say(f"predicted {len(rows)} images, {correct} correct; CSV ok")
        _say(f"passed in {time.perf_counter() - t0:.1f} s")
        return 0
    except Exception as exc:  # the whole point is to report any failure as a message and exit code
        _say(f"FAILED: {exc.__class__.__name__}: {exc}")
        return 1
    finally:
        if win is not None:
            win.confirm = lambda *a: True
            win.close()
            for job in (win.job, win.scan, win.discovery):
                if job is not None:
                    job.wait(60000)
