"""The window's one state: each tab's settings bound both ways to the session (one tab at a time, no window), the
views derived from settings following them, settings saved on change, one refusal for a second job."""

from __future__ import annotations

import time

import pytest
from PySide6.QtCore import QSettings

from engine.data.folder import scan
from gui.session.state import BUSY, FIELDS, Session
from tests.imagegen import make_flat_dataset


@pytest.fixture
def session(tmp_path):
    return Session(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = make_flat_dataset(tmp_path_factory.mktemp("small"), n_per_class=10)
    return scan(str(root))


# every field a tab shows, a value other than its default, and how the widget shows it
TRAINING = {
    "epochs": (7, lambda f: f.epochs.value()),
    "batch_size": (12, lambda f: f.batch.value()),
    "lr": (0.002, lambda f: f.lr.value()),
    "patience": (4, lambda f: f.patience.value()),
    "augment": (False, lambda f: f.augment.isChecked()),
    "backbone_lr_mult": (0.25, lambda f: f.backbone_lr_mult.value()),
    "weight_decay": (0.0005, lambda f: f.weight_decay.value()),
    "linear_probe_init": (False, lambda f: f.linear_probe_init.isChecked()),
    "cache": (False, lambda f: f.cache.isChecked()),
    "cache_dir": ("/tmp/c", lambda f: f.cache_dir.text()),
    "engine": ("torch", lambda f: f.engine.currentData()),
    "precision": ("fp32", lambda f: f.precision.currentData()),
    "balance": ("off", lambda f: f.balance.currentData()),
    "bn_stats": ("update", lambda f: f.bn_stats.currentData()),
    "small_images": ("off", lambda f: "auto" if f.small_images.isChecked() else "off"),
    "cross_fit": ("off", lambda f: "auto" if f.cross_fit.isChecked() else "off"),
    "features": ("depths", lambda f: f.features.currentData()),
    "device": ("cpu", lambda f: f.device.currentData()),
}


def test_each_training_setting_shows_the_session_and_sets_it(qtbot, session):
    from gui.tabs.training.settings_form import SettingsForm

    form = SettingsForm(session)
    qtbot.addWidget(form)
    for name, (value, shown) in TRAINING.items():
        session.set(name, value)
        assert shown(form) == value, name  # the session -> the widget
    form.epochs.setValue(3)
    form.features.setCurrentIndex(form.features.findData("final"))
    form.cross_fit.setChecked(True)
    form.cache_dir.setText("")
    assert (session.get("epochs"), session.get("features"), session.get("cross_fit")) == (3, "final", "auto")
    assert session.get("cache_dir") is None  # an empty field is "the default"
    form.epochs.setValue(0)
    assert session.get("epochs") is None  # 0 shows "auto": the mode's default


def test_the_model_tab_shows_the_session_and_sets_it(qtbot, session):
    from gui.tabs.model.tab import ModelTab

    tab = ModelTab(session)
    qtbot.addWidget(tab)
    assert tab.mode() == "auto"  # the window's default (the command line's is feature-extraction)
    session.set("mode", "fine-tuning")
    assert tab.ft.isChecked()
    tab.fe.setChecked(True)
    assert session.get("mode") == "feature-extraction"
    session.set("unfreeze", "all")
    assert tab.unfreeze_all.isChecked()
    tab.unfreeze_all.setChecked(False)
    tab.unfreeze.setValue(4)
    assert session.get("unfreeze") == 4
    session.set("weights", "/w.safetensors")
    assert tab.w_file.isChecked() and tab.w_path.text() == "/w.safetensors"
    tab.w_default.setChecked(True)
    assert session.get("weights") is None
    tab.download.setChecked(True)
    assert session.get("download") is True


def test_the_dataset_tabs_split_shows_the_session_and_sets_it(qtbot, session):
    from gui.tabs.dataset.tab import DatasetTab
    from gui.widgets.thumbs import ThumbnailLoader

    tab = DatasetTab(session, ThumbnailLoader())
    qtbot.addWidget(tab)
    session.set("val_split", 0.3)
    assert tab.val_pct.value() == 30
    tab.test_pct.setValue(10)
    tab.seed.setValue(5)
    assert (session.get("test_split"), session.get("seed")) == (0.1, 5)


def test_the_estimate_and_the_budget_follow_every_setting_they_read(qtbot, session, small):
    from gui.tabs.model.tab import ModelTab

    tab = ModelTab(session)
    qtbot.addWidget(tab)
    assert tab.estimate.text() == ""  # no folder: no estimate
    session.set_dataset(small)
    first = tab.estimate.text()
    assert first.startswith("Fine-tuning estimate:") and session.get("budget") == tab.budget.value() >= 1
    session.set("epochs", 40)  # more epochs: a longer estimate, and the budget follows it
    assert tab.estimate.text() != first and session.get("budget") == tab.budget.value()
    session.set("unfreeze", "all")
    assert tab.estimate.text() != first
    # the user's own budget is kept from now on (a value other than the one shown: the estimate is measured on this
    # machine, and on a busy one the budget that follows it once every stage is unfrozen was the very value set)
    mine = tab.budget.value() + 7
    tab.budget.setValue(mine)
    session.set("epochs", 2)
    assert tab.budget.value() == mine and session.get("budget") == mine


def test_the_advice_follows_the_mode_and_the_folder(qtbot, session, small):
    from gui.tabs.model.tab import ModelTab

    tab = ModelTab(session)
    qtbot.addWidget(tab)
    assert "Recommendation: <b>Automatic</b>" in tab.advice.text()
    session.set_dataset(small)  # 30 images, 6 validation images: too few to compare the two
    assert "too few to compare" in tab.advice.text()
    session.set("mode", "fine-tuning")
    assert "<b>feature extraction</b>" in tab.advice.text() and "too few" not in tab.advice.text()


def test_the_cross_fitting_note_follows_the_setting(qtbot, session, small):
    from gui.tabs.dataset.tab import DatasetTab
    from gui.widgets.thumbs import ThumbnailLoader

    tab = DatasetTab(session, ThumbnailLoader())
    qtbot.addWidget(tab)
    session.set_dataset(small)
    tab.show_dataset(small)
    assert "cross-validates (5 folds): all 30 labelled images" in tab.status.text()
    session.set("cross_fit", "off")
    assert "cross-validates" not in tab.status.text() and "validate on the 6 held out" in tab.status.text()
    session.set("cross_fit", "auto")
    assert "cross-validates" in tab.status.text()


def test_a_setting_is_saved_when_it_changes_without_closing(qtbot, session, tmp_path):
    session.set("epochs", 11)
    session.set_runs_dir(str(tmp_path / "runs"))
    qtbot.wait(900)  # (saved 400 ms after the last change)
    again = Session(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat))
    assert again.get("epochs") == 11 and again.runs_dir == str(tmp_path / "runs")
    assert set(FIELDS) <= set(again.values)


