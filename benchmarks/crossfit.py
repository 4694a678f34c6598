"""``python -m benchmarks crossfit``: feature extraction with and without cross-fitting, judged on a test split.

Each folder is linked into ``train/`` and ``test/`` (a quarter of each class, by a per-image draw: the same test
images for every row of that folder), optionally with only N training images per class (three draws of them).
The app then trains as a user would (no validation folder: it carves 20% of train/ for validation, or with
cross-fitting judges all of train/ out of fold); the test images play no part in training, calibration or the
choice of epoch. Beside it, scikit-learn's logistic regression on the same features of every training image (the
ten-line script a user might compare with). Times are the job's own ``train_seconds`` from the embedding cache.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile

import numpy as np

from engine import TrainConfig, fit
from engine.data.folder import scan
from engine.data.splits import _draw, _key
from engine.events import Callbacks, CancelToken
from engine.train.feature_extraction import embed_dataset
from engine.trust.calibration import ece_noise_floor, expected_calibration_error, softmax

SHARED = os.path.join("..", "shared", "datasets")
TEST_SHARE = 0.25


def digits_folder(dst: str) -> str:
    """scikit-learn's 1,797 handwritten digits (8x8, bundled with it: no download) as 64 px PNGs, one folder per
    digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = os.path.join(dst, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = (255 - img * 255 / 16).astype(np.uint8)  # dark ink on white, as written
        Image.fromarray(pixels).resize((64, 64), Image.NEAREST).save(os.path.join(folder, f"{i:04d}.png"))
    return dst


def _link(ds, picks: list[int], split: str, dst: str) -> None:
    for i in picks:
        s = ds.samples[i]
        folder = os.path.join(dst, split, ds.classes[s.label])
        os.makedirs(folder, exist_ok=True)
        os.symlink(os.path.abspath(s.path), os.path.join(folder, f"{i:06d}{os.path.splitext(s.path)[1]}"))


def _views(src: str, dst: str, per_class: int | None, draw: int) -> str:
    """train/ and test/ links of ``src``: a fixed quarter of each class for test, the rest (or ``per_class`` of it,
    chosen by ``draw``) for training."""
    ds = scan(src, val_split=0.0, test_split=0.0, check_files=False)
    u = [_draw(99, s.label, "test|" + _key(s.path, ds.root)) for s in ds.samples]
    test = [i for i, v in enumerate(u) if v < TEST_SHARE]
    rest = [i for i, v in enumerate(u) if v >= TEST_SHARE]
    if per_class:
        pick = []
        for c in range(len(ds.classes)):
            mine = [i for i in rest if ds.samples[i].label == c]
            pick += sorted(mine, key=lambda i: _draw(draw, c, "pick|" + _key(ds.samples[i].path, ds.root)))[:per_class]
        rest = pick
    _link(ds, rest, "train", dst)
    _link(ds, test, "test", dst)
    return dst


def _test_probs(run_dir: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with open(os.path.join(run_dir, "val_predictions.csv"), encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return (
        np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows]),
        np.array([classes.index(r["label"]) for r in rows]),
    )


def _sklearn(view: str) -> float:
    """Logistic regression on every training image's features, scored on the test images."""
    from sklearn.linear_model import LogisticRegression

    got = {}
    for split in ("train", "test"):
        ds = scan(os.path.join(view, split), val_split=0.0, check_files=False)
        feats = embed_dataset(TrainConfig(data=ds.root), ds, Callbacks(), CancelToken()).features
        got[split] = (feats, np.array([s.label for s in ds.samples]))
    lr = LogisticRegression(max_iter=3000).fit(*got["train"])
    return float(lr.score(*got["test"]))


def _one(view: str, cross: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"run-{cross}")
    res = fit(TrainConfig(data=view, out=out, overwrite=True, cross_fit=cross))
    classes = res.metrics["classes"]
    after, y = _test_probs(res.run_dir, classes)
    t = res.metrics["calibration"]["temperature"]
    before = softmax(t * np.log(np.maximum(after, 1e-30)))
    again = fit(TrainConfig(data=view, out=out, overwrite=True, cross_fit=cross))  # the cached rerun
    return {
        "test_accuracy": res.metrics["test_accuracy"],
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "floor": ece_noise_floor(after),
        "seconds": again.metrics["train_seconds"],
        "embed_first": res.metrics.get("embed_seconds"),
        "n_train": res.metrics["n_train"],
        "n_test": len(y),
    }


def run_bench_crossfit(a) -> int:
    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers"), "digits", "scans"]
    tmp = tempfile.mkdtemp(prefix="ts-crossfit-")
    budgets = [int(b) if b != "all" else None for b in a.per_class.split(",")]
    print(
        f"{'folder':12s} {'labels':>7s} {'train':>6s} {'test':>5s} {'acc off':>8s} {'acc cv':>7s} {'LR all':>7s} "
        f"{'ECE off b->a':>13s} {'ECE cv b->a':>12s} {'floor':>6s} {'s off':>6s} {'s cv':>6s}"
    )
    try:
        for src in folders:
            name = os.path.basename(os.path.normpath(src))
            if src == "digits":
                src = digits_folder(os.path.join(tmp, "digits-src"))
            elif src in ("scans", "product", "texture"):  # one kind of picture (tests/imagegen.py), 160 a class
                from tests.imagegen import make_one_kind

                src = str(make_one_kind(os.path.join(tmp, src + "-src"), src, 160, val_share=0.0))
            elif not os.path.isdir(src):
                print(f"{src}: not found, skipped (the benchmarks read ../shared/datasets when it exists)")
                continue
            for per in budgets:
                rows = []
                for draw in range(1 if per is None else a.draws):
                    view = _views(src, os.path.join(tmp, f"{name}-{per}-{draw}"), per, draw)
                    rows.append(({m: _one(view, m, tmp) for m in ("off", "auto")}, _sklearn(view)))

                def mean(mode, key, rows=rows):
                    return float(np.mean([r[0][mode][key] for r in rows]))

                lr = float(np.mean([r[1] for r in rows]))
                label = "all" if per is None else f"{per}/cl"
                print(
                    f"{name:12s} {label:>7s} {mean('auto', 'n_train'):6.0f} {mean('auto', 'n_test'):5.0f} "
                    f"{mean('off', 'test_accuracy'):8.3f} {mean('auto', 'test_accuracy'):7.3f} {lr:7.3f} "
                    f"{mean('off', 'ece_before'):6.3f}->{mean('off', 'ece_after'):.3f} "
                    f"{mean('auto', 'ece_before'):5.3f}->{mean('auto', 'ece_after'):.3f} "
                    f"{mean('auto', 'floor'):6.3f} {mean('off', 'seconds'):6.2f} {mean('auto', 'seconds'):6.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "acc: test accuracy (mean over draws); off: 20% of train/ held out for validation; cv: cross-fitted (5 "
        "folds); LR all: scikit-learn logistic regression on every training image's features; ECE b->a: test ECE "
        "before -> after the temperature; floor: what a perfectly calibrated model would show on these test "
        "images; s: the job's seconds on a rerun from the embedding cache"
    )
    return 0
