"""``python -m benchmarks doctor [FOLDER ...]``: the dataset doctor on real folders with planted problems, against
a plain peer assembled from kept libraries (cleanlab + scikit-learn for labels, imagehash pHash for copies).
Folders of one kind of picture: name a kind (scans, digits, texture, product) instead of a folder and it is drawn
here (tests/imagegen.py; the same folders as ``python tools/make_onekind.py DEST KIND``).

1. The folder (default ../shared/datasets/flowers) is copied into a train/val layout (80/20, the app's split).
2. Feature extraction runs on it from an empty cache (the first run a user makes: the time reference); the doctor
   runs on the clean copy from an empty cache of its own, then again from the cache. Real folders have real
   problems: what the clean copy already shows is neither a hit nor a false alarm below.
3. Problems are planted: 20 label flips (train images moved to another class), 8 near-duplicates (train images
   resized to 80% and re-saved at JPEG quality 60, beside the original), 8 leaks (train images cropped 5% per side
   and re-saved into validation), 4 byte copies. Recall and precision per issue type over the planted ones, for
   the doctor and for the peer, and the share of images flagged as ``label``.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

SHARED = os.path.join("..", "shared", "datasets")


def _copy_layout(src: str, dst: str) -> None:
    from engine.data.folder import scan

    ds = scan(src, val_split=0.2, seed=0, check_files=False)
    for s in ds.samples:
        folder = os.path.join(dst, s.split, ds.classes[s.label])
        os.makedirs(folder, exist_ok=True)
        shutil.copy2(s.path, os.path.join(folder, os.path.basename(s.path)))


def _plant(root: str, seed: int = 1) -> dict[str, list]:
    """Plant problems in ``root`` (train/val layout); returns what was planted, by issue type."""
    from PIL import Image

    rng = random.Random(seed)
    classes = sorted(os.listdir(os.path.join(root, "train")))
    train = [
        (c, os.path.join(root, "train", c, f))
        for c in classes
        for f in sorted(os.listdir(os.path.join(root, "train", c)))
    ]
    picks = rng.sample(train, 40)
    planted = {"label": [], "near-duplicate": [], "leak": [], "duplicate": []}
    for c, p in picks[:20]:
        other = rng.choice([k for k in classes if k != c])
        dst = os.path.join(root, "train", other, "flipped-" + os.path.basename(p))
        shutil.move(p, dst)
        planted["label"].append(dst)
    for c, p in picks[20:28]:
        im = Image.open(p).convert("RGB")
        im = im.resize((max(1, int(im.width * 0.8)), max(1, int(im.height * 0.8))), Image.BILINEAR)
        dst = os.path.join(root, "train", c, "near-" + os.path.splitext(os.path.basename(p))[0] + ".jpg")
        im.save(dst, quality=60)
        planted["near-duplicate"].append((p, dst))
    for c, p in picks[28:36]:
        im = Image.open(p).convert("RGB")
        dx, dy = int(im.width * 0.05), int(im.height * 0.05)
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
        os.makedirs(os.path.join(root, "val", c), exist_ok=True)
        dst = os.path.join(root, "val", c, "leak-" + os.path.splitext(os.path.basename(p))[0] + ".jpg")
        im.save(dst, quality=90)
        planted["leak"].append((p, dst))
    for c, p in picks[36:40]:
        dst = os.path.join(root, "train", c, "copy-" + os.path.basename(p))
        shutil.copy2(p, dst)
        planted["duplicate"].append((p, dst))
    return planted


def _score(found: list[tuple[str, str, str]], clean: set[tuple[str, str]], planted: dict) -> dict:
    """found: (issue, path, other_path). Recall and precision per planted type over the findings that are new
    (an issue/path already found in the clean copy is neither a hit nor a false alarm)."""
    new = [(i, a, b) for i, a, b in found if (i, a) not in clean and (i, b) not in clean]
    out = {}
    for issue, items in planted.items():
        mine = [(a, b) for i, a, b in new if i == issue]
        if issue == "label":  # the moved file
            hits_of = [lambda a, b, p=p: a == p for p in items]
        elif issue == "leak":  # the copy in validation
            hits_of = [lambda a, b, p=p: p[1] in (a, b) for p in items]
        else:  # the pair
            hits_of = [lambda a, b, p=p: {a, b} == set(p) for p in items]
        recall = sum(any(h(a, b) for a, b in mine) for h in hits_of) / len(items)
        good = sum(any(h(a, b) for h in hits_of) for a, b in mine)
        out[issue] = {"recall": recall, "precision": good / len(mine) if mine else None, "findings": len(mine)}
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _doctor(data: str, cache: str):
    from engine.doctor.findings import DoctorConfig, doctor

    t0 = time.perf_counter()
    res = doctor(DoctorConfig(data=data, cache_dir=cache))
    return res, time.perf_counter() - t0


def _peer(res) -> list[tuple[str, str, str]]:
    """cleanlab on 5-fold logistic-regression probabilities of the same embeddings + pHash (Hamming <= 8)."""
    import imagehash
    from cleanlab.filter import find_label_issues
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    ds, feats = res.dataset, res.features
    y = np.array([s.label for s in ds.samples])
    probs = cross_val_predict(LogisticRegression(max_iter=1000), feats, y, cv=5, method="predict_proba")
    found = [("label", ds.samples[i].path, "") for i in np.flatnonzero(find_label_issues(y, probs))]
    h = np.array([np.asarray(imagehash.phash(Image.open(s.path)).hash, dtype=bool).ravel() for s in ds.samples])
    for i in range(len(h)):
        d = (h[i + 1 :] != h[i]).sum(1)
        for j in np.flatnonzero(d <= 8) + i + 1:
            a, b = ds.samples[i], ds.samples[j]
            if a.split != b.split:
                found.append(("leak", b.path, a.path) if a.split == "train" else ("leak", a.path, b.path))
            else:
                with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
                    same = fa.read() == fb.read()
                found.append(("duplicate" if same else "near-duplicate", a.path, b.path))
    return found


def _label_trials(
    res, cache: str, y: np.ndarray, train: np.ndarray, sets: int = 5, flips: int = 20, seed: int = 7
) -> dict:
    """Wrong labels over several random sets of ``flips`` flipped train labels on the same embeddings (one planted
    set of 20 is too few to tell two methods apart): recall, share flagged and the doctor's own precision estimate
    for its rule, and the same for the peer, and the peer's recall when it may flag only as many images as the
    doctor (ranked by its given-class probability, cleanlab's self-confidence)."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from engine.config import TrainConfig
    from engine.doctor import labels
    from engine.events import Callbacks, CancelToken
    from engine.train.feature_extraction import embed_dataset

    emb = embed_dataset(TrainConfig(data=res.dataset.root, cache_dir=cache), res.dataset.copy(), Callbacks(),
                        CancelToken(), taps=True)  # fmt: skip
    feats = res.features
    rng = np.random.default_rng(seed)
    c = int(y.max()) + 1
    out = {"mine": [], "mine_flagged": [], "mine_precision": [], "estimated": [], "peer": [], "peer_flagged": [],
           "peer_same_budget": []}  # fmt: skip
    for t in range(sets):
        picked = rng.choice(np.flatnonzero(train), flips, replace=False)
        yy = y.copy()
        yy[picked] = [rng.choice([k for k in range(c) if k != y[i]]) for i in picked]
        check = labels.check_labels(labels.out_of_sample_probs(emb.features, yy, c, seed=t, blocks=emb.blocks), yy)
        mine = np.zeros(len(y), bool)
        mine[[i for i, _, _ in check.listed]] = True
        probs = cross_val_predict(LogisticRegression(max_iter=1000), feats, yy, cv=5, method="predict_proba")
        peer = find_label_issues(yy, probs)
        budget = np.zeros(len(y), bool)
        budget[np.argsort(probs[np.arange(len(y)), yy])[: int(mine.sum())]] = True
        for key, flags in (("mine", mine), ("peer", peer), ("peer_same_budget", budget)):
            out[key].append(flags[picked].mean())
        out["mine_flagged"].append(mine.mean())
        out["mine_precision"].append(mine[picked].sum() / mine.sum() if mine.any() else np.nan)
        out["estimated"].append(check.precision if check.precision is not None else np.nan)
        out["peer_flagged"].append(peer.mean())
    return {k: float(np.nanmean(v)) if not np.isnan(v).all() else None for k, v in out.items()} | {"sets": sets}


def run_bench_doctor(a) -> int:
    from tests.imagegen import ONE_KIND, make_one_kind

    folders = a.data or [os.path.join(SHARED, "flowers"), "scans", "product"]
    summary = []
    made = tempfile.mkdtemp(prefix="ts-bench-onekind-")
    for src in folders:
        if src in ONE_KIND:  # a folder of one kind of picture, drawn here (tests/imagegen.py)
            src = str(make_one_kind(os.path.join(made, src), src, 30 if src == "digits" else 70))
        if not os.path.isdir(src):
            print(f"skipped: {src} not found (the shared datasets are not on this machine); pass a folder of images.")
            continue
        summary.append(_bench_one(src))
    if summary:
        print(
            f"\n{'folder':24} {'images':>6} {'clean copies':>12} {'near rec':>8} {'leak rec':>8} {'dup rec':>7} "
            f"{'unplanted copies':>16} {'label %':>7} {'doctor cached s':>15}"
        )
        for r in summary:
            print(
                f"{r['folder'][-24:]:24} {r['images']:6} {r['clean_copies']:12} {r['near-duplicate']:8.2f} "
                f"{r['leak']:8.2f} {r['duplicate']:7.2f} {r['unplanted']:16} {r['label_pct']:7.1f} "
                f"{r['cached_s']:15.1f}"
            )
        print(
            "clean copies: copy findings on the folder before planting (real copies, or false ones on a folder "
            "that has none); unplanted copies: copy findings after planting that are neither planted nor clean"
        )
    shutil.rmtree(made, ignore_errors=True)
    return 0


def _bench_one(src: str) -> dict:
    from engine.config import TrainConfig
    from engine.train.fit import fit

    tmp = tempfile.mkdtemp(prefix="ts-bench-doctor-")
    root = os.path.join(tmp, "data")
    _copy_layout(src, root)
    t0 = time.perf_counter()
    fit(TrainConfig(data=root, out=os.path.join(tmp, "fe"), cache_dir=os.path.join(tmp, "fe-cache")))
    fe_s = time.perf_counter() - t0
    print(f"  first feature extraction: {fe_s:.1f} s", file=sys.stderr, flush=True)
    cache = os.path.join(tmp, "doctor-cache")
    clean, empty_s = _doctor(root, cache)
    _, cached_s = _doctor(root, cache)
    print(f"  doctor: {empty_s:.1f} s from an empty cache, {cached_s:.1f} s cached", file=sys.stderr, flush=True)
    clean_keys = {(f.issue, f.path) for f in clean.findings} | {
        (f.issue, f.other_path) for f in clean.findings if f.other_path
    }
    print(
        f"\nClean copy of {src} ({len(clean.dataset.samples)} images): "
        + ", ".join(f"{n} {k}" for k, n in clean.counts().items())
    )
    for f in clean.findings[:12]:
        other = os.path.relpath(f.other_path, root) if f.other_path else ""
        print(
            f"  {f.issue:15} {os.path.relpath(f.path, root)}  {other}"
            f"  {f.label}{' -> ' + f.suggested_label if f.suggested_label else ''}  {f.score:.3f}"
        )
    try:
        peer_clean_found = _peer(clean)  # before planting: the files move
    except ImportError as exc:
        peer_clean_found = None
        print(f"peer skipped ({exc.name} missing): pip install -e '.[bench]'")
    trials = None
    if peer_clean_found is not None:
        y = np.array([s.label for s in clean.dataset.samples])
        train = np.array([s.split == "train" for s in clean.dataset.samples])
        trials = _label_trials(clean, cache, y, train)
    planted = _plant(root)
    res, _ = _doctor(root, cache)
    mine = _score([(f.issue, f.path, f.other_path) for f in res.findings], clean_keys, planted)
    peer = None
    if peer_clean_found is not None:
        peer_clean = {(i, p) for i, p, _ in peer_clean_found} | {(i, o) for i, _, o in peer_clean_found if o}
        peer = _score(_peer(res), peer_clean, planted)
    n = len(res.dataset.samples)
    print(f"\nPlanted: 20 label flips, 8 near-duplicates, 8 leaks, 4 byte copies ({n} images)")
    print(
        f"{'issue':15} {'recall':>7} {'precision':>9} {'findings':>8}   "
        f"{'peer recall':>11} {'precision':>9} {'findings':>8}"
    )
    for issue in ("duplicate", "near-duplicate", "leak", "label"):
        m = mine[issue]
        p = peer[issue] if peer else {}

        def fmt(v):
            return "-" if v is None else f"{v:.2f}"

        print(
            f"{issue:15} {m['recall']:7.2f} {fmt(m['precision']):>9} {m['findings']:8}   "
            f"{fmt(p.get('recall')):>11} {fmt(p.get('precision')):>9} {p.get('findings', '-'):>8}"
        )
    if trials is not None:
        print(
            f"label, {trials['sets']} more random sets of 20 flips (same embeddings, labels flipped in memory): "
            f"recall {trials['mine']:.2f} flagging {100 * trials['mine_flagged']:.1f}% of the images, precision "
            f"{_f(trials['mine_precision'])} (the doctor's own estimate {_f(trials['estimated'])}); peer "
            f"{trials['peer']:.2f} flagging {100 * trials['peer_flagged']:.1f}%, and {trials['peer_same_budget']:.2f}"
            " when it may flag as many images as the doctor"
        )
    n_label = sum(f.issue == "label" for f in res.findings)
    if peer is not None:
        print(f"peer flagged as label: {peer['label']['findings']} new + what the clean copy already had")
    print(
        f"\nflagged as label: {n_label} of {n} images ({100 * n_label / n:.1f}%); time: doctor from an empty cache "
        f"{empty_s:.1f} s = {empty_s / fe_s:.2f}x the first feature extraction ({fe_s:.1f} s), from the cache "
        f"{cached_s:.1f} s = {100 * cached_s / fe_s:.0f}% of it"
    )
    if res.label_note:
        print(res.label_note)
    elif res.label_precision is not None:
        print(f"the doctor's estimate: about {100 * res.label_precision:.0f}% of its {n_label} label findings are true")
    copy_kinds = ("duplicate", "near-duplicate", "leak")
    planted_pairs = {frozenset(p) for k in copy_kinds for p in planted[k]}
    unplanted = [
        f
        for f in res.findings
        if f.issue in copy_kinds
        and (f.issue, f.path) not in clean_keys
        and frozenset((f.path, f.other_path)) not in planted_pairs
    ]
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "folder": os.path.normpath(src),
        "images": n,
        "cached_s": cached_s,
        "label_pct": 100 * n_label / n,
        "clean_copies": sum(clean.counts()[k] for k in copy_kinds),
        "unplanted": len(unplanted),
        **{k: mine[k]["recall"] for k in copy_kinds},
    }
