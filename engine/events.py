"""Progress events, the callbacks protocol and the cancel token.

Everything that crosses from the engine to a caller (the CLI, the GUI worker, a test) is a frozen dataclass of
plain Python numbers and strings: safe to send through a Qt signal, to print, or to write to CSV.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


class Phase:
    """Names of the phases a job goes through (plain strings so they print and pickle)."""

    SCANNING = "scanning"
    DECODING = "decoding"
    EMBEDDING = "embedding"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    PREDICTING = "predicting"
    EXPORTING = "exporting"
    CHECKING = "checking"


@dataclass(frozen=True)
class Progress:
    """Work done in the current phase. ``total`` is 0 when unknown."""

    phase: str
    done: int
    total: int
    images_per_s: float = 0.0
    eta_s: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class BatchMetrics:
    """One training step: lets plots move while an epoch is still running."""

    epoch: int
    step: int
    steps: int
    loss: float
    accuracy: float
    images_per_s: float
    eta_s: float


@dataclass(frozen=True)
class EpochMetrics:
    """One finished epoch (also a row of history.csv)."""

    epoch: int
    epochs: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    images_per_s: float
    is_best: bool
    # --mode auto: which half this epoch belongs to, and seconds since the automatic run started (the race plot)
    strategy: str = ""
    elapsed: float = 0.0
    # validation loss after the best temperature for this epoch's logits (fine-tuning; NaN where not computed)
    val_loss_calibrated: float = float("nan")
    # what this row is when it is not an epoch: feature extraction's head solved at one regularisation strength
    # ("final features, C 0.01"); its validation figures are out of fold
    label: str = ""

    # A head on cached features runs many cheap epochs (100 by default): logs show every 10th of those.
    MANY_EPOCHS = 20

    @property
    def many_cheap_epochs(self) -> bool:
        """A feature-extraction head's epochs (milliseconds each): no images/s worth showing per epoch."""
        return self.epochs > self.MANY_EPOCHS

    @property
    def worth_logging(self) -> bool:
        """Whether a log (terminal, the window's log panel) shows this epoch: all of a few, every 10th of many."""
        return not self.many_cheap_epochs or self.epoch == 1 or self.epoch % 10 == 0 or bool(self.label)

    def as_row(self) -> dict:
        return {
            "epoch": self.epoch,
            "train_loss": round(self.train_loss, 6),
            "train_accuracy": round(self.train_accuracy, 6),
            "val_loss": round(self.val_loss, 6),
            "val_accuracy": round(self.val_accuracy, 6),
            "lr": self.lr,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
            "is_best": int(self.is_best),
        }


@dataclass(frozen=True)
class PredictionRow:
    """One predicted file (the GUI streams these into its table).

    ``status``: ``ok``; ``unsure`` (calibrated confidence below the model's threshold: the best guess is kept);
    ``unfamiliar`` (unlike every training image, whatever the confidence); ``error`` (not readable). When several
    apply, the first of error, unfamiliar, unsure.
    """

    path: str
    prediction: str
    confidence: float
    probabilities: tuple[float, ...] = field(default_factory=tuple)
    error: str = ""
    status: str = "ok"


class Callbacks:
    """Hooks a job calls; every method is a no-op by default (the Lightning convention).

    Jobs call them from the thread they run in. Implementations must be quick: the GUI adapter only re-emits them
    as queued Qt signals.
    """

    def on_log(self, message: str) -> None:
        """A human-readable line (what the CLI prints, what the GUI log panel shows)."""

    def on_progress(self, progress: Progress) -> None:
        """Work done within a phase (scanning, decoding, embedding, evaluating, predicting)."""

    def on_train_batch_end(self, metrics: BatchMetrics) -> None:
        """After each optimiser step."""

    def on_train_epoch_end(self, metrics: EpochMetrics) -> None:
        """After each epoch, once validation is done."""

    def on_predictions(self, rows: list[PredictionRow]) -> None:
        """A chunk of prediction rows, in file order."""


class CancelToken:
    """Cooperative cancel: jobs check it between batches, finish the batch, keep what is worth keeping."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def early_stop_reason(self) -> str:
        """Why the job was stopped early on purpose, not by the user (automatic mode's budget token); "" here."""
        return ""


class Cancelled(Exception):
    """Raised inside a job when its token was cancelled; jobs turn it into a result with ``cancelled=True``."""


class EngineError(Exception):
    """An error a user can act on: the message says what went wrong and what to change."""


class Throttle:
    """``ready()`` is true at most once per ``interval`` seconds (per-batch callbacks without flooding the GUI)."""

    def __init__(self, interval: float) -> None:
        self.interval, self.last = interval, 0.0

    def ready(self) -> bool:
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False
