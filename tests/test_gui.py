"""The desktop app driven like a user would, headless (pytest-qt, QT_QPA_PLATFORM=offscreen)."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")
from PySide6.QtCore import QSettings, Qt

from gui.main_window import MainWindow
from tests.imagegen import draw_image, make_flat_dataset


@pytest.fixture
def settings(tmp_path):
    return QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)


@pytest.fixture
def window(qtbot, settings, tmp_path):
    settings.setValue("train/runs_dir", str(tmp_path / "runs"))
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: w.model_tab.table.rowCount() > 0, timeout=60000)  # backbones discovered
    yield w
    w.confirm = lambda *a: True
    w.close()
    for job in (w.job, w.scan, w.discovery):
        if job is not None:
            assert job.wait(60000), "a job thread was left running"


def open_folder(qtbot, w, folder):
    w.scan_folder(str(folder))
    qtbot.waitUntil(
        lambda: w.dataset_tab.dataset is not None and w.dataset_tab.dataset.root == str(folder), timeout=30000
    )


def wait_job(qtbot, w, timeout=300000):
    qtbot.waitUntil(lambda: w.job is not None and not w.job.is_running(), timeout=timeout)
    qtbot.wait(50)  # let the queued finished/failed signal land


def test_dataset_model_training_results_flow(qtbot, window, flat_data, tmp_path, monkeypatch):
    w = window
    import gui.tabs.results.tab as results_tab

    reads = []  # run folders the Results tab reads a run's figures from
    for name in ("read_metrics", "read_predictions"):
        real = getattr(results_tab, name)
        monkeypatch.setattr(results_tab, name, lambda d, *a, _real=real: reads.append(d) or _real(d, *a))
    open_folder(qtbot, w, flat_data)
    t = w.dataset_tab.class_table
    assert t.rowCount() == 3
    assert [t.item(r, 0).text() for r in range(3)] == ["circles", "squares", "stripes"]
    assert [int(t.item(r, 1).text()) for r in range(3)] == [14, 14, 14]
    assert w.dataset_tab.grid.model().rowCount() == 42
    w.dataset_tab.class_filter.setCurrentIndex(2)  # "squares"
    assert w.dataset_tab.grid.model().rowCount() == 14
    assert w.model_tab.backbone() == "efficientnet_lite0"
    assert "feature extraction" in w.model_tab.advice.text()
    w.model_tab.fe.setChecked(True)
    w.training_tab.form.epochs.setValue(20)
    w.start_training()
    qtbot.waitUntil(lambda: w.training_tab.plots.point_count() > 0, timeout=120000)
    wait_job(qtbot, w)
    res = w.last_result
    assert res is not None and res.run_dir and not res.cancelled
    assert Path(res.run_dir, "model.safetensors").is_file()
    assert Path(res.run_dir).parent == tmp_path / "runs"
    w.training_tab.plots.redraw()
    xs, _ = w.training_tab.plots.curves["val_acc"].getData()
    assert xs is not None and len(xs) >= 1
    # Results: the new run is selected in the runs list (its curve drawn), with accuracy and its interval
    assert w.results_tab.run_dir == res.run_dir
    selected = {i.row() for i in w.results_tab.runs_table.selectedIndexes()}
    assert selected == {0} and w.results_tab.runs_table.rowCount() == 1
    assert len(w.results_tab.compare.getPlotItem().listDataItems()) == 1
    assert "95% interval" in w.results_tab.summary.text()
    # no validation folder: every labelled image trained the model and was judged out of fold, and the tabs say so
    assert "Cross-validated (5-fold) accuracy" in w.results_tab.summary.text()
    assert "each judged by a head that never saw it" in w.results_tab.mistakes_label.text()
    assert "the features and the regularisation were chosen" in w.results_tab.summary.text()
    assert "The head reads the network's" in w.results_tab.summary.text()  # which features, and the evidence
    assert "Feature extraction cross-validates (5 folds): all 42 labelled images" in w.dataset_tab.status.text()
    assert "stall" not in w.status_label.text().lower()  # a developer's measurement, not the user's concern
    # a confusion-matrix cell leads to its images: as many as the run's metrics.json counts there
    cm = json.loads(Path(res.run_dir, "metrics.json").read_text())["confusion_matrix"]
    assert w.results_tab.cm.rowCount() == 3 and int(w.results_tab.cm.item(0, 0).text()) == cm[0][0] > 0
    w.results_tab.show_cell(0, 0)
    assert w.results_tab.cell_grid.model().rowCount() == cm[0][0]
    assert w.predict_tab.start_btn.isEnabled()
    # the just-finished run was shown from the job's result; the folder is read only to reopen it
    assert reads == []
    summary = w.results_tab.summary.text()
    assert w.open_run(res.run_dir) and reads == [res.run_dir, res.run_dir]
    assert w.results_tab.summary.text() == summary


def test_automatic_mode_is_the_default_and_races_both_strategies_on_one_plot(qtbot, window, flat_data, tmp_path):
    w = window
    assert w.model_tab.mode() == "auto"  # the window's default (the command line keeps feature-extraction)
    w.dataset_tab.val_pct.setValue(60)  # (about 25 validation images: enough for the two to be compared at all)
    open_folder(qtbot, w, flat_data)
    assert "Fine-tuning estimate: about" in w.model_tab.estimate.text() and w.model_tab.budget.value() >= 1
    w.model_tab.budget.setValue(30)
    assert w.train_config().budget == 30.0
    w.start_training()
    wait_job(qtbot, w)
    res = w.last_result
    assert res.run_dir and res.metrics["auto"]["winner"] in ("feature-extraction", "fine-tuning")
    plots = w.training_tab.plots
    plots.redraw()
    for strategy in ("feature-extraction", "fine-tuning"):
        xs, _ = plots.curves[f"race:{strategy}:loss"].getData()
        assert xs is not None and len(xs) >= 1
    fe_x = plots.curves["race:feature-extraction:loss"].getData()[0]
    ft_x = plots.curves["race:fine-tuning:loss"].getData()[0]
    assert max(fe_x) <= min(ft_x)  # one clock: feature extraction first
    assert "Kept" in w.training_tab.summary.text()
    assert w.results_tab.runs_table.rowCount() == 2  # both runs stay in Results
    plots.clear()  # the next run goes back to train/validation curves per epoch
    assert not any(k.startswith("race:") for k in plots.curves)


def start_fine_tuning(qtbot, w, data, epochs: int, batch: int | None = 8) -> None:
    open_folder(qtbot, w, data)
    w.model_tab.ft.setChecked(True)
    w.training_tab.form.epochs.setValue(epochs)
    if batch:
        w.training_tab.form.batch.setValue(batch)
    w.start_training()


def test_stop_midway_keeps_best_epoch(qtbot, window, flat_data):
    w = window
    w.model_tab.unfreeze.setValue(1)
    epochs = []
    start_fine_tuning(qtbot, w, flat_data, epochs=6)
    w.job.worker.epoch.connect(epochs.append)
    qtbot.waitUntil(lambda: len(epochs) >= 1, timeout=180000)
    import time

    t0 = time.perf_counter()
    w.stop_job()
    wait_job(qtbot, w)
    stop_s = time.perf_counter() - t0
    res = w.last_result
    assert res.cancelled and res.run_dir, res.message
    metrics = json.loads(Path(res.run_dir, "metrics.json").read_text())
    assert metrics["status"] == "cancelled" and metrics["epochs_run"] < 6
    assert stop_s < 30  # one batch + evaluation of the best epoch on a small CPU
    assert w.training_tab.start_btn.isEnabled()


def test_close_while_training_cancels_cleanly(qtbot, settings, flat_data, tmp_path):
    settings.setValue("train/runs_dir", str(tmp_path / "runs"))
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.show()
    start_fine_tuning(qtbot, w, flat_data, epochs=50, batch=None)
    qtbot.waitUntil(lambda: w.training_tab.log.blockCount() > 3, timeout=60000)
    asked = []
    w.confirm = lambda *a: asked.append(a) or True
    assert w.close()
    assert asked, "closing during a job must ask first"
    assert not w.job.is_running()
    if w.discovery is not None:
        assert w.discovery.wait(60000)


def test_engine_errors_are_clear_messages_and_app_stays_usable(qtbot, window, tmp_path, flat_data):
    w = window
    make_flat_dataset(tmp_path / "one", n_per_class=3, classes=("circles",))
    w.scan_folder(str(tmp_path / "one"))
    qtbot.waitUntil(lambda: "Only one class" in w.last_error, timeout=30000)
    open_folder(qtbot, w, flat_data)  # still usable
    assert w.dataset_tab.class_table.rowCount() == 3
    # a bad folder opened after a good one: the good one stays loaded, and the Dataset tab says which it is
    w.session.last_error = ""
    w.scan_folder(str(tmp_path / "one"))
    qtbot.waitUntil(lambda: "Only one class" in w.last_error, timeout=30000)
    assert "Still loaded" in w.dataset_tab.status.text() and str(flat_data) in w.dataset_tab.status.text()
    assert w.dataset_tab.class_table.rowCount() == 3 and w.train_config().data == str(flat_data)


def test_open_run_predict_folder_and_export_csv_like_the_engine(qtbot, window, fe_run, tmp_path):
    from engine.config import PredictConfig
    from engine.predict.predictions import predict_folder

    w = window
    assert w.open_run(fe_run.run_dir)
    assert w.results_tab.per_class.rowCount() == 3
    folder = tmp_path / "to-predict"
    (folder / "nested").mkdir(parents=True)
    for i in range(5):
        draw_image(("circles", "squares", "stripes")[i % 3], 500 + i).save(folder / f"img{i}.png")
    draw_image("stripes", 77).save(folder / "nested" / "deep.jpg")
    (folder / "nested" / "bad.jpg").write_bytes(b"not a jpeg")
    w.predict_tab.folder.setText(str(folder))
    w.predict_tab.top_k.setValue(2)
    qtbot.keyClick(w.predict_tab.folder, Qt.Key_Return)  # Enter in the field predicts, like the button
    wait_job(qtbot, w)
    assert w.predict_tab.model.rowCount() == 7
    # the rows on screen get their real thumbnails (a decoded image, not the grey placeholder)
    w.tabs.setCurrentWidget(w.predict_tab)
    first = w.predict_tab.model.rows.index(next(r for r in w.predict_tab.model.rows if not r.error))
    qtbot.waitUntil(lambda: w.predict_tab.model.item(first, 0).data(Qt.UserRole + 1) is True, timeout=10000)
    assert w.predict_tab.model.item(first, 0).icon().cacheKey() != w.loader.placeholder.cacheKey()
    gui_csv = tmp_path / "gui.csv"
    w.predict_tab.export_csv(str(gui_csv))
    engine_csv = tmp_path / "engine.csv"
    predict_folder(PredictConfig(fe_run.run_dir, [str(folder)], str(engine_csv), top_k=2))
    assert gui_csv.read_text(encoding="utf-8") == engine_csv.read_text(encoding="utf-8")
    with open(gui_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r["error"]) == 1
    # filters: by class and by confidence
    w.predict_tab.min_conf.setValue(0.0)
    w.predict_tab.class_filter.setCurrentIndex(w.predict_tab.class_filter.findData("stripes"))
    shown = w.predict_tab.proxy.rowCount()
    assert shown == sum(1 for r in rows if r["prediction"] == "stripes")
    w.predict_tab.class_filter.setCurrentIndex(0)
    w.predict_tab.min_conf.setValue(1.0)
    assert w.predict_tab.proxy.rowCount() == sum(1 for r in rows if r["confidence"] and float(r["confidence"]) >= 1.0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_model_from_the_app(qtbot, window, fe_run, tmp_path, fmt):
    w = window
    assert w.open_run(fe_run.run_dir)
    out = tmp_path / f"m.{fmt}"
    from engine.config import ExportConfig

    w.predict_tab.export_model(ExportConfig(fe_run.run_dir, fmt, str(out)))
    wait_job(qtbot, w)
    assert out.is_file() and out.stat().st_size > 1_000_000
    assert json.loads(Path(str(out) + ".json").read_text())["format"] == fmt


def test_a_failed_prediction_is_reported_on_the_predict_tab_only(qtbot, window, fe_run, flat_data, tmp_path):
    """A job's failure or stop reaches the tab that asked for it: the Training tab says nothing about a prediction."""
    import shutil

    w = window
    run = tmp_path / "run"
    shutil.copytree(fe_run.run_dir, run)
    assert w.open_run(str(run))
    (run / "model.safetensors").write_bytes(b"damaged after opening")
    before = w.training_tab.phase.text(), w.training_tab.log.toPlainText()
    w.predict_tab.folder.setText(str(flat_data / "circles"))
    w.predict_tab.start_btn.click()
    wait_job(qtbot, w)
    assert "damaged" in w.last_error and "Failed" in w.predict_tab.status.text()
    assert (w.training_tab.phase.text(), w.training_tab.log.toPlainText()) == before
    assert w.predict_tab.start_btn.isEnabled()


