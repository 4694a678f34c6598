"""Labelling an unsorted folder from the command line's job: cold start, a round with labels, the labels file."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from engine.data.labels import list_images, read_labels, write_labels
from engine.events import Callbacks, EngineError
from engine.labelling.session import LabelConfig, label
from tests.imagegen import draw_image, draw_unlike

KINDS = {"circles": 24, "squares": 14, "stripes": 9}  # unequal: the rare kinds must still be asked about early


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    """An unsorted pile: three kinds of shapes (and a few pages of text) loose at the top and in nested folders,
    names that say nothing about the class, and one broken file."""
    root = tmp_path_factory.mktemp("pile")
    truth = {}
    i = 0
    for kind, n in KINDS.items():
        for _ in range(n):
            folder = root / ("" if i % 3 else f"day{i % 4}/batch")
            folder.mkdir(parents=True, exist_ok=True)
            p = folder / f"IMG_{i:04d}.jpg"
            draw_image(kind, 1000 + i).save(p)
            truth[str(p)] = kind
            i += 1
    for j in range(4):
        p = root / f"scan_{j}.png"
        draw_unlike(3 * j).save(p)  # pages of text: a fourth kind of picture
        truth[str(p)] = "text"
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root, truth


def _cfg(root, tmp, **kw):
    return LabelConfig(data=str(root), cache_dir=str(tmp / "cache"), **kw)


def test_cold_start_asks_first_about_every_kind_of_picture_in_the_folder(pile, tmp_path):
    root, truth = pile
    res = label(_cfg(root, tmp_path, labels=str(tmp_path / "none.csv"), next=6, csv=str(tmp_path / "out.csv")))
    assert res.n_images == len(truth) and res.n_labelled == 0 and not res.classes
    assert [p for p, _ in res.skipped] == [str(root / "broken.jpg")]  # reported, not a crash
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(truth) and all(r["suggested_label"] == "" for r in rows)  # no suggestion before 2 classes
    asked = sorted((r for r in rows if r["ask"]), key=lambda r: int(r["ask"]))
    assert [int(r["ask"]) for r in asked] == list(range(1, 7))
    assert {truth[r["path"]] for r in asked} == {"circles", "squares", "stripes", "text"}  # 4 kinds in 6 picks


def test_a_round_with_labels_suggests_every_other_image_and_asks_where_it_is_least_sure(pile, tmp_path):
    root, truth = pile
    by_kind = {k: [p for p, t in truth.items() if t == k] for k in ("circles", "squares", "stripes", "text")}
    labels = {os.path.abspath(p): (k, "user") for k in ("circles", "squares", "stripes") for p in by_kind[k][:3]}
    labels[os.path.abspath(by_kind["text"][0])] = ("", "user")  # "not a class": left out
    write_labels(str(tmp_path / "labels.csv"), labels)
    res = label(_cfg(root, tmp_path, labels=str(tmp_path / "labels.csv"), next=5, csv=str(tmp_path / "o.csv")))
    assert res.classes == ["circles", "squares", "stripes"] and res.n_labelled == 9
    with open(tmp_path / "o.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(truth) - 10  # every unlabelled image, once; the labelled and "not a class" ones not
    shapes = [r for r in rows if truth[r["path"]] != "text"]
    right = np.mean([r["suggested_label"] == truth[r["path"]] for r in shapes])
    assert right >= 0.9 and all(0 < float(r["confidence"]) <= 1 for r in rows)
    assert {r["status"] for r in rows} <= {"sure", "unsure", "unfamiliar"}
    assert sorted(int(r["ask"]) for r in rows if r["ask"]) == [1, 2, 3, 4, 5]
    assert res.accept["level"] == 0.95 and res.accept["would_label"] >= 0


def test_with_a_few_labels_the_next_picks_go_to_the_kinds_no_label_covers(pile, tmp_path):
    """Two kinds labelled twice each (under 3 labels a class): the next batch is TypiClust's, the typical images
    of the clusters the labels cover least, so the kinds nobody labelled yet are asked about rather than the
    borders between the two known ones. 13 of the 47 unlabelled images are of those kinds: random picks would ask
    about 1.7 of 6. (The earlier uncertain-plus-unfamiliar rule also passes here, 3-5 of 6 over four seeds: its
    unfamiliar picks find them; TypiClust's gain is on real folders, docs/benchmarks.md.)"""
    root, truth = pile
    by_kind = {k: [p for p, t in truth.items() if t == k] for k in ("circles", "squares")}
    labels = {os.path.abspath(p): (k, "user") for k in by_kind for p in by_kind[k][:2]}
    write_labels(str(tmp_path / "labels.csv"), labels)
    res = label(_cfg(root, tmp_path, labels=str(tmp_path / "labels.csv"), next=6, csv=str(tmp_path / "o.csv")))
    with open(tmp_path / "o.csv", newline="") as f:
        asked = [truth[r["path"]] for r in csv.DictReader(f) if r["ask"]]
    assert len(asked) == 6 and res.n_labelled == 4
    assert sum(k in ("stripes", "text") for k in asked) >= 3, asked


def test_a_pile_of_copies_asks_one_of_each_picture_first():
    """Unsorted piles hold copies (the same photo saved twice): the cold start asks one image per distinct picture
    and does not fail when the folder has fewer distinct pictures than images to ask."""
    from engine.labelling.picks import next_batch

    rng = np.random.default_rng(0)
    pictures = rng.random((3, 64)).astype(np.float32)
    X = np.repeat(pictures, 5, axis=0)  # three pictures, five copies each
    asked = next_batch(X, np.arange(len(X)), 6, 0, None, None)
    assert sorted({i // 5 for i in asked}) == [0, 1, 2] and len(asked) == 3
    blobs = np.concatenate([rng.normal(c, 0.05, (40, 64)) for c in rng.random((4, 64)) * 4]).astype(np.float32)
    asked = next_batch(blobs, np.arange(len(blobs)), 4, 0, None, None)
    assert sorted(i // 40 for i in asked) == [0, 1, 2, 3]  # four groups, four picks: one from each


def test_the_labels_file_round_trips_and_a_missing_one_is_a_cold_start(tmp_path):
    assert read_labels(str(tmp_path / "missing.csv")) == {}
    (tmp_path / "empty.csv").write_text("")
    assert read_labels(str(tmp_path / "empty.csv")) == {}
    labels = {str(tmp_path / "a.jpg"): ("cat", "user"), str(tmp_path / "b.jpg"): ("dog", "accepted")}
    write_labels(str(tmp_path / "l.csv"), labels)
    assert read_labels(str(tmp_path / "l.csv")) == labels
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left behind
    (tmp_path / "bad.csv").write_text("path,label,source\nx.jpg,cat,robot\n")
    with pytest.raises(EngineError, match="source"):
        read_labels(str(tmp_path / "bad.csv"))


def test_a_folder_of_loose_images_at_any_depth_is_listed(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for p in ("x.jpg", "a/y.PNG", "a/b/z.webp", ".hidden/h.jpg", "a/notes.txt"):
        Path(tmp_path, p).write_bytes(b"")
    assert [os.path.relpath(p, tmp_path) for p in list_images(str(tmp_path))] == ["x.jpg", "a/y.PNG", "a/b/z.webp"]


def test_train_with_a_labels_file_learns_from_the_labelled_images_only_and_scores_the_test_folder(tmp_path):
    """``train DATA --labels L``: the unlabelled and "not a class" images are left out; a test/ folder of class
    folders is still only scored."""
    from engine import TrainConfig, fit
    from engine.data.labels import scan_labelled

    root = tmp_path / "data"
    labels, truth = {}, {}
    for i in range(30):
        kind = ("circles", "squares")[i % 2]
        p = root / "pile" / f"IMG_{i:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        draw_image(kind, 200 + i).save(p)
        truth[str(p)] = kind
        if i < 24:
            labels[os.path.abspath(p)] = (kind if i < 22 else "", "user" if i < 16 else "accepted")
    for kind in ("circles", "squares"):
        (root / "test" / kind).mkdir(parents=True)
        for j in range(4):
            draw_image(kind, 900 + j).save(root / "test" / kind / f"{j}.jpg")
    write_labels(str(tmp_path / "labels.csv"), labels)
    ds = scan_labelled(str(root), str(tmp_path / "labels.csv"))
    assert ds.classes == ["circles", "squares"]
    assert sorted(s.path for s in ds.samples if s.split != "test") == sorted(str(root / "pile" / f"IMG_{i:03d}.jpg")
                                                                            for i in range(22))  # fmt: skip
    assert len(ds.split("test")) == 8
    res = fit(TrainConfig(data=str(root), labels=str(tmp_path / "labels.csv"), out=str(tmp_path / "run"),
                          cache_dir=str(tmp_path / "cache")))  # fmt: skip
    meta = json.loads((Path(res.run_dir) / "metrics.json").read_text())
    assert meta["test_accuracy"] >= 0.85
    with pytest.raises(EngineError, match="no labels yet"):
        scan_labelled(str(root), str(tmp_path / "none.csv"))


def test_a_run_trained_from_asked_labels_reports_its_accuracy_on_the_random_checks(tmp_path):
    """The labelling view asks mostly about the images it is least sure of, so the labels' cross-validated accuracy
    is far below the model's (0.57 against 0.77 on a pile of clothing at 9 a class). The run says its accuracy on
    the random checks among the user's own labels (an accepted suggestion is no check), each judged out of fold."""
    from engine import TrainConfig, fit
    from engine.data.labels import CHECK_SHARE, check_draws

    root = tmp_path / "pile"
    root.mkdir()
    labels, checks, i = {}, [], 0
    while len(labels) < 44:  # 7 checks (one of them accepted) among 44 labels, as names fall
        name = f"IMG_{i:04d}.jpg"
        is_check = check_draws([name])[0] < CHECK_SHARE
        i += 1
        if is_check and len(checks) == 7:
            continue
        kind = ("circles", "squares", "stripes")[len(labels) % 3]
        draw_image(kind, 300 + i).save(root / name)
        source = "accepted" if is_check and len(checks) == 6 else "user"
        labels[os.path.abspath(root / name)] = (kind, source)
        if is_check:
            checks.append((str(root / name), source))
    write_labels(str(tmp_path / "labels.csv"), labels)
    logs = []

    class Log(Callbacks):
        def on_log(self, message):
            logs.append(message)

    res = fit(
        TrainConfig(data=str(root), labels=str(tmp_path / "labels.csv"), out=str(tmp_path / "run"),
                    cache_dir=str(tmp_path / "cache")),
        Log(),
    )  # fmt: skip
    got = res.metrics["random_checks"]
    own = [p for p, source in checks if source == "user"]
    assert got["n"] == len(own) == 6
    rows = {r["path"]: r for r in res.predictions if r["split"] == "val"}  # (out of fold: every labelled image)
    assert got["accuracy"] == np.mean([rows[p]["prediction"] == rows[p]["label"] for p in own])
    assert got["ci95"][0] <= got["accuracy"] <= got["ci95"][1] + 1e-9
    assert any(line.startswith("Accuracy on the 6 random checks among your labels") for line in logs), logs[-3:]


def test_label_folder_classes_takes_a_partly_sorted_folders_subfolders_as_labels_and_asks_the_loose_ones(tmp_path):
    """The command line's `--folder-classes` (the Label tab's *Subfolders are classes*): the sorted part is
    labelled from its folder names (source `folder`, written into the labels file, a user's own label kept over
    it), the loose images are what it suggests for and asks about; without the flag nothing is assumed."""
    import subprocess
    import sys

    root = tmp_path / "part"
    for kind in ("circles", "squares"):
        (root / kind).mkdir(parents=True)
        for i in range(5):
            draw_image(kind, 10 * i + len(kind)).save(root / kind / f"{i}.png")
    loose = {}
    for i, kind in enumerate(["circles", "squares"] * 3):
        p = root / f"loose_{i}.png"
        draw_image(kind, 500 + i).save(p)
        loose[str(p)] = kind
    labels = tmp_path / "labels.csv"
    mine = os.path.abspath(root / "circles" / "0.png")
    write_labels(str(labels), {mine: ("", "user")})  # the user said "not a class" for one sorted image
    out = tmp_path / "out.csv"
    cmd = [sys.executable, "-m", "engine", "label", str(root), "--labels", str(labels), "--next", "3"]
    common = ["--cache-dir", str(tmp_path / "cache"), "--csv", str(out)]
    done = subprocess.run(cmd + common + ["--folder-classes"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # (labels taken from folder names are no random sample of the folder: the estimate waits for the user's own)
    assert "Estimated accuracy: once 5 random checks are labelled (0 so far)" in done.stdout, done.stdout
    saved = read_labels(str(labels))
    assert saved[mine] == ("", "user") and len(saved) == 10
    assert {v for p, v in saved.items() if p != mine} == {("circles", "folder"), ("squares", "folder")}
    assert all(saved[os.path.abspath(p)][0] == os.path.basename(os.path.dirname(p)) for p in saved if p != mine)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} == set(loose)  # only the loose images are left to label
    assert np.mean([r["suggested_label"] == loose[r["path"]] for r in rows]) >= 0.8
    assert sorted(int(r["ask"]) for r in rows if r["ask"]) == [1, 2, 3]
    write_labels(str(labels), {})
    done = subprocess.run(cmd + common, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and read_labels(str(labels)) == {}  # without the flag: a cold start, nothing assumed


def test_a_suggestion_offered_at_90_percent_is_right_at_least_90_percent_of_the_time():
    """What *Accept suggestions* takes must be as right as its level says. Four overlapping classes, 40 labels: the
    final head (trained on every label) is sharper than the temperature fitted on the fold heads' judgements, and
    its own >= 90% suggestions were 0.89-0.90 right in two of these four piles; the fold heads' mean is not."""
    from engine.labelling.session import suggest

    for seed in range(4):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((4, 32)) * 0.35
        y = rng.integers(0, 4, 3000)
        X = (centres[y] + rng.standard_normal((3000, 32))).astype(np.float32)
        known = np.full(3000, -1)
        asked = rng.choice(3000, 40, replace=False)
        known[asked] = y[asked]
        s = suggest(X, known, ["a", "b", "c", "d"], 0, seed, level=0.9)
        taken = (known < 0) & (s.probs.max(1) >= 0.9) & s.agreed  # as Accept takes them
        assert taken.sum() == s.accept["would_label"]
        if taken.any():
            assert (s.probs.argmax(1) == y)[taken].mean() >= 0.9, seed


def test_past_a_few_labels_a_group_nobody_labelled_is_asked_about_but_a_couple_of_odd_images_are_not():
    """Three labelled kinds, 6 labels each (past TypiClust's rounds). A fourth kind nobody labelled (8% of the pile,
    far from every label) is asked about in the next batch; two odd images far out along a labelled kind's direction
    (confidently suggested, unfamiliar) are not asked about every round, as they were before."""
    from engine.labelling.session import suggest

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)) * 3
    kind = np.repeat(np.arange(4), [300, 300, 300, 80])
    X = (centres[kind] + rng.standard_normal((len(kind), 32))).astype(np.float32)
    known = np.full(len(kind), -1)
    for k in range(3):
        known[np.flatnonzero(kind == k)[:6]] = k
    s = suggest(X, known, ["a", "b", "c"], 10, 0)
    assert sum(kind[i] == 3 for i in s.ask) >= 2, [int(kind[i]) for i in s.ask]
    odd = (centres[0] * 2 + 4 * rng.standard_normal((2, 32))).astype(np.float32)  # (cosine: another direction)
    X2, known2 = np.concatenate([X[kind < 3], odd]), np.concatenate([known[kind < 3], [-1, -1]])
    s2 = suggest(X2, known2, ["a", "b", "c"], 10, 0)
    assert s2.unfamiliar[-2:].all() and s2.probs[-2:, 0].min() > 0.9
    assert not {len(X2) - 2, len(X2) - 1} & set(s2.ask), s2.ask


def test_the_random_checks_stay_out_of_the_picks_so_a_kind_only_checks_have_labelled_is_still_asked_about():
    """The picks are chosen by a head trained without the random checks, and only the other labels count as covering
    the folder: otherwise the picks avoid every check's neighbourhood (its label made it certain), each check is no
    longer what a random image is to the model, and the estimate fell 15 points below the test accuracy on hand signs
    (docs/benchmarks.md, tenth session). Three kinds labelled 6 each; a fourth labelled by two random checks alone
    is asked about next, and those checks are not judged (no head that never saw them knows their class)."""
    from engine.labelling.session import suggest

    for seed in range(4):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((4, 32)) * 3
        kind = np.repeat(np.arange(4), [300, 300, 300, 80])
        X = (centres[kind] + rng.standard_normal((len(kind), 32))).astype(np.float32)
        known = np.full(len(kind), -1)
        draws = 0.1 + 0.9 * rng.random(len(kind))  # (no other check left to ask)
        for k in range(3):
            known[np.flatnonzero(kind == k)[:6]] = k
        d = np.flatnonzero(kind == 3)[:2]
        known[d], draws[d] = 3, 0.05
        s = suggest(X, known, list("abcd"), 10, 0, draws=draws)
        assert sum(kind[i] == 3 for i in s.ask) >= 4 and s.checks == 0, (seed, [int(kind[i]) for i in s.ask])


def test_the_estimated_accuracy_comes_from_random_checks_and_matches_the_model_on_the_folder():
    """The picks ask about the images the model is least sure of, so the labels' own cross-validated accuracy is
    far below the model's (0.57 against 0.79 on clothing at 10 a class). Every batch of ten holds one random check
    (a fixed tenth of the folder, by the images' draws) and the estimate is the checks' accuracy, judged by a head
    trained on the other labels: none before five checks, then within its 95% range of the model's accuracy on
    images it never saw."""
    from engine.data.labels import CHECK_SHARE
    from engine.labelling.session import MIN_CHECKS, suggest
    from engine.train.probe import mapped

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)) * 0.45
    y = rng.integers(0, 4, 4000)
    X = (centres[y] + rng.standard_normal((4000, 32))).astype(np.float32)
    pool, fresh = np.arange(3000), np.arange(3000, 4000)
    known = np.full(3000, -1)
    draws = rng.random(3000)
    hard_picks = []
    while (known >= 0).sum() < 200:
        s = suggest(X[pool], known, list("abcd"), 10, 0, draws=draws)
        checks = [i for i in s.ask if draws[i] < CHECK_SHARE]
        assert len(s.ask) == 10 and len(checks) == 1  # one random check a batch; the other nine chosen
        if s.probs is not None:
            hard_picks += [int(s.probs[i].argmax() == y[i]) for i in s.ask if draws[i] >= CHECK_SHARE]
        known[s.ask] = y[s.ask]
        if s.checks < MIN_CHECKS:
            assert s.estimate is None
    s = suggest(X[pool], known, list("abcd"), 0, 0, draws=draws)
    head = s.head
    # (the head reads the features as the rounds map them: engine/train/probe.py ``mapped``)
    truth = float(((mapped(X[fresh], 32) @ head["weight"].T + head["bias"]).argmax(1) == y[fresh]).mean())
    lo, hi = s.estimate_range
    # within its range, and within 2.5 binomial standard errors of that many checks (20 checks: +-0.2; a fixed 0.12
    # held for one trajectory and not the next, at 1.7 standard errors)
    sampling = math.sqrt(truth * (1 - truth) / s.checks)
    assert s.checks >= 15 and lo <= truth <= hi and abs(s.estimate - truth) < 2.5 * sampling, (s.estimate, truth)
    assert np.mean(hard_picks) < truth - 0.1  # (what the chosen picks' own accuracy would have said)


def test_past_typiclusts_rounds_the_picks_read_the_final_features_as_the_head_does(monkeypatch):
    """While labels are few (TypiClust's rounds) the picks cover the pile on the final features as they are; after
    that the head's doubts are spread over the final features as the head reads them (raised to its power): hand
    signs at 10 labels a class 0.915 -> 0.941 over six seeds of the label benchmark (docs/benchmarks.md, "Picks on
    the head's view"). What each round's picks cluster is what this checks."""
    import engine.labelling.session as session
    from engine.train.probe import FINAL_POWER, Blocks, mapped

    seen = []
    real = session.next_batch
    monkeypatch.setattr(session, "next_batch", lambda X, *a, **k: seen.append(np.array(X)) or real(X, *a, **k))
    rng = np.random.default_rng(0)
    centres = rng.random((3, 24)) * 2
    kind = np.repeat(np.arange(3), 120)
    X = np.abs(centres[kind] + 0.3 * rng.standard_normal((len(kind), 24))).astype(np.float32)
    X = np.hstack([X, rng.standard_normal((len(X), 8)).astype(np.float32)])  # (an earlier layer's block after them)
    blocks = Blocks([24, 8])
    for per_class, view in ((2, X[:, :24]), (6, mapped(X, 24, FINAL_POWER)[:, :24])):
        known = np.full(len(kind), -1)
        for k in range(3):
            known[np.flatnonzero(kind == k)[:per_class]] = k
        seen.clear()
        session.suggest(X, known, ["a", "b", "c"], 6, 0, draws=np.ones(len(X)), blocks=blocks)
        assert len(seen) == 1 and np.allclose(seen[0], view, atol=1e-6), per_class