def test_a_second_job_is_refused_once_with_one_message(qtbot, session):
    errors = []
    session.error.connect(lambda message, details: errors.append(message))
    busy = []
    session.busy_changed.connect(busy.append)

    def slow(callbacks=None, cancel=None):
        while not cancel.cancelled:
            time.sleep(0.01)
        return "stopped"

    done = []
    stopped = []
    assert session.start_main(slow, done=done.append, failed=lambda m, d: None, stopping=lambda: stopped.append(1))
    assert not session.start_main(slow, done=done.append, failed=lambda m, d: None)
    assert errors == [BUSY]
    session.stop()
    qtbot.waitUntil(lambda: busy == [True, False], timeout=10000)
    assert stopped == [1] and done == ["stopped"] and not session.busy()


def test_typing_class_names_one_after_another_never_labels(qtbot, session, tmp_path):
    """After Enter creates a class the name field keeps the focus, so the next name's letters (an "s") do not reach
    the pictures' shortcuts."""
    from PySide6.QtCore import Qt

    from gui.tabs.label.tab import LabelTab
    from gui.widgets.thumbs import ThumbnailLoader

    tab = LabelTab(session, ThumbnailLoader())
    qtbot.addWidget(tab)
    tab.show()
    qtbot.waitExposed(tab)
    skipped = []
    tab.skip = lambda: skipped.append(1)
    tab.activateWindow()
    tab.new_class.setEnabled(True)
    tab.new_class.setFocus()
    qtbot.waitUntil(tab.new_class.hasFocus, timeout=5000)
    qtbot.keyClicks(tab.new_class, "cats")
    qtbot.keyClick(tab.new_class, Qt.Key_Return)
    assert tab.classes == ["cats"] and tab.new_class.hasFocus()
    qtbot.keyClicks(tab.new_class, "sheep")
    qtbot.keyClick(tab.new_class, Qt.Key_Return)
    assert tab.classes == ["cats", "sheep"] and not skipped


@pytest.mark.parametrize("strategy", ["", "feature-extraction"])
def test_the_heads_two_feature_sets_plot_as_two_paths(qtbot, strategy):
    """Feature extraction reports one point per strength for each feature set in turn: the plot breaks the line
    between the sets (alone, and in automatic mode's race), and counts only real points."""
    import math

    from engine.events import EpochMetrics
    from gui.tabs.training.plots import LivePlots

    plots = LivePlots()
    qtbot.addWidget(plots)
    labels = ["final features, C 0.001", "final features, C 0.003", "with the earlier layers, C 0.001"]
    for i, label in enumerate(labels):
        plots.add_epoch(EpochMetrics(i + 1, 3, 0.5, 0.8, 0.6 - i / 10, 0.7, 0.0, 0.1, 0.0, False,
                                     strategy=strategy, elapsed=float(i), label=f"head, {label}"))  # fmt: skip
    key = f"race:{strategy}:loss" if strategy else "val_loss"
    ys = plots.data[key][1]
    assert len(ys) == 4 and math.isnan(ys[2]) and not any(math.isnan(v) for v in ys[:2] + ys[3:])
    assert plots.point_count() == (6 if strategy else 12)  # validation loss and accuracy (and train, alone) x 3
    plots.redraw()


def test_the_results_overlay_breaks_between_the_heads_feature_sets():
    """The Results tab's curves of saved runs: feature extraction's history is its head's strengths for each feature
    set in turn, drawn as two paths (a gap between them); a fine-tuning history, without the column, as one line."""
    import math

    from gui.tabs.results.tab import overlay_points

    fe = [{"epoch": e, "val_accuracy": a, "depths": d} for e, a, d in ((1, 0.7, 0), (2, 0.75, 0), (3, 0.72, 1))]
    xs, ys = overlay_points(fe)
    assert xs == [1, 2, 2, 3] and math.isnan(ys[2]) and ys[3] == 0.72
    ft = [{"epoch": e, "val_accuracy": 0.5 + e / 10} for e in (1, 2, 3)]
    assert overlay_points(ft) == ([1, 2, 3], [0.6, 0.7, 0.8])