def test_open_broken_run_shows_message(qtbot, window, tmp_path):
    bad = tmp_path / "not-a-run"
    bad.mkdir()
    assert not window.open_run(str(bad))
    assert "Cannot open this run" in window.last_error


def test_settings_persist_between_launches(qtbot, settings, tmp_path):
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.training_tab.form.epochs.setValue(17)
    w.dataset_tab.val_pct.setValue(30)
    w.model_tab.ft.setChecked(True)
    w.session.add_recent(str(tmp_path))
    w.close()
    if w.discovery is not None:
        w.discovery.wait(60000)
    w2 = MainWindow(QSettings(settings.fileName(), QSettings.IniFormat))
    qtbot.addWidget(w2)
    assert w2.training_tab.form.epochs.value() == 17
    assert w2.dataset_tab.val_pct.value() == 30
    assert w2.model_tab.mode() == "fine-tuning"
    assert w2.dataset_tab.recent.itemData(0) == str(tmp_path)
    w2.close()
    if w2.discovery is not None:
        w2.discovery.wait(60000)


def test_settings_saved_before_auto_existed_give_small_pictures_their_recipe(qtbot, tmp_path):
    """A window from before "auto" saved its defaults (3 stages, 0.1x) as if chosen: read back, they are auto again
    (so small pictures get the recipe that fine-tunes them at their own size); a value the user did choose then,
    and 3 stages chosen in a window of today, are kept."""

    def window(lines: str) -> MainWindow:
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.ini"
        path.write_text("[train]\n" + lines)
        w = MainWindow(QSettings(str(path), QSettings.IniFormat))
        qtbot.addWidget(w)
        return w

    def chosen(w: MainWindow) -> tuple:
        return w.session.get("unfreeze"), w.session.get("backbone_lr_mult")

    old_defaults = window("unfreeze=3\nbackbone_lr_mult=0.1\nepochs=9\n")
    assert chosen(old_defaults) == ("auto", None) and old_defaults.training_tab.form.epochs.value() == 9
    assert chosen(window("unfreeze=5\nbackbone_lr_mult=0.25\n")) == (5, 0.25)
    old_defaults.save_settings()  # saved again, now with the version: a later 3 / 0.1 is the user's
    current = window(
        open(old_defaults.settings.fileName())
        .read()
        .split("[train]\n", 1)[1]
        .replace("unfreeze=auto", "unfreeze=3")
        .replace("backbone_lr_mult=\n", "backbone_lr_mult=0.1\n")
    )
    assert chosen(current) == (3, 0.1)
    for w in (old_defaults, current):
        w.close()
        if w.discovery is not None:
            w.discovery.wait(60000)


