"""``python -m engine bench-trust [FOLDER ...]``: how far the app's confidence, "unsure" and "unfamiliar" hold.

For each folder (default: ../shared/datasets/hymenoptera and flowers) and each mode, a run is trained on a
flat copy of the folder (links, not copies) split 60/20/20: the temperature and thresholds are set on validation,
and the test images play no part in either. Printed per run: expected calibration error and log-loss before and
after temperature scaling (as the run measured them, on the test split), accuracy at 80% coverage, the share of
the test images marked unfamiliar (same classes, never seen: should be small) and the share of another folder's
images marked unfamiliar (something else: should be large).
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time

from .config import PredictConfig, TrainConfig
from .data import scan
from .predict import predict_folder
from .train import fit

SHARED = os.path.join("..", "shared", "datasets")


def _flat_links(src: str, dst: str) -> str:
    """A flat view (one folder per class, symbolic links) of a flat or pre-split folder, so it can be split anew."""
    ds = scan(src, val_split=0.0, test_split=0.0, check_files=False)
    for i, s in enumerate(ds.samples):
        folder = os.path.join(dst, ds.classes[s.label])
        os.makedirs(folder, exist_ok=True)
        os.symlink(os.path.abspath(s.path), os.path.join(folder, f"{i:06d}{os.path.splitext(s.path)[1]}"))
    return dst


def _at_coverage(curve: list[dict], coverage: float) -> float | None:
    pts = [p for p in curve if p["coverage"] >= coverage]
    return min(pts, key=lambda p: p["coverage"])["accuracy"] if pts else None


def _unfamiliar_share(run: str, paths: list[str]) -> float:
    rows = predict_folder(PredictConfig(run, paths)).rows
    rows = [r for r in rows if not r.error]
    return sum(r.status == "unfamiliar" for r in rows) / max(1, len(rows))


def run_bench_trust(a) -> int:
    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers")]
    missing = [f for f in folders if not os.path.isdir(f)]
    if missing:
        print(f"skipped: {', '.join(missing)} not found (the shared datasets are not on this machine)")
        return 0
    tmp = tempfile.mkdtemp(prefix="ts-bench-trust-")
    flat = {f: _flat_links(f, os.path.join(tmp, f"flat-{i}")) for i, f in enumerate(folders)}
    rows = []
    for f in folders:
        others = [o for o in folders if o != f]
        other_paths = [s.path for o in others for s in scan(o, 0.0, 0.0, check_files=False).samples]
        random.Random(0).shuffle(other_paths)
        other_paths = other_paths[: a.other_images]
        for mode, epochs in (("feature-extraction", None), ("fine-tuning", a.ft_epochs)):
            if mode not in a.modes.split(","):
                continue
            t0 = time.perf_counter()
            res = fit(TrainConfig(data=flat[f], out=os.path.join(tmp, "runs", f"{os.path.basename(f)}-{mode}"),
                                  mode=mode, epochs=epochs, val_split=0.2, test_split=0.2, seed=0, device=a.device,
                                  cache_dir=os.path.join(tmp, "cache")))
            m, cal = res.metrics, res.metrics["calibration"]
            test_paths = [p for p, split in _splits(res.run_dir) if split == "test"]
            row = {"folder": os.path.basename(os.path.normpath(f)), "mode": mode, "seconds": time.perf_counter() - t0,
                   "test_accuracy": m["test_accuracy"], "measured_on": cal["measured_on"],
                   "temperature": cal["temperature"], "ece_before": cal["ece_before"], "ece_after": cal["ece_after"],
                   "ece_floor": cal.get("ece_noise_floor"),
                   "log_loss_before": cal["log_loss_before"], "log_loss_after": cal["log_loss_after"],
                   "accuracy_at_80": _at_coverage(cal["coverage"], 0.8), "coverage_points": len(cal["coverage"]),
                   "unfamiliar_same_classes": _unfamiliar_share(res.run_dir, test_paths),
                   "unfamiliar_something_else": _unfamiliar_share(res.run_dir, other_paths) if other_paths else None,
                   "n_test": len(test_paths), "n_other": len(other_paths)}
            rows.append(row)
            print(f"  {row['folder']} {mode}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{'folder':12} {'mode':19} {'test acc':>8} {'T':>5} {'ECE before':>10} {'after':>6} {'floor':>6} "
          f"{'logloss b':>9} {'after':>6} {'acc@80%':>7} {'unfam same':>10} {'unfam other':>11}")
    for r in rows:
        other = "" if r["unfamiliar_something_else"] is None else f"{100 * r['unfamiliar_something_else']:.1f}%"
        print(f"{r['folder']:12} {r['mode']:19} {r['test_accuracy']:8.3f} {r['temperature']:5.2f} "
              f"{r['ece_before']:10.3f} {r['ece_after']:6.3f} {r['ece_floor']:6.3f} {r['log_loss_before']:9.3f} "
              f"{r['log_loss_after']:6.3f} "
              f"{(r['accuracy_at_80'] or float('nan')):7.3f} {100 * r['unfamiliar_same_classes']:9.1f}% {other:>11}")
    print("\nEvery run: a flat copy split 60/20/20 (seed 0); temperature and thresholds from validation; ECE, log-loss "
          "and accuracy at 80% coverage measured on the test split; 'floor' = the ECE a perfectly calibrated model "
          "shows on the same number of test images with the same confidences (mean of 200 draws); 'unfam same' = "
          "test images (classes it knows, never seen) marked unfamiliar; 'unfam other' = up to "
          f"{a.other_images} images of the other folder(s).")
    if a.json:
        from .runs import atomic_write_json, json_safe

        atomic_write_json(a.json, json_safe(rows))
    return 0


def _splits(run_dir: str) -> list[tuple[str, str]]:
    import csv

    with open(os.path.join(run_dir, "split.csv"), encoding="utf-8", newline="") as f:
        return [(r["path"], r["split"]) for r in csv.DictReader(f)]

