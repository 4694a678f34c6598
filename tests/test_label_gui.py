"""Labelling an unsorted folder in the app, as a user does it (pytest-qt), and the labels surviving a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("PySide6")
from PySide6.QtCore import QItemSelectionModel, Qt
from PySide6.QtWidgets import QApplication, QMessageBox

from engine.data.labels import CHECK_SHARE, read_labels
from gui.tabs.label.book import LabelBook
from tests.imagegen import draw_image
from tests.test_gui import settings, window  # noqa: F401 (the window fixtures, shared)

KINDS = ("circles", "squares", "stripes")


@pytest.fixture
def pile(tmp_path):
    """Loose images of three kinds, flat and nested, named so the name says nothing of the kind: no class folders."""
    root = tmp_path / "pile"
    truth = {}
    for i in range(36):
        kind = KINDS[i % 3]
        folder = root / ("" if i % 4 else "2024/june")
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"IMG_{i:04d}.jpg"
        draw_image(kind, 500 + i).save(p)
        truth[os.path.abspath(p)] = kind
    return root, truth


def _select(t, paths):
    sm = t.grid.selectionModel()
    sm.clearSelection()
    for r in range(t.grid.model().rowCount()):
        idx = t.grid.model().index(r, 0)
        if os.path.abspath(idx.data(Qt.UserRole)) in paths:
            sm.setCurrentIndex(idx, QItemSelectionModel.NoUpdate)
            sm.select(idx, QItemSelectionModel.Select)


def _saved(t):
    t.saver.flush()  # (written off the GUI thread; the status line says "saved." when it is on disk)
    return read_labels(t.labels_file)


def _wait_round(qtbot, w):
    qtbot.waitUntil(lambda: not w.label_tab.round_running and not w.label_tab.round_pending, timeout=60000)
    job = w.jobs.job("label")
    if job is not None:
        assert job.wait(60000)
    qtbot.wait(50)


def test_a_labelling_session_from_an_unsorted_folder_to_a_sorted_one(qtbot, window, pile, tmp_path):  # noqa: F811
    root, truth = pile
    w, t = window, window.label_tab
    w.activateWindow()
    w.scan_folder(str(root))  # no class folders: the app opens it for labelling instead of failing
    qtbot.waitUntil(lambda: t.pile is not None and bool(t.batch), timeout=120000)
    _wait_round(qtbot, w)
    assert w.tabs.currentWidget() is t and not w.last_error
    assert "Label tab" in w.dataset_tab.status.text()
    assert {truth[p] for p in t.batch} == set(KINDS)  # the first picks show every kind of picture

    for name in KINDS:  # classes made by typing a name
        qtbot.keyClicks(t.new_class, name)
        qtbot.keyClick(t.new_class, Qt.Key_Return)
    assert t.classes == list(KINDS)

    # By number key, one image at a time.
    first = next(p for p in t.batch if truth[p] == "circles")
    _select(t, [first])
    t.grid.setFocus()
    qtbot.keyClick(t.grid, Qt.Key_1)
    assert _saved(t)[first] == ("circles", "user")  # saved at once
    qtbot.waitUntil(lambda: t.status.text().endswith("saved."), timeout=5000)
    t.train_btn.click()  # one class so far: a clear message, and the labelling stays as it was
    qtbot.waitUntil(lambda: "needs two" in w.last_error, timeout=30000)
    assert t.pile is not None and _saved(t)[first] == ("circles", "user")
    w.session.last_error = ""
    for box in w.findChildren(QMessageBox):  # the user reads the message and closes it
        box.close()
    w.tabs.setCurrentWidget(t)
    w.activateWindow()  # (the window manager does this when the box closes; offscreen Qt needs asking)
    qtbot.waitUntil(lambda: QApplication.activeWindow() is w, timeout=5000)

    # Many at once: every square in the batch, one key.
    squares = [p for p in t.batch if truth[p] == "squares"]
    _select(t, squares)
    qtbot.keyClick(t.grid, Qt.Key_2)
    assert all(_saved(t)[p] == ("squares", "user") for p in squares)

    # Undo takes the last action back, in the file too; the class button does it again.
    assert t.undo()
    assert not any(p in _saved(t) for p in squares)
    _select(t, squares)
    t.class_bar.buttons.itemAt(1).widget().click()
    assert all(_saved(t)[p] == ("squares", "user") for p in squares)

    rest = [p for p in t.batch if truth[p] in ("circles", "stripes") and p != first]
    stripes = [p for p in rest if truth[p] == "stripes"]
    _select(t, stripes[:-1])
    qtbot.keyClick(t.grid, Qt.Key_3)
    _select(t, [stripes[-1]])
    qtbot.keyClick(t.grid, Qt.Key_0)  # "not a class": kept in the file with an empty label, never trained on
    assert _saved(t)[stripes[-1]] == ("", "user")
    _select(t, [p for p in rest if truth[p] == "circles"])
    qtbot.keyClick(t.grid, Qt.Key_1)
    _wait_round(qtbot, w)

    s = t.suggestions
    assert s is not None and s.probs is not None
    # The estimated accuracy comes from random checks only (one image in ten asked is drawn at random; the others
    # are the hard ones the picks chose), and waits for five of them: one batch has had one.
    assert s.estimate is None and not t.plot.points and "once 5 random checks" in t.accept_note.text()
    checks = [p for p, d in zip(t.abs_paths, t.pile.draws()) if d < CHECK_SHARE and p not in t.labels]
    assert len(checks) >= 4
    for p in checks:  # (as if the user had answered the next batches' checks)
        t.assign(truth[p], [p])
    t.request_round()
    _wait_round(qtbot, w)
    s = t.suggestions
    assert s.checks >= 5 and s.estimate is not None and s.estimate_range[0] <= s.estimate <= s.estimate_range[1]
    assert t.plot.points and t.plot.points[-1][:2] == (s.n_labelled, s.estimate)  # the plot's point
    assert f"from the {s.checks} random checks" in t.accept_note.text()
    a = s.accept  # how often such suggestions were right comes with how low that could be, given how few judged it
    if a["right_so_far"] is not None:  # (it is, on this folder of three easy kinds)
        assert a["right_at_least"] < a["right_so_far"] and "at least" in t.accept_note.text()
    t.level.setValue(50)
    n = t.accept_suggestions()
    saved = _saved(t)
    accepted = {p: lab for p, (lab, src) in saved.items() if src == "accepted"}
    assert n == len(accepted) > 0
    assert sum(truth[p] == lab for p, lab in accepted.items()) >= 0.9 * len(accepted)
    assert all(src == "user" for p, (lab, src) in saved.items() if p not in accepted)  # kept apart

    out = tmp_path / "sorted"
    w.label_tab.jobs.write_sorted_folder(str(out))
    qtbot.waitUntil(lambda: not w.busy(), timeout=30000)
    qtbot.wait(50)
    labelled = {p: lab for p, (lab, _) in _saved(t).items() if lab}
    written = {str(p) for p in out.rglob("*.jpg")}
    assert len(written) == len(labelled) and sorted(os.listdir(out)) == sorted(set(labelled.values()))
    for p, lab in labelled.items():
        copy = out / lab / os.path.basename(p)
        assert os.path.samefile(copy, p) or copy.read_bytes() == open(p, "rb").read()
        assert os.path.exists(p)  # nothing moved

    t.train_btn.click()  # the Dataset tab opens the folder with the labels as its classes
    qtbot.waitUntil(lambda: w.dataset_tab.dataset is not None and not w.session.scanning, timeout=30000)
    ds = w.dataset_tab.dataset
    assert ds.labels_file == os.path.abspath(t.labels_file) and ds.classes == sorted(KINDS)
    assert len(ds.samples) == len(labelled)
    assert w.train_config().labels == os.path.abspath(t.labels_file)


_WRITER = """
import sys
from engine.data.labels import write_labels
labels = {}
for i in range(100000):
    labels[f"/pile/IMG_{i:05d}.jpg"] = ("cat" if i % 2 else "dog", "user")
    write_labels(sys.argv[1], labels)
    print(i, flush=True)  # confirmed: saved