def test_compare_runs_overlays_curves(qtbot, window, flat_data, tmp_path):
    from engine import TrainConfig, fit

    runs = tmp_path / "runs"
    a = fit(TrainConfig(data=str(flat_data), out=str(runs / "a"), epochs=5))
    b = fit(TrainConfig(data=str(flat_data), out=str(runs / "b"), epochs=8, lr=0.01))
    window.results_tab.set_runs_dir(str(runs))
    assert window.results_tab.runs_table.rowCount() == 2
    assert window.results_tab.overlay([a.run_dir, b.run_dir]) == 2


def test_every_training_setting_round_trips_through_window_settings_and_command_line(
    qtbot, window, settings, flat_data, tmp_path
):
    """config -> window -> saved settings -> a new window -> config -> command line -> parsed config: equal, for every
    TrainConfig field (out and overwrite are per run: pinned). A setting the window or the command line dropped
    (the old *Copy command line* dropped --download) fails here."""
    import dataclasses
    import shlex

    from PySide6.QtWidgets import QApplication

    from engine.__main__ import build_parser
    from engine.config import TrainConfig, from_args

    defaults = TrainConfig()
    cfg = TrainConfig(
        data=str(flat_data),
        out=str(tmp_path / "pinned"),
        mode="fine-tuning",
        backbone="resnet18",
        weights=str(tmp_path / "w.safetensors"),
        download=True,
        unfreeze="all",
        epochs=7,
        batch_size=12,
        lr=0.002,
        backbone_lr_mult=0.25,
        weight_decay=0.0005,
        augment=False,
        patience=4,
        linear_probe_init=False,
        val_split=0.3,
        test_split=0.1,
        seed=5,
        device="cpu",
        cache=False,
        cache_dir=str(tmp_path / "cache"),
        exclude=str(tmp_path / "exclude.csv"),
        engine="torch",
        precision="fp32",
        balance="off",
        budget=12.0,
        bn_stats="update",
        small_images="off",
        cross_fit="off",
        features="depths",
        labels=str(tmp_path / "labels.csv"),
        overwrite=False,
    )
    (tmp_path / "exclude.csv").write_text("path\n" + str(flat_data / "circles" / "circles_000.jpg") + "\n")
    rows = [f"{p},{p.parent.name},user" for p in sorted(flat_data.rglob("*.jpg"))]
    (tmp_path / "labels.csv").write_text("path,label,source\n" + "\n".join(rows) + "\n")
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    assert changed == {f.name for f in dataclasses.fields(TrainConfig)} - {"overwrite"}  # every field is exercised
    window.apply_config(cfg)
    qtbot.waitUntil(lambda: not window.session.scanning and window.dataset_tab.dataset is not None, timeout=30000)
    assert window.train_config(out=cfg.out) == cfg
    window.save_settings()
    w2 = MainWindow(QSettings(settings.fileName(), QSettings.IniFormat))
    qtbot.addWidget(w2)
    qtbot.waitUntil(lambda: w2.model_tab.table.rowCount() > 0, timeout=60000)
    w2.scan_folder(str(flat_data))
    qtbot.waitUntil(lambda: not w2.session.scanning and w2.dataset_tab.dataset is not None, timeout=30000)
    again = w2.train_config(out=cfg.out)
    assert again == cfg
    w2.training_tab.form.runs_dir.setText(str(tmp_path))
    cmd = shlex.split(w2.training_tab.copy_command())
    assert cmd[1:4] == ["-m", "engine", "train"] and QApplication.clipboard().text() == shlex.join(cmd)
    parsed = from_args(TrainConfig, build_parser().parse_args(cmd[3:]))
    assert dataclasses.replace(parsed, out=cfg.out) == cfg
    w2.training_tab.copy_command(cluster=True)
    cluster = shlex.split(QApplication.clipboard().text())
    assert cluster[:5] == ["torchrun", "--nproc_per_node=gpu", "-m", "engine", "train"]
    assert from_args(TrainConfig, build_parser().parse_args(cluster[4:])).device == "cuda"
    w2.close()
    w2.jobs.wait("discovery", 60000)


