"""Results tab: accuracy with its 95% interval, per-class table, clickable confusion matrix, mistakes gallery,
and the runs folder with overlaid validation curves. Reads run folders only (no torch needed)."""

from __future__ import annotations

import os

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine.events import EngineError
from engine.runs import list_runs, read_history, read_json, read_metrics, read_predictions
from engine.trust.calibration import set_unsure_threshold
from gui.session.state import Session
from gui.tabs.results.heatmap_view import Heatmaps
from gui.tabs.results.summary import duration, summary_lines
from gui.tabs.results.trust_panel import TrustPanel
from gui.widgets.image_grid import ImageGrid, reveal_in_file_manager
from gui.widgets.thumbs import ThumbnailLoader

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


class ResultsTab(QWidget):
    """A run's figures (the one just trained, from the job's result; a saved one, from its folder) and the runs
    folder; the run shown is the session's open run (Predict uses it)."""

    def __init__(self, session: Session, loader: ThumbnailLoader, parent: QWidget | None = None) -> None:
        # Builds the widgets left to right, top to bottom: each helper reads like the part of the layout it makes.
        super().__init__(parent)
        self.session = session
        self.heatmaps = Heatmaps(session, self)
        self.run_dir: str | None = None
        self.classes: list[str] = []
        self.preds: list[dict] = []
        self.runs_dir = ""
        root = QHBoxLayout(self)
        outer = QSplitter(Qt.Horizontal)
        outer.addWidget(self._build_runs())
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        self.summary = QLabel("Train a model, or open a saved run (File ▸ Open run…).")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.RichText)
        rl.addWidget(self.summary)
        rl.addWidget(self._build_tables(), 1)
        rl.addWidget(self._build_galleries(loader), 1)
        outer.addWidget(right)
        outer.setSizes([360, 920])
        root.addWidget(outer)
        session.trained.connect(self._trained)
        session.runs_dir_changed.connect(self.set_runs_dir)
        self.set_runs_dir(session.runs_dir)

    def _build_runs(self) -> QWidget:
        """The runs folder's table and the plot comparing the selected runs."""
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        hl = QHBoxLayout()
        hl.addWidget(QLabel("<b>Runs</b> (select several to compare)"))
        self.refresh_btn = QPushButton("Refresh")
        self.refresh_btn.clicked.connect(self.refresh_runs)
        hl.addStretch(1)
        hl.addWidget(self.refresh_btn)
        ll.addLayout(hl)
        self.runs_table = QTableWidget(0, 5)
        self.runs_table.setHorizontalHeaderLabels(["Date", "Backbone", "Mode", "Val acc", "Time"])
        self.runs_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.runs_table.verticalHeader().setVisible(False)
        self.runs_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.runs_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.runs_table.itemSelectionChanged.connect(self._runs_selected)
        ll.addWidget(self.runs_table, 1)
        self.compare = pg.PlotWidget(title="Validation accuracy per epoch")
        self.compare.setLabel("bottom", "epoch (or strength tried)")
        self.compare.addLegend(offset=(-10, -10))
        ll.addWidget(self.compare, 1)
        return left

    def _build_tables(self) -> QSplitter:
        """Per-class precision, recall and F1 beside the confusion matrix."""
        top = QSplitter(Qt.Horizontal)
        self.per_class = QTableWidget(0, 5)
        self.per_class.setHorizontalHeaderLabels(["Class", "Precision", "Recall", "F1", "Support"])
        self.per_class.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.per_class.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.per_class.verticalHeader().setVisible(False)
        self.per_class.setEditTriggers(QAbstractItemView.NoEditTriggers)
        top.addWidget(self.per_class)
        cmw = QWidget()
        cml = QVBoxLayout(cmw)
        cml.setContentsMargins(0, 0, 0, 0)
        cml.addWidget(
            QLabel("Confusion matrix (rows: true class, columns: predicted). Click a cell to see its images.")
        )
        self.cm = QTableWidget(0, 0)
        self.cm.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.cm.setSelectionMode(QAbstractItemView.SingleSelection)
        self.cm.cellClicked.connect(self.show_cell)
        self.cm.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        cml.addWidget(self.cm)
        top.addWidget(cmw)
        top.setSizes([380, 420])
        return top

    def _build_galleries(self, loader: ThumbnailLoader) -> QTabWidget:
        """The selected cell's images, the mistakes, the confidence view and Where it looked."""
        self.galleries = QTabWidget()
        cell_w = QWidget()
        cl = QVBoxLayout(cell_w)
        cl.setContentsMargins(0, 0, 0, 0)
        self.cell_label = QLabel("Click a cell of the confusion matrix.")
        cl.addWidget(self.cell_label)
        self.cell_grid = ImageGrid(loader)
        cl.addWidget(self.cell_grid)
        self.galleries.addTab(cell_w, "Images in the selected cell")
        mis_w = QWidget()
        ml = QVBoxLayout(mis_w)
        ml.setContentsMargins(0, 0, 0, 0)
        mh = QHBoxLayout()
        self.mistakes_label = QLabel("")
        self.reveal_btn = QPushButton("Reveal in file manager")
        self.reveal_btn.setToolTip("Confident mistakes are often mislabelled files: check them where they live")
        self.reveal_btn.clicked.connect(self._reveal)
        self.heatmap_btn = QPushButton("Where it looked…")
        self.heatmap_btn.setToolTip(
            "The selected image with a heatmap of what drove the prediction (computed in the "
            "background); works in the cell images too"
        )
        self.heatmap_btn.clicked.connect(self._heatmap)
        mh.addWidget(self.mistakes_label, 1)
        mh.addWidget(self.reveal_btn)
        ml.addLayout(mh)
        self.mistakes = ImageGrid(loader)
        ml.addWidget(self.mistakes)
        self.galleries.addTab(mis_w, "Mistakes, most confident first")
        self.trust = TrustPanel()
        self.trust.threshold_saved.connect(self._save_threshold)
        self.galleries.addTab(self.trust, "Confidence")
        self.galleries.setCornerWidget(self.heatmap_btn)  # for the image selected in either gallery
        return self.galleries

    def _trained(self, res) -> None:
        self.refresh_runs()
        self.show_result(res)

    # ---------------------------------------------------------------------------------------------- runs list
    def set_runs_dir(self, path: str) -> None:
        self.runs_dir = path
        self.refresh_runs()

    def refresh_runs(self) -> None:
        self.runs = list_runs(self.runs_dir) if self.runs_dir else []
        self.runs_table.blockSignals(True)
        self.runs_table.setRowCount(len(self.runs))
        for r, run in enumerate(self.runs):
            acc = run["val_accuracy"]
            secs = run["train_seconds"]
            vals = [
                run["created"].replace("T", " ")[:16],
                run["backbone"],
                run["mode"],
                f"{acc:.3f}" if isinstance(acc, (int, float)) else "-",
                duration(secs) if isinstance(secs, (int, float)) else "-",
            ]
            for c, v in enumerate(vals):
                item = QTableWidgetItem(v)
                item.setData(Qt.UserRole, run["path"])
                item.setToolTip(run["path"] + ("  (stopped early by the user)" if run["status"] == "cancelled" else ""))
                self.runs_table.setItem(r, c, item)
        self.runs_table.blockSignals(False)

    def select_run(self, run_dir: str) -> None:
        """Select ``run_dir`` in the runs list (its curve is plotted) and show it; raises EngineError when it is not a
        complete run."""
        for r in range(self.runs_table.rowCount()):
            if self.runs_table.item(r, 0).data(Qt.UserRole) == run_dir:
                self.runs_table.selectRow(r)  # -> _runs_selected: overlay and open_run
                break
        if self.run_dir != run_dir:  # not in the list (another folder): show it anyway
            self.open_run(run_dir)

    def show_result(self, res) -> None:
        """Show a run that has just finished from what the job handed back (``engine.train.fit.FitResult``: its
        figures, history and predictions); the folder is not read again."""
        self.runs_table.blockSignals(True)
        self.runs_table.clearSelection()
        for r in range(self.runs_table.rowCount()):
            if self.runs_table.item(r, 0).data(Qt.UserRole) == res.run_dir:
                self.runs_table.selectRow(r)
                break
        self.runs_table.blockSignals(False)
        self.overlay([res.run_dir], {res.run_dir: (res.history, res.meta)})
        self._show(res.run_dir, res.meta, res.metrics, res.predictions)

    def _runs_selected(self) -> None:
        rows = sorted({i.row() for i in self.runs_table.selectedIndexes()})
        paths = [self.runs_table.item(r, 0).data(Qt.UserRole) for r in rows]
        self.overlay(paths)
        if len(paths) == 1 and paths[0] != self.run_dir:
            self.open_run(paths[0])

    def overlay(self, paths: list[str], known: dict | None = None) -> int:
        """Overlay the validation-accuracy curves of several runs; returns how many curves were drawn. ``known``:
        ``{path: (history, model.json)}`` of runs already in memory (the one just trained)."""
        self.compare.clear()
        n = 0
        for i, p in enumerate(paths):
            hist, meta = (known or {}).get(p, (None, None))
            hist = read_history(p) if hist is None else hist
            if not hist:
                continue
            try:
                meta = meta or read_json(os.path.join(p, "model.json"))
                name = f"{meta.get('backbone')} {meta.get('mode')}"
            except EngineError:
                name = os.path.basename(p)
            xs, ys = overlay_points(hist)
            self.compare.plot(xs, ys, pen=pg.mkPen(PALETTE[i % len(PALETTE)], width=2), connect="finite", name=name)
            n += 1
        return n

    # ---------------------------------------------------------------------------------------------- one run
    def open_run(self, run_dir: str) -> None:
        """Show a saved run. Raises EngineError when the folder is not a complete run."""
        meta = read_json(os.path.join(run_dir, "model.json"))
        self._show(run_dir, meta, read_metrics(run_dir), read_predictions(run_dir))

    def _show(self, run_dir: str, meta: dict, metrics: dict, predictions: list[dict]) -> None:
        self.run_dir = run_dir
        self.classes = list(meta.get("classes", []))
        self.metrics = metrics
        self.preds = [p for p in predictions if p.get("split") == "val"]
        self.summary.setText("<br>".join(summary_lines(run_dir, meta, metrics)))
        pc = metrics.get("per_class", {})
        self.per_class.setRowCount(len(self.classes))
        for r, c in enumerate(self.classes):
            v = pc.get(c, {})
            for col, val in enumerate([c, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]):
                text = (
                    val
                    if isinstance(val, str)
                    else ("-" if val is None else (str(val) if isinstance(val, int) else f"{val:.3f}"))
                )
                self.per_class.setItem(r, col, QTableWidgetItem(text))
        cm = metrics.get("confusion_matrix") or []
        k = len(self.classes)
        self.cm.clear()
        self.cm.setRowCount(k)
        self.cm.setColumnCount(k)
        self.cm.setHorizontalHeaderLabels([f"→ {c}" for c in self.classes])
        self.cm.setVerticalHeaderLabels(self.classes)
        for i in range(k):
            row_total = sum(cm[i]) if i < len(cm) else 0
            for j in range(k):
                v = cm[i][j] if i < len(cm) and j < len(cm[i]) else 0
                frac = v / row_total if row_total else 0.0
                item = QTableWidgetItem(str(v))
                item.setTextAlignment(Qt.AlignCenter)
                base = (46, 125, 50) if i == j else (198, 40, 40)
                alpha = int(30 + 200 * frac) if v else 0
                item.setBackground(QBrush(QColor(*base, alpha)))
                if frac > 0.6:
                    item.setForeground(QBrush(QColor("white")))
                item.setToolTip(f"true {self.classes[i]}, predicted {self.classes[j]}: {v} ({100 * frac:.0f}% of row)")
                self.cm.setItem(i, j, item)
        self.cell_grid.set_items([])
        self.cell_label.setText("Click a cell of the confusion matrix.")
        self._fill_mistakes()
        self.meta = meta
        self.trust.show_run(metrics, meta)
        self.session.set_run(run_dir, meta.get("data") or "")

    def show_cell(self, i: int, j: int) -> None:
        t, p = self.classes[i], self.classes[j]
        rows = [r for r in self.preds if r["label"] == t and r["prediction"] == p]
        rows.sort(key=lambda r: -float(r["confidence"]))
        self.cell_grid.set_items(
            [
                (
                    r["path"],
                    f"{float(r['confidence']):.0%}",
                    f"{r['path']}\ntrue: {t}\npredicted: {p} ({float(r['confidence']):.1%})",
                )
                for r in rows
            ]
        )
        self.cell_label.setText(
            f"True <b>{t}</b>, predicted <b>{p}</b>: {len(rows)} image(s). Double-click to open one."
        )
        self.galleries.setCurrentIndex(0)

    def _fill_mistakes(self) -> None:
        wrong = [r for r in self.preds if r["label"] != r["prediction"]]
        wrong.sort(key=lambda r: -float(r["confidence"]))
        self.mistakes.set_items(
            [
                (
                    r["path"],
                    f"{r['prediction']} {float(r['confidence']):.0%}",
                    f"{r['path']}\nlabelled: {r['label']}\npredicted: {r['prediction']} ({float(r['confidence']):.1%})",
                )
                for r in wrong
            ]
        )
        self.mistakes_label.setText(
            f"{len(wrong)} {'labelled' if self.metrics.get('validation') else 'validation'} image(s) misclassified"
            + (" (each judged by a head that never saw it)" if self.metrics.get("validation") else "")
            + ". Confident mistakes are often mislabelled files."
        )

    def data_folder(self) -> str | None:
        """The image folder the open run was trained on."""
        return (getattr(self, "meta", None) or {}).get("data")

    def selected_image(self) -> str | None:
        """The image selected in the gallery on show (cell images or mistakes)."""
        grid = self.cell_grid if self.galleries.currentIndex() == 0 else self.mistakes
        paths = grid.selected_paths()
        return paths[0] if paths else None

    def _heatmap(self) -> None:
        path = self.selected_image()
        if self.run_dir and path:
            self.heatmaps.explain(self.run_dir, path)

    def _save_threshold(self, target: float) -> None:
        try:
            unsure = set_unsure_threshold(self.run_dir, target)
        except EngineError as exc:
            self.trust.target_text.setText(str(exc))
            return
        self.meta["unsure"] = unsure
        self.trust.target_text.setText(self.trust.target_text.text() + " — saved with the model")
        self.session.set_run(self.run_dir, self.data_folder() or "")  # Predict reloads the model's thresholds

    def _reveal(self) -> None:
        paths = self.mistakes.selected_paths()
        if paths:
            reveal_in_file_manager(paths[0])


def overlay_points(hist: list[dict]) -> tuple[list[float], list[float]]:
    """A run's validation accuracy per history row; feature extraction's rows are its head's strengths for each
    feature set in turn (history.csv's ``depths`` column), and a NaN point between the sets breaks the line (as the
    Training tab's plots do), so the second set's first strength does not read as a dip of one curve."""
    xs: list[float] = []
    ys: list[float] = []
    last = None
    for h in hist:
        if xs and h.get("depths") is not None and h.get("depths") != last:
            xs.append(xs[-1])
            ys.append(float("nan"))
        last = h.get("depths")
        xs.append(float(h["epoch"]))
        ys.append(float(h["val_accuracy"]))
    return xs, ys
