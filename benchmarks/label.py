"""``python -m benchmarks label``: a simulated user labels a folder whose classes the app does not see.

The folder's own classes answer every question. A quarter of each class is set aside as the test split; from the
rest (the pool) the app asks 10 images at a time (engine.labelling.session.suggest: the same code as ``python -m
engine label``), from a cold start, and after each round the head trained on the labels so far is scored on the test
split. Random picks of the same sizes (three seeds) train with the same trainer. Also: the labels the app needed to
come within 2 points of a head trained on every pool image, and *Accept suggestions* at its default level (how many
unlabelled pool images it would label, and how many of those are right).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from engine import TrainConfig
from engine.data.folder import scan
from engine.data.splits import _draw, _key
from engine.events import Callbacks, CancelToken
from engine.labelling.session import ACCEPT_LEVEL, suggest
from engine.train.feature_extraction import embed_dataset

SHARED = os.path.join("..", "shared", "datasets")
ROUND = 10


def _features(src: str):
    ds = scan(src, val_split=0.0, test_split=0.0)
    X, _ = embed_dataset(TrainConfig(data=src), ds, Callbacks(), CancelToken())
    y = np.array([s.label for s in ds.samples])
    test = np.array([_draw(99, s.label, "test|" + _key(s.path, ds.root)) < 0.25 for s in ds.samples])
    return X, y, test, ds.classes


def _accuracy(head, X, y) -> float:
    return float(((X @ head["weight"].T + head["bias"]).argmax(1) == y).mean()) if head else float("nan")


def _train_on(X, y, picked, classes, seed):
    known = np.full(len(y), -1)
    known[picked] = y[picked]
    return suggest(X, known, classes, 0, seed).head


def run_bench_label(a) -> int:
    from benchmarks.crossfit import digits_folder
    from tests.imagegen import ONE_KIND, make_one_kind

    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers"), "digits", "scans"]
    tmp = tempfile.mkdtemp(prefix="ts-label-")
    for src in folders:
        name = os.path.basename(os.path.normpath(src))
        if src == "digits":
            src = digits_folder(os.path.join(tmp, "digits"))
        elif src in ONE_KIND:  # drawn here (tests/imagegen.py); hands as many as the hand-sign pool (~1,500)
            src = str(make_one_kind(os.path.join(tmp, src), src, 200 if src == "hands" else 60, val_share=0.0))
        elif not os.path.isdir(src):
            print(f"{src}: not found, skipped")
            continue
        X, y, test, classes = _features(src)
        pool = np.flatnonzero(~test)
        Xp, yp, Xt, yt = X[pool], y[pool], X[test], y[test]
        C = len(classes)
        budget = min(int(a.max_share * len(pool)), a.max_per_class * C)
        all_acc = _accuracy(_train_on(Xp, yp, np.arange(len(pool)), classes, 0), Xt, yt)
        known = np.full(len(pool), -1)
        curve, t_round = [], []
        while (known >= 0).sum() < budget:
            t0 = time.perf_counter()
            s = suggest(Xp, known, classes, ROUND, 0)
            t_round.append(time.perf_counter() - t0)
            known[s.ask] = yp[s.ask]  # the folder's own class answers
            n = int((known >= 0).sum())
            s = suggest(Xp, known, classes, 0, 0)
            curve.append((n, _accuracy(s.head, Xt, yt), s))
        print(f"\n{name}: {len(pool)} pool images, {len(yt)} test, {C} classes; every pool label: {all_acc:.3f}")
        print(f"{'labels':>7} {'per class':>9} {'app':>6} {'random':>7}  the app's estimate (random checks)")
        for n, acc, s in curve:
            if n % (2 * ROUND) and n != curve[-1][0]:
                continue
            rand = [_accuracy(_train_on(Xp, yp, np.random.default_rng(r).choice(len(pool), n, False), classes, r),
                              Xt, yt) for r in range(3)]  # fmt: skip
            est = f"{s.estimate:.3f} ({s.estimate_range[0]:.2f}-{s.estimate_range[1]:.2f}, {s.checks} checks)" if (
                s.estimate is not None) else f"- ({s.checks} checks)"  # fmt: skip
            print(f"{n:7d} {n / C:9.1f} {acc:6.3f} {np.nanmean(rand):7.3f}  {est}")
        within = next((n for n, acc, _ in curve if acc >= all_acc - 0.02), None)
        print(
            f"within 2 points of every label: {within} labels ({100 * within / len(pool):.1f}% of the pool)"
            if within
            else f"not within 2 points of every label by {curve[-1][0]} labels"
        )
        last = curve[-1][2]
        un = np.flatnonzero(known < 0)
        conf = last.probs[un].max(1)
        take = un[(conf >= ACCEPT_LEVEL) & last.agreed[un]]  # as Accept takes them: every head agreeing
        right = float((last.probs[take].argmax(1) == yp[take]).mean()) if len(take) else float("nan")
        print(
            f"accept at {ACCEPT_LEVEL:.0%}: {len(take)} of {len(un)} unlabelled "
            f"({100 * len(take) / max(len(un), 1):.0f}%)"
            f", {right:.3f} right (the app's own estimate: {last.accept['right_so_far']}); "
            f"a round (suggest + next {ROUND}) took {np.median(t_round):.2f} s (median)"
        )
    return 0