def test_self_test_mode_passes(tmp_path):
    """`transfer-studio --self-test` (what the packaged app runs in CI) trains both modes and checks a CSV."""
    import subprocess
    import sys

    env = dict(os.environ, HOME=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "gui", "--self-test"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "self-test: passed" in r.stdout and "CSV ok" in r.stdout


def test_clicking_through_tabs_while_a_job_runs(qtbot, window, flat_data):
    """The user keeps using the window during training: every tab paints and the job still finishes cleanly."""
    w = window
    start_fine_tuning(qtbot, w, flat_data, epochs=2)
    switches = 0
    while w.busy():
        for i in range(w.tabs.count()):
            w.tabs.setCurrentIndex(i)
            w.tabs.currentWidget().grab()  # force a real paint of the tab
            qtbot.wait(30)
            switches += 1
    wait_job(qtbot, w)
    assert switches >= 5
    assert w.last_result is not None and w.last_result.run_dir and not w.last_result.cancelled


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="None is immortal from Python 3.12: a lost reference cannot crash"
)
def test_qt_calls_do_not_lose_references_to_none(qapp):
    """PySide6 6.12.0 returned None from every void method without a reference, on Python 3.11: each progress
    update took one reference away, and a long training session ended in "Fatal Python error: deallocating None"."""
    from PySide6.QtGui import QStandardItem
    from PySide6.QtWidgets import QLabel, QProgressBar

    label, bar, item = QLabel(), QProgressBar(), QStandardItem()
    before = sys.getrefcount(None)
    for i in range(2000):
        label.setText("a")
        bar.setValue(i % 100)
        item.setData(i, Qt.UserRole)
    assert sys.getrefcount(None) > before - 1000


