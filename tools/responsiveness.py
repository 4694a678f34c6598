"""Measure the GUI's worst event-loop stall while real jobs run (10 ms QTimer, longest gap), under a real event loop.

    xvfb-run -a -s "-screen 0 1280x800x24" python tools/responsiveness.py TRAIN_DATA PREDICT_FOLDER

Trains feature extraction (empty embedding cache), fine-tuning (2 epochs) and feature extraction again (every
embedding from the cache) on TRAIN_DATA, then predicts PREDICT_FOLDER, and prints the worst stall of each job plus
the number of rows streamed before the job ended. TS_MODES=feature-extraction runs only the two feature extractions;
TS_MODES=label opens TRAIN_DATA as an unsorted pile in the Label tab and answers images as a fast user would.

TS_STALL_TRACE=MS: a watchdog thread samples the GUI thread's and the job thread's Python stacks whenever the event
loop's heartbeat is more than MS late, and prints where each stall over MS was spent (to find what causes outliers).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

import gui  # noqa: F401  (sets the GUI's OpenMP policy before torch loads)


class StallTracer:
    """Heartbeat on a 5 ms QTimer; a daemon thread samples stacks while the heartbeat is late."""

    def __init__(self, late_ms: float) -> None:
        import threading

        self.late = late_ms / 1000.0
        self.beat = time.perf_counter()
        self.stalls: list[tuple[float, list[str]]] = []
        self.gui_id = threading.get_ident()
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.timer.start()
        self.samples: list[str] = []
        self.stop = False
        self.gcs: list[tuple[float, str]] = []  # full (generation 2) garbage collections: ms, thread
        self._gc_start = 0.0
        import gc

        gc.callbacks.append(self._gc)
        threading.Thread(target=self._watch, daemon=True).start()

    def _gc(self, phase: str, info: dict) -> None:
        import threading

        if phase == "start":
            self._gc_start = time.perf_counter()
        elif info["generation"] == 2:
            self.gcs.append(((time.perf_counter() - self._gc_start) * 1000, threading.current_thread().name))

    def _tick(self) -> None:
        now = time.perf_counter()
        gap = now - self.beat
        if self.samples and gap > self.late:
            self.stalls.append((gap * 1000, self.samples))
        self.samples = []
        self.beat = now

    def _watch(self) -> None:
        import traceback

        while not self.stop:
            time.sleep(0.004)
            if time.perf_counter() - self.beat < self.late:
                continue
            frames = sys._current_frames()
            parts = []
            for tid, frame in frames.items():
                stack = traceback.extract_stack(frame)[-6:]
                who = "GUI" if tid == self.gui_id else f"t{tid % 10000}"
                parts.append(
                    who
                    + ": "
                    + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack))
                )
            self.samples.append("\n    ".join(p for p in parts if "_watch" not in p))

    def report(self, label: str) -> None:
        from collections import Counter

        print(
            f"--- {label}: {len(self.stalls)} stalls over {self.late * 1000:.0f} ms; full garbage collections: "
            + (", ".join(f"{ms:.0f} ms ({who})" for ms, who in self.gcs) or "none")
        )
        self.gcs = []
        for gap, samples in sorted(self.stalls, reverse=True)[:6]:
            print(f"  {gap:.0f} ms, {len(samples)} samples; most common:")
            for text, n in Counter(samples).most_common(2):
                print(f"   [{n}x]\n    {text}")
        self.stalls = []


def wait(cond, timeout=1800.0):
    from gui.jobs.eventloop import wait_until

    wait_until(cond, timeout)


def label_session(w, folder: str, stall, tracer=None, answers: int = 60) -> int:
    """TRAIN_DATA opened as a pile in the Label tab; each image answered with its folder's name, one every 150 ms
    (a fast user on number keys), while the background rounds retrain every 5 labels. Prints the worst stall of the
    opening (embedding) and of the answering, and how long the rounds took."""
    t = w.label_tab
    os.environ["TRANSFER_STUDIO_DATA"] = tempfile.mkdtemp(prefix="ts-resp-labels-")  # (labels file: not the user's)
    t0 = time.perf_counter()
    w.tabs.setCurrentWidget(t)  # the first switch lays out the tab and its plot: its own cost, as for training
    print(f"first switch to the label tab: {(time.perf_counter() - t0) * 1000:.0f} ms")
    w.tabs.setCurrentIndex(0)
    t0 = time.perf_counter()
    w.start_labelling(folder)  # (called here, not from the event loop: its own cost too)
    print(f"starting to open the pile (the GUI thread's part): {(time.perf_counter() - t0) * 1000:.0f} ms")
    t0 = time.time()
    stall.start()
    wait(lambda: t.pile is not None and bool(t.batch) and not t.round_running)
    print(f"label: opened {len(t.pile.paths)} images in {time.time() - t0:.1f} s, worst stall {stall.stop():.0f} ms")
    done = []

    def answer() -> None:
        todo = [p for p in t.batch if p not in t.labels]
        if todo and len(done) < answers:
            t.assign(os.path.basename(os.path.dirname(todo[0])), [todo[0]])
            done.append(todo[0])

    timer = QTimer()
    timer.setInterval(150)
    timer.timeout.connect(answer)
    stall.start()
    t0 = time.time()
    timer.start()
    wait(lambda: len(done) >= answers or time.time() - t0 > 300)
    timer.stop()
    wait(lambda: not t.round_running and not t.round_pending)
    print(
        f"label: {len(done)} answers in {time.time() - t0:.1f} s, worst GUI stall while answering "
        f"(rounds retraining in the background): {stall.stop():.0f} ms; estimate {(t.plot.points or [None])[-1]}"
    )
    if tracer:
        tracer.report("label")
    w.close()
    return 0


def main() -> int:
    train, predict = map(os.path.abspath, sys.argv[1:3])
    for d in (train, predict):
        if not os.path.isdir(d):
            print(f"skipped: {d} not found")
            return 0
    tmp = tempfile.mkdtemp(prefix="ts-resp-")
    # TS_CACHE=DIR: start from an embedding cache filled beforehand (e.g. by `python -m engine train` on a big folder)
    os.environ["TRANSFER_STUDIO_CACHE"] = os.environ.get("TS_CACHE") or os.path.join(tmp, "cache")
    app = QApplication(sys.argv[:1])  # noqa: F841 (kept alive for the whole run)
    from gui.jobs.eventloop import StallMeter
    from gui.selftest import backbones_listed, scratch_window

    w = scratch_window(tmp)
    tracer = StallTracer(float(os.environ["TS_STALL_TRACE"])) if os.environ.get("TS_STALL_TRACE") else None
    wait(lambda: backbones_listed(w))
    w.scan_folder(train)
    wait(lambda: not w.session.scanning)
    stall = StallMeter()
    if os.environ.get("TS_MODES") == "label":  # the Label tab: a user answering one image every 150 ms
        return label_session(w, train, stall, tracer)
    if os.environ.get("TS_SWITCH"):  # experiment: another GIL switch interval than the app's
        sys.setswitchinterval(float(os.environ["TS_SWITCH"]))
    # the last: feature extraction again, all embeddings from the cache (almost all Python on the job thread)
    modes = (("feature-extraction", 0), ("fine-tuning", 2), ("feature-extraction", 0))
    if os.environ.get("TS_MODES"):  # e.g. TS_MODES=feature-extraction,predict
        modes = tuple(m for m in modes if m[0] in os.environ["TS_MODES"].split(","))
    for i, (mode, epochs) in enumerate(() if os.environ.get("TS_PREDICT_ONLY") else modes):
        w.model_tab.set_mode(mode)
        w.training_tab.form.epochs.setValue(epochs)
        if i == 0:
            t0 = time.perf_counter()
            w.tabs.setCurrentWidget(w.training_tab)  # the first switch lays out the plots: its own cost
            print(f"first switch to the training tab: {(time.perf_counter() - t0) * 1000:.0f} ms")
            w.tabs.setCurrentIndex(0)
        t0 = time.time()
        stall.start()
        w.start_training()
        scroller = None
        if os.environ.get("TS_SCROLL_GRID"):  # a user looking through the dataset's thumbnails while it trains
            w.tabs.setCurrentWidget(w.dataset_tab)
            bar = w.dataset_tab.grid.verticalScrollBar()
            scroller = QTimer()
            scroller.setInterval(250)
            scroller.timeout.connect(
                lambda bar=bar: bar.setValue(0 if bar.value() >= bar.maximum() else bar.value() + bar.pageStep())
            )
            scroller.start()
        wait(lambda: not w.busy())
        if scroller:
            scroller.stop()
        wait(lambda: w.last_result is not None)
        label = mode + (" (cached)" if mode in [m for m, _ in modes[:i]] else "")
        print(f"{label}: {time.time() - t0:.1f} s, worst GUI stall during the job: {stall.stop():.0f} ms")
        if tracer:
            tracer.report(label)
        w.session.last_result = None
    if os.environ.get("TS_PREDICT_ONLY"):
        from engine import TrainConfig, fit

        res = fit(TrainConfig(data=train, out=os.path.join(tmp, "runs", "fe"), epochs=5))
        w.open_run(res.run_dir)
    if "predict" not in os.environ.get("TS_MODES", "predict"):
        w.close()
        return 0
    w.tabs.setCurrentWidget(w.predict_tab)
    streamed = []
    if tracer:
        tracer.stalls = []
    t0 = time.time()
    stall.start()
    w.predict_tab.top_k.setValue(3)
    w.predict_tab.folder.setText(predict)
    w.predict_tab.request_prediction()
    timer = QTimer()
    timer.setInterval(500)
    timer.timeout.connect(lambda: streamed.append(w.predict_tab.model.rowCount()))
    timer.start()
    wait(lambda: not w.busy())
    timer.stop()
    n = w.predict_tab.model.rowCount()
    print(
        f"predict: {n} files in {time.time() - t0:.1f} s, worst GUI stall {stall.stop():.0f} ms; rows visible at "
        f"0.5 s intervals: {streamed[:3]} ... {streamed[-3:]}"
    )
    if tracer:
        tracer.report("predict")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
