"""``python -m benchmarks trust [FOLDER ...]``: how far the app's confidence, "unsure" and "unfamiliar" hold.

For each folder (default: ../shared/datasets/hymenoptera and flowers) and each mode, runs are trained on a
flat copy of the folder (links, not copies) split 60/20/20, once per split (``--splits``, seeds 0, 1, ...): the
temperature and thresholds are set on validation, and the test images play no part in either. Printed per folder
and mode, on every split's test predictions pooled (one split of hymenoptera has 87 test images, too few to tell an
ECE of 0.03 from 0.05): expected calibration error and log-loss before and after temperature scaling, accuracy at
80% coverage; and, as the mean and range over splits, the share of the test images marked unfamiliar (same
classes, never seen: should be small) and the share of another folder's images marked unfamiliar (something else:
should be large).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

import numpy as np

from engine.config import PredictConfig, TrainConfig
from engine.data.folder import scan
from engine.predict.predictions import predict_folder
from engine.train.fit import fit
from engine.trust.calibration import coverage_curve, ece_noise_floor, expected_calibration_error, log_loss, softmax

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


def _predicted(run: str, paths: list[str]) -> list:
    return [r for r in predict_folder(PredictConfig(run, paths)).rows if not r.error]


def _one_run(a, flat: str, name: str, mode: str, seed: int, other_paths: list[str], tmp: str) -> dict:
    """Train on one 60/20/20 split of ``flat``; predict its test images and the other folder's images."""
    t0 = time.perf_counter()
    res = fit(
        TrainConfig(
            data=flat,
            out=os.path.join(tmp, "runs", f"{name}-{mode}-{seed}"),
            mode=mode,
            epochs=a.ft_epochs if mode == "fine-tuning" else None,
            val_split=0.2,
            test_split=0.2,
            seed=seed,
            device=a.device,
            cache_dir=os.path.join(tmp, "cache"),
        )
    )
    cal = res.metrics["calibration"]
    test = [(p, c) for p, split, c in _splits(res.run_dir) if split == "test"]
    rows = _predicted(res.run_dir, [p for p, _ in test])
    label = dict(test)
    classes = res.metrics["classes"]
    after = np.array([r.probabilities for r in rows], dtype=np.float64)
    before = softmax(cal["temperature"] * np.log(np.maximum(after, 1e-30)))  # the logits, up to a constant
    other = _predicted(res.run_dir, other_paths) if other_paths else []
    return {
        "seconds": time.perf_counter() - t0,
        "temperature": cal["temperature"],
        "test_accuracy": res.metrics["test_accuracy"],
        "before": before,
        "after": after,
        "y": np.array([classes.index(label[r.path]) for r in rows]),
        "same": np.mean([r.status == "unfamiliar" for r in rows]),
        "other": np.mean([r.status == "unfamiliar" for r in other]) if other else None,
        "ece_after_split": cal["ece_after"],
    }


def _pooled(name: str, mode: str, runs: list[dict]) -> dict:
    """One row: every split's test predictions pooled (more images: a lower noise floor), the unfamiliar shares as
    the mean and range over splits."""
    before, after = np.concatenate([r["before"] for r in runs]), np.concatenate([r["after"] for r in runs])
    y = np.concatenate([r["y"] for r in runs])
    others = [r["other"] for r in runs if r["other"] is not None]
    return {
        "folder": name,
        "mode": mode,
        "splits": len(runs),
        "n_test": int(len(y)),
        "seconds": float(np.mean([r["seconds"] for r in runs])),
        "test_accuracy": float(np.mean(after.argmax(1) == y)),
        "temperatures": [r["temperature"] for r in runs],
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "ece_floor": ece_noise_floor(after),
        "ece_after_per_split": [r["ece_after_split"] for r in runs],
        "log_loss_before": log_loss(before, y),
        "log_loss_after": log_loss(after, y),
        "accuracy_at_80": _at_coverage(coverage_curve(after, y), 0.8),
        "unfamiliar_same_classes": [float(r["same"]) for r in runs],
        "unfamiliar_something_else": [float(o) for o in others],
    }


def _share(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{100 * np.mean(values):.1f}% ({100 * min(values):.0f}-{100 * max(values):.0f})"


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
        name = os.path.basename(os.path.normpath(f))
        other_paths = [s.path for o in folders if o != f for s in scan(o, 0.0, 0.0, check_files=False).samples]
        random.Random(0).shuffle(other_paths)
        other_paths = other_paths[: a.other_images]
        for mode in ("feature-extraction", "fine-tuning"):
            if mode not in a.modes.split(","):
                continue
            runs = []
            for seed in range(a.splits):
                runs.append(_one_run(a, flat[f], name, mode, seed, other_paths, tmp))
                print(f"  {name} {mode} split {seed}: {runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
            rows.append(_pooled(name, mode, runs))
    print(
        f"\n{'folder':12} {'mode':19} {'n':>5} {'test acc':>8} {'T (per split)':>16} {'ECE before':>10} "
        f"{'after':>6} {'floor':>6} {'logloss b':>9} {'after':>6} {'acc@80%':>7} {'unfam same':>15} "
        f"{'unfam other':>16}"
    )
    for r in rows:
        temps = "/".join(f"{t:.2f}" for t in r["temperatures"])
        print(
            f"{r['folder']:12} {r['mode']:19} {r['n_test']:5} {r['test_accuracy']:8.3f} {temps:>16} "
            f"{r['ece_before']:10.3f} {r['ece_after']:6.3f} {r['ece_floor']:6.3f} {r['log_loss_before']:9.3f} "
            f"{r['log_loss_after']:6.3f} {(r['accuracy_at_80'] or float('nan')):7.3f} "
            f"{_share(r['unfamiliar_same_classes']):>15} {_share(r['unfamiliar_something_else']):>16}"
        )
    print(
        f"\nEvery run: a flat copy split 60/20/20, {a.splits} split(s) (seeds 0-{a.splits - 1}); temperature and "
        "thresholds from validation; each split's test predictions pooled: ECE (15 bins), log-loss and accuracy at "
        "80% coverage measured on them; 'floor' = the ECE a perfectly calibrated model shows on as many images with "
        "the same confidences (mean of 200 draws); 'unfam same' = test images (classes it knows, never seen) "
        f"marked unfamiliar; 'unfam other' = {a.other_images} images of the other folder(s); both as the mean "
        "(lowest-highest) over splits."
    )
    if a.json:
        from engine.runs import atomic_write_json, json_safe

        atomic_write_json(a.json, json_safe(rows))
    return 0


def _splits(run_dir: str) -> list[tuple[str, str]]:
    import csv

    with open(os.path.join(run_dir, "split.csv"), encoding="utf-8", newline="") as f:
        return [(r["path"], r["split"], r["class"]) for r in csv.DictReader(f)]