def test_start_up_imports_are_kept_out_of_garbage_collection(tmp_path):
    """A full collection walks every tracked object: after PyTorch's imports that took 225-280 ms with the GIL held,
    in whichever thread (the GUI's too). A fresh app process freezes what its own start-up left (gc.freeze is
    process-wide: only a new process can tell) and keeps the collector on."""
    import subprocess

    code = (
        "import gc, os, sys; os.environ['QT_QPA_PLATFORM'] = 'offscreen';"
        "from PySide6.QtCore import QSettings; from PySide6.QtWidgets import QApplication;"
        "app = QApplication([]); from gui.jobs.eventloop import wait_until; from gui.main_window import MainWindow;"
        f"w = MainWindow(QSettings({str(tmp_path / 's.ini')!r}, QSettings.IniFormat));"
        "before = gc.get_freeze_count(); w.show();"
        "assert wait_until(lambda: w.discovery is not None and not w.discovery.is_running(), 120);"
        "print('FROZEN', before, gc.get_freeze_count(), gc.isenabled()); w.close()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HOME=str(tmp_path)),
    )
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FROZEN")), r.stdout + r.stderr
    _, before, after, enabled = line[0].split()
    assert int(before) == 0 and int(after) > 100_000 and enabled == "True"


def test_image_grid_leaves_room_for_every_caption(qtbot, tmp_path):
    """A wide thumbnail first and a tall one after it: the grid lays out every item from one item's size, so both
    must need the same room (a wide first one once clipped the captions of all taller ones)."""
    from PySide6.QtGui import QImage

    from gui.widgets.image_grid import ImageGrid
    from gui.widgets.thumbs import ThumbnailLoader

    wide, tall = tmp_path / "wide.jpg", tmp_path / "tall.png"
    draw_image("stripes", 1).resize((300, 120)).save(wide)
    draw_image("circles", 2).resize((90, 240)).save(tall)
    loader = ThumbnailLoader()
    grid = ImageGrid(loader)
    qtbot.addWidget(grid)
    grid.set_items([(str(wide), "stripes 97%", ""), (str(tall), "circles 55%", "")])
    grid.show()
    for p in (wide, tall):
        loader.icon(str(p))
    qtbot.waitUntil(lambda: str(wide) in loader.cache and str(tall) in loader.cache, timeout=10000)
    hints = [grid.sizeHintForIndex(grid.model().index(r, 0)) for r in range(2)]
    assert hints[0] == hints[1]
    assert hints[0].height() >= loader.size + grid.fontMetrics().height()  # icon plus one line of caption
    # the picture keeps its proportions: the wide one is centred with transparent bands above and below
    img = loader.cache[str(wide)].pixmap(loader.size, loader.size).toImage().convertToFormat(QImage.Format_ARGB32)
    mid = loader.size // 2
    assert img.pixelColor(mid, 2).alpha() == 0 and img.pixelColor(mid, mid).alpha() == 255
    loader.shutdown()