"""


def test_answering_batches_one_image_at_a_time_every_new_batch_is_full_and_holds_a_random_check(
    qtbot,
    window,  # noqa: F811
    tmp_path,
):
    """Rounds start in the background after every few answers, so the round that ends a batch was often started
    before its last answers and asked about images answered since: its batch came short, and usually without its
    random check (on hymenoptera 3 checks in 64 labels instead of 6), so the estimate came late. Now such a batch
    is dropped for the round already on its way that sees every answer. Then the user trains on the labels."""
    root = tmp_path / "big"
    root.mkdir()
    truth = {}
    for i in range(150):
        p = root / f"IMG_{i:04d}.jpg"
        draw_image(KINDS[i % 3], 900 + i).save(p)
        truth[os.path.abspath(p)] = KINDS[i % 3]
    w, t = window, window.label_tab
    w.scan_folder(str(root))
    qtbot.waitUntil(lambda: t.pile is not None and bool(t.batch), timeout=120000)
    _wait_round(qtbot, w)
    draws = dict(zip(t.abs_paths, t.pile.draws()))
    shown = []
    for _ in range(5):
        batch = list(t.batch)
        shown.append(batch)
        for p in batch:  # one answer at a time, as a user clicks
            t.assign(truth[p], [p])
            qtbot.wait(30)
        _wait_round(qtbot, w)
    for batch in shown:
        left = [p for p in batch if draws[p] < CHECK_SHARE]
        assert len(batch) == 12 and len(left) == 1, (len(batch), len(left))
    assert t.suggestions.checks == 5

    # Trained on these labels, the run leads with its accuracy on the five checks: the other labels are the images
    # the view asked about for being hard, so their cross-validated accuracy says less about the folder.
    t.train_btn.click()
    qtbot.waitUntil(lambda: w.dataset_tab.dataset is not None and not w.session.scanning, timeout=30000)
    w.start_training()
    qtbot.waitUntil(lambda: w.job is not None and not w.job.is_running(), timeout=300000)
    qtbot.wait(50)
    res = w.last_result
    assert res.run_dir and res.metrics["random_checks"]["n"] == 5
    assert res.message.startswith("Accuracy on the 5 random checks among your labels"), res.message
    assert "Accuracy on the random checks" in w.results_tab.summary.text()


def test_killing_the_app_mid_session_keeps_every_confirmed_label(tmp_path):
    """Labels are written after every action by replacing the file: a kill at any moment leaves a whole file with
    every label confirmed before it."""
    path = tmp_path / "labels.csv"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    confirmed = -1
    for line in proc.stdout:
        confirmed = int(line)
        if confirmed >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    labels = read_labels(str(path))
    assert len(labels) >= confirmed + 1
    assert all(labels[f"/pile/IMG_{i:05d}.jpg"] == ("cat" if i % 2 else "dog", "user") for i in range(confirmed + 1))


def test_a_partly_sorted_folder_keeps_its_class_folders_when_the_user_says_they_are_classes(
    qtbot,
    window,  # noqa: F811
    tmp_path,
):
    """Two class folders plus loose images: *Subfolders are classes* labels the sorted ones by their folder (source
    "folder", apart from the user's), the loose ones get suggestions, and undo or unticking takes them back."""
    from engine.data.labels import scan_labelled

    root = tmp_path / "partly"
    for kind, n in (("circles", 8), ("squares", 8)):
        (root / kind).mkdir(parents=True)
        for i in range(n):
            draw_image(kind, 300 + i).save(root / kind / f"{kind}_{i}.jpg")
    for i in range(12):
        draw_image(("circles", "squares")[i % 2], 700 + i).save(root / f"loose_{i}.jpg")
    w, t = window, window.label_tab
    w.start_labelling(str(root))
    qtbot.waitUntil(lambda: t.pile is not None and bool(t.batch), timeout=120000)
    _wait_round(qtbot, w)
    assert t.folder_classes.isEnabled()
    t.folder_classes.setChecked(True)
    saved = _saved(t)
    assert len(saved) == 16 and {src for _, src in saved.values()} == {"folder"}
    assert all(saved[os.path.abspath(root / k / f"{k}_0.jpg")] == (k, "folder") for k in ("circles", "squares"))
    assert t.classes == ["circles", "squares"]
    _wait_round(qtbot, w)
    s = t.suggestions
    assert s is not None and s.probs is not None  # the loose images are suggested a class
    assert all(os.path.basename(p).startswith("loose_") for p in t.batch)  # and only they are asked about
    ds = scan_labelled(str(root), t.labels_file)  # train --labels learns from the class folders' images
    assert ds.classes == ["circles", "squares"] and len(ds.samples) == 16
    assert t.undo() and _saved(t) == {}
    t.folder_classes.setChecked(False)
    t.folder_classes.setChecked(True)
    t.folder_classes.setChecked(False)
    assert _saved(t) == {}
    _wait_round(qtbot, w)


def test_undo_takes_back_one_whole_action_and_leaves_the_labels_before_it():
    """The Label tab's edits (a click on many thumbnails, Accept, Subfolders are classes) are each one action: undo
    restores every image it touched to what it was, labelled or not, and only that action."""
    book = LabelBook({"/a.jpg": ("cat", "user")})
    assert book.classes == ["cat"]
    book.skipped.add("/c.jpg")
    assert book.change({"/b.jpg": ("dog", "user"), "/c.jpg": ("dog", "user")}) == 2
    assert book.classes == ["cat", "dog"] and not book.skipped  # a new class; an answered image is no longer skipped
    book.change({"/a.jpg": ("dog", "accepted"), "/d.jpg": ("", "user")})  # relabel one, "not a class" another
    y, used, own = book.targets(["/a.jpg", "/b.jpg", "/d.jpg", "/e.jpg"])
    assert used == ["dog"] and list(y) == [0, 0, -2, -1] and list(own) == [False, True, True, False]
    assert book.undo()
    assert book.labels == {"/a.jpg": ("cat", "user"), "/b.jpg": ("dog", "user"), "/c.jpg": ("dog", "user")}
    assert book.undo() and book.labels == {"/a.jpg": ("cat", "user")}
    assert not book.undo() and book.labels == {"/a.jpg": ("cat", "user")}  # nothing left to undo: nothing changes
