"""``python -m benchmarks features``: what the frozen network gives, judged on a test split: the app's head on the
final features alone, the app's head with its per-folder choice (final alone, or with the earlier layers'), and
scikit-learn's logistic regression on the same final features (C=1, the ten-line script a user might compare with,
and C chosen by 5-fold cross-validation).

Each folder is embedded once as the app embeds it (engine/train/feature_extraction.py ``embed_dataset`` with the
earlier layers' features; the embedding cache); a fixed quarter of each class is the test split (the same images in
every row); the rest is the pool. From the pool: 10 and 20 random labels a class (``--seeds`` draws, averaged) and
every label. The app's heads are engine/train/probe.py's ``fit_probe`` with cross-fitted folds, exactly as a
feature-extraction run trains them; its time is reported per folder. One run prints every figure the issue asks for.

One test split is one draw: on hymenoptera its 96 test images made the app 2.1 points below the peer at every label
(2 images), where 40 random splits put it 0.3 +- 0.2 below. ``--splits N`` draws N - 1 more test quarters (random,
seeded) and prints the chosen head's difference from the peer averaged over every split and label draw, with its
standard error (paired: the same test images for both), so a difference can be told from a split's luck.

Folders: ``../shared/datasets`` (hymenoptera, flowers: everyday photos), folders given on the command line, or one
kind of picture drawn here (tests/imagegen.py: hands, scans, xray, texture, product; ``digits``: scikit-learn's 8x8
digits upscaled).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

import numpy as np

from benchmarks.label import SHARED, test_split
from engine import TrainConfig
from engine.data.folder import scan
from engine.events import Callbacks, CancelToken
from engine.train.crossfit import fold_ids
from engine.train.feature_extraction import embed_dataset
from engine.train.probe import FINAL_POWER, fit_probe, mapped

BUDGETS = (10, 20, None)  # labels a class; None: every pool image


def _folder(src: str, tmp: str) -> tuple[str, str] | None:
    from benchmarks.crossfit import digits_folder
    from tests.imagegen import ONE_KIND, make_one_kind

    name = os.path.basename(os.path.normpath(src))
    if src == "digits":
        return name, digits_folder(os.path.join(tmp, "digits"))
    if src in ONE_KIND:
        return name, str(make_one_kind(os.path.join(tmp, src), src, 120, seed=7, val_share=0.0))
    if os.path.isdir(src):
        return name, src
    print(f"{src}: not found, skipped")
    return None


def _peer(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, C: float = 1.0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=C, max_iter=3000).fit(X, y).predict(Xt)


def _peer_cv(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, float]:
    """scikit-learn's logistic regression with C (0.1, 1 or 10) chosen by the out-of-fold log-loss of the same folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for C in (0.1, 1.0, 10.0):
            p = np.zeros((len(y), int(y.max()) + 1))
            for f in np.unique(folds):
                m = LogisticRegression(C=C, max_iter=3000).fit(X[folds != f], y[folds != f])
                p[np.ix_(folds == f, m.classes_)] = m.predict_proba(X[folds == f])
            loss = log_loss(y, np.clip(p, 1e-12, 1), labels=np.arange(p.shape[1]))
            if best is None or loss < best[0]:
                best = (loss, C)
    return _peer(X, y, Xt, best[1]), best[1]


def _app(X, y, Xt, blocks, C, seed, features):
    folds = fold_ids(y, [str(i) for i in range(len(y))], seed)
    t0 = time.perf_counter()
    Xm = mapped(X, blocks.final)  # as the app's heads read them
    pr = fit_probe(Xm, y, folds, C, blocks, k=5, extra={"final": np.ones(len(y), bool)}, stats=Xm, features=features,
                   seed=seed, power=FINAL_POWER)  # fmt: skip
    h = pr.heads["final"]
    Xt = mapped(Xt[:, : pr.columns], blocks.final, pr.power)  # (the power the head kept)
    return (Xt @ h["weight"].T + h["bias"]).argmax(1), pr, time.perf_counter() - t0, folds


def run_bench_features(a) -> int:
    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers"), "digits", "hands",
                         "scans", "texture", "product"]  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="ts-features-")
    print("test accuracy; app = the app's head (final: on the final features alone; chosen: its per-folder choice);")
    print("peer = scikit-learn LogisticRegression on the same final features (C=1, and C by 5-fold CV)\n")
    if a.splits > 1:
        print(f"{a.splits} test splits (the fixed quarter and {a.splits - 1} random ones); chosen - peer: the mean "
              "over every split and label draw, +- its standard error\n")  # fmt: skip
    header = f"{'folder':>12} {'labels':>8} {'peer C=1':>9} {'peer CV':>8} {'app final':>10} {'app chosen':>11}"
    print(header + f" {'depths kept':>12} {'chosen - peer':>14} {'head s':>7}")
    for src in folders:
        got = _folder(src, tmp)
        if got is None:
            continue
        name, path = got
        ds = scan(path, val_split=0.0, test_split=0.0)
        emb = embed_dataset(TrainConfig(data=path), ds, Callbacks(), CancelToken(), taps=True)
        X, blocks = emb.features, emb.blocks
        y = np.array([s.label for s in ds.samples])
        C = len(ds.classes)
        tests = [test_split(ds)] + [_random_quarter(y, 1000 + s) for s in range(1, a.splits)]
        for per in BUDGETS:
            rows = []
            for test, seed in ((t, d) for t in tests for d in range(a.seeds if per else 1)):
                pool = np.flatnonzero(~test)
                rng = np.random.default_rng(seed)
                pick = (
                    np.concatenate(
                        [rng.choice(pool[y[pool] == c], min(per, (y[pool] == c).sum()), False) for c in range(C)]
                    )  # fmt: skip
                    if per
                    else pool
                )
                Xp, yp, Xt, yt = X[pick], y[pick], X[test], y[test]
                final_pred, _, _, folds = _app(Xp, yp, Xt, blocks, C, seed, "final")
                chosen_pred, pr, secs, _ = _app(Xp, yp, Xt, blocks, C, seed, a.features)
                f = blocks.final
                peer_cv, _ = _peer_cv(Xp[:, :f], yp, Xt[:, :f], folds)
                rows.append(
                    [np.mean(_peer(Xp[:, :f], yp, Xt[:, :f]) == yt), np.mean(peer_cv == yt),
                     np.mean(final_pred == yt), np.mean(chosen_pred == yt), pr.features != "final", secs]
                )  # fmt: skip
            rows = np.array(rows, dtype=float)
            r = rows.mean(0)
            label = f"{per}/class" if per else f"all {len(pool)}"
            gap = 100 * (rows[:, 3] - rows[:, 0])
            se = f" +- {gap.std(ddof=1) / np.sqrt(len(gap)):.1f}" if len(gap) > 1 else ""
            print(
                f"{name:>12} {label:>8} {r[0]:9.3f} {r[1]:8.3f} {r[2]:10.3f} {r[3]:11.3f} "
                f"{f'{r[4] * len(rows):.0f} of {len(rows)}':>12} {f'{gap.mean():+.1f}{se}p':>14} {r[5]:7.1f}",
                flush=True,
            )
    return 0


def _random_quarter(y: np.ndarray, seed: int) -> np.ndarray:
    """A random quarter of each class (seeded), as a test split."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, len(idx) // 4, replace=False)] = True
    return test