def test_thumbnails_show_a_12_bit_scan_as_the_engine_sees_it(qapp, tmp_path):
    """Qt scales 16-bit grey files by 65535: a scan holding 12-bit values showed nearly black in the window."""
    import numpy as np
    from PIL import Image

    from gui.widgets.thumbs import read_image

    path = tmp_path / "scan.png"
    Image.fromarray(np.linspace(0, 4095, 80 * 80).reshape(80, 80).astype(np.uint16)).save(path)
    img = read_image(str(path), 40)
    assert (img.width(), img.height()) == (40, 40)
    assert img.pixelColor(39, 39).value() > 240 and img.pixelColor(0, 0).value() < 15
    ordinary = tmp_path / "ordinary.png"
    draw_image("circles", 1).save(ordinary)
    small = read_image(str(ordinary), 40)
    assert max(small.width(), small.height()) == 40 and not small.isNull()


def test_a_finished_job_thread_ends_while_the_gui_thread_waits(qapp):
    """Closing the window waits for background jobs (folder scan, backbone discovery) without running the event
    loop: the job's thread must end by itself, or closing during start-up hung for the whole wait."""
    import time as _time

    from gui.jobs.worker import start_job

    def slow(callbacks=None, cancel=None):
        _time.sleep(0.3)
        return "done"

    job = start_job(None, slow)
    job.start()
    assert job.wait(20000), "the job's thread did not end while the GUI thread was blocked in wait()"
    assert not job.is_running()


