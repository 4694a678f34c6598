"""What the Label tab says of the model so far: the plot of estimated accuracy (on the random checks, with its 95%
range) against the number of labels, so the user sees when more labels stop paying, and the note beside it."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg

from engine.labelling.session import MIN_CHECKS


class EstimatePlot(pg.PlotWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent, title="Estimated accuracy (random checks, 95% range)")
        self.points: list[tuple[int, float, float, float]] = []  # (labels, estimated accuracy, its 95% range)
        self.setLabel("bottom", "labels")
        self.getAxis("bottom").enableAutoSIPrefix(False)  # (an empty plot read "labels (x0.001)")
        self.getAxis("left").setWidth(40)
        self.setYRange(0, 1)
        self.setXRange(0, 50)
        self.note = pg.TextItem("", color=(90, 90, 90), anchor=(0.5, 0.5))  # what it waits for, until the first point
        self.addItem(self.note)
        self.line = self.plot(pen=pg.mkPen((31, 119, 180), width=2), symbol="o", symbolSize=6)
        self.ranges = pg.ErrorBarItem(x=np.zeros(0), y=np.zeros(0), pen=pg.mkPen((31, 119, 180, 120)), beam=0.6)
        self.addItem(self.ranges)

    def reset(self) -> None:
        """Another folder: the last one's points are not this one's."""
        self.points = []
        self.line.setData([], [])
        self.note.setText("")
        self.ranges.setData(x=np.zeros(0), y=np.zeros(0), top=np.zeros(0), bottom=np.zeros(0))

    def add_round(self, s) -> None:
        """A round's :class:`engine.labelling.session.Suggestions`: its estimate becomes the point at its number of
        labels (replacing an earlier one there), or the note says how many checks the first point waits for."""
        if s.estimate is not None:
            point = (s.n_labelled, s.estimate, *s.estimate_range)
            self.points = sorted([pt for pt in self.points if pt[0] != s.n_labelled] + [point])
            x, v, lo, hi = (np.array(c, np.float64) for c in zip(*self.points))
            self.line.setData(x, v)
            self.ranges.setData(x=x, y=v, top=hi - v, bottom=v - lo)
        right = max(10, s.n_labelled, max((pt[0] for pt in self.points), default=0)) * 1.05
        self.setXRange(0, right, padding=0)
        self.setYRange(0, 1.02, padding=0)
        waiting = f"The estimate starts at {MIN_CHECKS} random checks ({s.checks} labelled so far)"
        self.note.setText("" if self.points else waiting)
        self.note.setPos(right / 2, 0.5)


def estimate_note(s) -> str:
    """The note under the plot for a round's :class:`engine.labelling.session.Suggestions` (None: no round yet):
    the estimate and what it rests on, and how often suggestions as sure as Accept's level were right."""
    if s is None or s.probs is None:
        return "Suggestions come once two classes have labels."
    a = s.accept
    right = a.get("right_so_far")
    judged = (
        f"Of your labelled images, the {a['judged']} the model was at least {a['level']:.0%} sure of "
        f"(each judged by a head that never saw it) were right {right:.0%} of the time (so, allowing for chance, "
        f"at least {a['right_at_least']:.0%})."
        if right is not None
        else "No labelled image was judged that sure yet: how often such suggestions are right is unknown."
    )
    why = "one image in ten asked is drawn at random, so these are a fair sample of the folder"
    est = (
        f"Estimated accuracy now: {s.estimate:.0%} (95% range {s.estimate_range[0]:.0%}-"
        f"{s.estimate_range[1]:.0%}), from the {s.checks} random checks among your {s.n_labelled} labels ({why}). "
        if s.estimate is not None
        else f"Estimated accuracy: once {MIN_CHECKS} random checks are labelled ({s.checks} so far; {why}). "
    )
    return est + judged + " Accepted labels are kept apart from yours in the labels file."