def test_opening_another_folder_during_a_scan_shows_no_error(qtbot, window, flat_data, tmp_path, monkeypatch):
    """A user who opened the wrong (big) folder picks another one at once: the first scan is cancelled quietly
    (it once popped up "The job failed: Cancelled") and the second folder is shown. Training cannot start while
    a scan runs (it would have trained the folder opened before)."""
    import time

    import gui.tabs.dataset.tab
    from engine.events import Cancelled

    real = gui.tabs.dataset.tab.open_dataset
    started = []

    def slow_scan(cfg, callbacks=None, cancel=None):
        if cfg.data == str(tmp_path / "big"):
            started.append(cfg.data)
            while not cancel.cancelled:  # a scan still walking a huge folder
                time.sleep(0.01)
            raise Cancelled()
        return real(cfg, callbacks=callbacks, cancel=cancel)

    monkeypatch.setattr(gui.tabs.dataset.tab, "open_dataset", slow_scan)
    errors = []
    window.session.error.disconnect(window.show_error)
    window.session.error.connect(lambda message, details="": errors.append(message))
    (tmp_path / "big").mkdir()
    open_folder(qtbot, window, flat_data)
    window.scan_folder(str(tmp_path / "big"))
    qtbot.waitUntil(lambda: bool(started), timeout=10000)
    window.start_training()  # the earlier folder is still loaded, but the user is looking at the new one
    assert window.job is None and errors and "still being scanned" in errors.pop()
    open_folder(qtbot, window, flat_data)
    qtbot.wait(200)  # let any queued signal from the first scan land
    assert errors == []
    assert window.dataset_tab.dataset.root == str(flat_data) and window.dataset_tab.class_table.rowCount() == 3


def test_embedding_cache_can_be_seen_and_deleted_from_the_app(qtbot, window, monkeypatch, tmp_path):
    import numpy as np
    from PySide6.QtWidgets import QMessageBox

    from engine.embed.cache import EmbeddingCache, cache_contents
    from engine.network.backbones import LITE0_PREPROCESSING
    from engine.paths import default_cache_dir

    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(tmp_path / "cache"))  # this test's own
    shown = []
    monkeypatch.setattr(QMessageBox, "information", lambda parent, title, text: shown.append(text))
    assert window.manage_embedding_cache() is None and "is empty" in shown[-1]
    cache = EmbeddingCache(default_cache_dir(), "efficientnet_lite0", "w", LITE0_PREPROCESSING)
    for i in range(3):
        cache.put(f"hash{i}", np.ones(8, np.float32) * i)
    cache.save()
    asked = []
    window.confirm = lambda title, text: asked.append(text) or False
    assert window.manage_embedding_cache() is None and "3 image(s)" in asked[-1]
    assert len(cache_contents()) == 1  # "No" keeps it
    window.confirm = lambda title, text: True
    assert window.manage_embedding_cache() > 0
    assert cache_contents() == [] and "Deleted" in window.status_label.text()


def test_dropping_photos_on_the_predict_tab_predicts_them(qtbot, window, fe_run, flat_data, tmp_path):
    """Drag a photo and a folder from the file manager onto the Predict tab: both are predicted, in that order; a
    folder dropped on another tab still opens as the dataset."""
    from PySide6.QtCore import QMimeData, QPointF, QUrl
    from PySide6.QtGui import QDropEvent

    w = window
    assert w.open_run(fe_run.run_dir)
    photo = tmp_path / "photo.png"
    draw_image("circles", 4242).save(photo)

    def drop(paths):
        mime = QMimeData()
        mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
        w.dropEvent(QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))

    w.tabs.setCurrentWidget(w.predict_tab)
    drop([photo, flat_data / "squares"])
    wait_job(qtbot, w)
    rows = w.predict_tab.model.rows
    assert [Path(r.path).name for r in rows][0] == "photo.png" and rows[0].prediction == "circles"
    assert len(rows) == 1 + 14 and all(r.prediction == "squares" for r in rows[1:])
    w.predict_tab.start_btn.click()  # the field now holds both dropped paths: Predict again does the same
    wait_job(qtbot, w)
    assert len(w.predict_tab.model.rows) == 15
    w.tabs.setCurrentWidget(w.dataset_tab)
    drop([flat_data])
    qtbot.waitUntil(
        lambda: w.dataset_tab.dataset is not None and w.dataset_tab.dataset.root == str(flat_data), timeout=30000
    )


def test_confidence_panel_saves_a_threshold_and_heatmaps_come_from_the_background(
    qtbot, window, fe_run, flat_data, tmp_path
):
    """Results > Confidence says in words how far the confidence holds and saves the "not sure" threshold with the
    model; Where it looked… shows the image with its heatmap (computed in a job), toggled off shows the image."""
    import shutil

    import numpy as np

    w = window
    run = tmp_path / "run"
    shutil.copytree(fe_run.run_dir, run)
    assert w.open_run(str(run))
    trust = w.results_tab.trust
    assert "When it says" in trust.words.text() and "expected calibration error" in trust.words.text()
    assert "even a perfectly calibrated model shows about" in trust.words.text()
    trust.target.setValue(50.0)
    assert "answers 100% of images" in trust.target_text.text()
    trust.save_btn.click()
    meta = json.loads((run / "model.json").read_text())
    assert meta["unsure"]["target_accuracy"] == 0.5 and meta["unsure"]["target_reached"]
    # the heatmap of an image selected in a gallery
    w.results_tab.show_cell(1, 1)
    grid = w.results_tab.cell_grid
    grid.setCurrentIndex(grid.model().index(0, 0))
    w.results_tab.heatmap_btn.click()
    dlg = w.results_tab.heatmaps.dialog
    qtbot.waitUntil(lambda: dlg.result is not None or "No heatmap" in dlg.caption.text(), timeout=60000)
    assert dlg.result is not None, dlg.caption.text()
    assert "heatmap for" in dlg.caption.text()
    with_heat = dlg.shown_image()
    dlg.toggle.setChecked(False)
    assert np.array_equal(dlg.shown_image(), dlg.result.image) and not np.array_equal(with_heat, dlg.result.image)
    dlg.close()
    # Predict shows each row's status and filters by it
    w.predict_tab.folder.setText(str(flat_data / "circles"))
    w.predict_tab.start_btn.click()
    wait_job(qtbot, w)
    statuses = {r.status for r in w.predict_tab.model.rows}
    assert statuses <= {"ok", "unsure", "unfamiliar"}
    w.predict_tab.status_filter.setCurrentIndex(w.predict_tab.status_filter.findData("ok"))
    assert w.predict_tab.proxy.rowCount() == sum(r.status == "ok" for r in w.predict_tab.model.rows)


def test_check_dataset_then_exclude_move_and_undo_from_the_panel(qtbot, window, tmp_path):
    """Check dataset lists the planted problems and maps every image; Exclude adds to the folder's exclude list
    (what Start trains without), Move to class moves the file (asked first) and Undo last move puts it back; the
    class table follows each change."""
    import shutil

    from tests.test_doctor import make_scenes

    w = window
    root = make_scenes(tmp_path / "data", n_train=12, n_val=4)
    moved = root / "train" / "circles" / "moved.jpg"
    shutil.move(root / "train" / "lines" / "03.jpg", moved)
    shutil.copy(root / "train" / "boxes" / "02.jpg", root / "train" / "boxes" / "copy.jpg")
    open_folder(qtbot, w, root)
    d = w.dataset_tab

    def counts():
        return {
            d.class_table.item(r, 0).text(): int(d.class_table.item(r, 1).text())
            for r in range(d.class_table.rowCount())
        }

    assert counts() == {"boxes": 17, "circles": 17, "lines": 15}
    d.check_btn.click()
    wait_job(qtbot, w)
    issues = {(f.issue, f.path) for f in d.doctor.findings}
    assert ("label", str(moved)) in issues and ("duplicate", str(root / "train" / "boxes" / "copy.jpg")) in issues
    assert d.map.scatter is not None and len(d.map.scatter.points()) == 49
    qtbot.waitUntil(lambda: "t-SNE" in d.map.caption.text(), timeout=60000)
    # exclude the byte copy: the folder's exclude list, and the training config, have it
    d.doctor.filter.setCurrentIndex(d.doctor.filter.findData("duplicate"))
    d.doctor.exclude_btn.click()
    qtbot.waitUntil(lambda: not w.session.scanning and counts()["boxes"] == 16, timeout=30000)
    cfg = w.train_config()
    assert cfg.exclude and str(root / "train" / "boxes" / "copy.jpg") in Path(cfg.exclude).read_text()
    # move the mislabelled picture where it belongs, then undo
    d.doctor.filter.setCurrentIndex(d.doctor.filter.findData("label"))
    row = next(i for i, f in enumerate(d.doctor.visible()) if f.path == str(moved))
    d.doctor.table.selectRow(row)
    asked = []
    d.confirm = lambda title, text: asked.append(text) or True
    d.doctor.move_btn.click()
    assert asked and not moved.exists() and (root / "train" / "lines" / "moved.jpg").exists()
    back = {"boxes": 16, "circles": 16, "lines": 16}
    qtbot.waitUntil(lambda: not w.session.scanning and counts() == back, timeout=30000)
    d.doctor.undo_btn.click()
    assert moved.exists() and not (root / "train" / "lines" / "moved.jpg").exists()
    qtbot.waitUntil(lambda: not w.session.scanning and counts()["circles"] == 17, timeout=30000)
    w.jobs.wait("projection", 60000)
