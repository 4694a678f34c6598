"""Cross-fitting: every labelled image trains the final head, and every one is judged by a head that never saw it.

A folder without a validation folder used to lose 20% of its labels to validation: the final model never learned
from them. Here the labelled (non-test) images are cut into k folds by the same kind of per-image draw as the split
(engine/data/splits.py: the seed, the class and the image's own path decide, so excluding or adding an image moves
no other image). k heads each train on all folds but one and predict that one; those out-of-fold predictions choose
the epoch (early stopping on their summed loss), fit the temperature and the "not sure" threshold, and give every
figure the app reports. A final head trains on every image for the same number of steps and is the one saved.

All heads train in lock-step on one shared sequence of batches: each step draws one batch of images (with one
dropout mask per image) and every head learns from the images of it that are its own (a fold's head skips its fold's
images; they weigh nothing in its loss). So the batch is gathered, masked and multiplied once for all heads: one
matrix product gives every head's logits, one more every head's gradients. On flowers (4,317 images, 2-core CPU) 20
epochs of six heads took 1.2-1.7 s against 1.0-1.1 s for one head alone. The arithmetic per head is
``head.train_linear_head``'s: dropout on the features, (class-weighted) cross-entropy averaged over the head's own
images in the batch, AdamW with cosine decay; only the dropout masks differ: each image of a batch takes one of
4,096 masks drawn once per job (drawing fresh random numbers for every feature took more time than the heads'
arithmetic).

The dataset doctor's out-of-sample label check uses this same function, with its own short recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.data.splits import _draw
from engine.events import BatchMetrics, CancelToken, EpochMetrics, Throttle
from engine.meters import EarlyStopping
from engine.train.head import HeadAdamW, cross_entropy, init_linear
from engine.trust.calibration import softmax

K_FOLDS = 5
MASKS = 4096  # dropout masks drawn once per job


def fold_ids(labels, keys, seed: int, k: int = K_FOLDS) -> np.ndarray:
    """Each image's fold in 0..k-1, fixed by the seed, its class and its key (its path inside its class folder)."""
    return np.array([min(k - 1, int(_draw(seed, int(y), "fold|" + key) * k)) for y, key in zip(labels, keys)])


@dataclass
class CrossFit:
    oof_logits: np.ndarray  # (n, C): each image's logits from the head of its fold, which never saw it
    heads: dict[str, dict[str, np.ndarray]]  # the best epoch's extra heads by name ("final", "probe", ...)
    best_epoch: int
    history: list[dict]
    folds: np.ndarray
    k: int


def _gradients(x, yy, weights, W, B, H: int, C: int):
    """One lock-step batch: every head's logits ``(batch, H, C)``, per-image losses ``(batch, H)`` and the gradients
    for ``[W, B]``. ``weights`` (batch, H): each image's share of each head's mean loss (0: not that head's image)."""
    out = (x @ W.T).reshape(len(x), H, C) + B
    p = softmax(out.reshape(-1, C)).reshape(out.shape)
    rows = np.arange(len(x))
    ce = -np.log(np.maximum(p[rows, :, yy], 1e-30))
    p[rows, :, yy] -= 1.0  # d(mean CE)/d(logits) = (softmax - one_hot) / batch
    p *= weights[..., None]
    return out, ce, [p.reshape(len(x), -1).T @ x, p.sum(0)]


def _out_of_fold(X: np.ndarray, W: np.ndarray, B: np.ndarray, held: list[np.ndarray], C: int) -> np.ndarray:
    """Each image's logits from the head of its fold (fold f's head: rows f*C .. (f+1)*C of W)."""
    oof = np.zeros((len(X), C), np.float32)
    for f, rows in enumerate(held):
        if len(rows):
            oof[rows] = X[rows] @ W[f * C : (f + 1) * C].T + B[f]
    return oof


class _LockStep:
    """Every head's weights, optimiser and dropout bank; :meth:`epoch` makes one pass of shared batches."""

    def __init__(self, X, y, own, C, batch_size, epochs, lr, weight_decay, dropout, class_weight, seed):
        self.X, self.y, self.own, self.C = X, y, own, C
        self.H = own.shape[1]
        self.rng = np.random.default_rng(seed)
        dim = X.shape[1]
        self.W = np.empty((self.H * C, dim), np.float32)  # head h's rows: h*C .. (h+1)*C
        self.B = np.empty((self.H, C), np.float32)
        for h in range(self.H):  # every head starts as nn.Linear would
            self.W[h * C : (h + 1) * C], self.B[h] = init_linear(dim, C, self.rng)
        self.bs = min(batch_size, len(X))
        self.steps = math.ceil(len(X) / self.bs)
        self.opt = HeadAdamW([self.W, self.B], lr, weight_decay, total_steps=epochs * self.steps)
        keep = 1.0 - dropout
        self.bank = (self.rng.random((MASKS, dim), dtype=np.float32) < keep) / np.float32(keep) if dropout > 0 else None
        self.cw = np.ones(C, np.float32) if class_weight is None else class_weight.astype(np.float32)
        self.report = 0
        self.throttle = Throttle(0.2)  # batch events at most 5 a second

    def epoch(self, epoch: int, cancel: CancelToken | None, on_batch) -> tuple[float, float]:
        """One pass; returns the reported head's training loss and accuracy over its own images."""
        perm = self.rng.permutation(len(self.X))
        r = self.report
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for step in range(self.steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            idx = perm[step * self.bs : (step + 1) * self.bs]
            x, yy = self.X[idx], self.y[idx]
            if self.bank is not None:
                x = x * self.bank[self.rng.integers(0, MASKS, len(idx))]
            sw = self.own[idx] * self.cw[yy][:, None]  # (batch, H): each head's mean over its own images
            sw = sw / np.maximum(sw.sum(0, keepdims=True), 1e-12)
            out, ce, grads = _gradients(x, yy, sw, self.W, self.B, self.H, self.C)
            self.opt.step(grads)
            mine = self.own[idx, r]
            tot_loss += float((sw[:, r] * ce[:, r]).sum()) * int(mine.sum())
            tot_correct += int(((out[:, r].argmax(1) == yy) & mine).sum())
            seen += int(mine.sum())
            if on_batch is not None and self.throttle.ready():
                on_batch(
                    BatchMetrics(epoch, step + 1, self.steps, tot_loss / max(seen, 1), tot_correct / max(seen, 1), 0, 0)
                )
        return tot_loss / max(seen, 1), tot_correct / max(seen, 1)


def cross_fit(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    num_classes: int,
    *,
    k: int = K_FOLDS,
    extra: dict[str, np.ndarray] | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    seed: int,
    dropout: float = 0.2,
    class_weight: np.ndarray | None = None,
    cancel: CancelToken | None = None,
    on_batch: Callable[[BatchMetrics], None] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> CrossFit:
    """Train k fold heads (and the ``extra`` heads, each on the images its boolean mask selects: ``{"final": all}``
    for the model to save) in lock-step; keep the epoch whose out-of-fold loss is lowest.

    The epoch metrics report the first extra head's training loss (the final head's) and the out-of-fold loss and
    accuracy as the validation figures. Raises :class:`Cancelled` when ``cancel`` is set (checked every step)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    extra = extra or {}
    own = np.stack([folds != f for f in range(k)] + [np.asarray(m, bool) for m in extra.values()], 1)  # (n, H)
    held = [np.flatnonzero(folds == f) for f in range(k)]
    heads = _LockStep(X, y, own, num_classes, batch_size, epochs, lr, weight_decay, dropout, class_weight, seed)
    heads.report = k if extra else 0  # whose training loss the epochs report: the first extra head's (the final one)
    stopping = EarlyStopping(patience)
    best = None
    history: list[dict] = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss, acc = heads.epoch(epoch, cancel, on_batch)
        oof = _out_of_fold(X, heads.W, heads.B, held, num_classes)
        vloss, _ = cross_entropy(oof, y, class_weight)
        vacc = float((oof.argmax(1) == y).mean())
        improved = stopping.update(vloss, epoch)
        if improved:
            best = (oof, heads.W.copy(), heads.B.copy())
        secs = time.perf_counter() - t0
        m = EpochMetrics(
            epoch, epochs, loss, acc, vloss, vacc, heads.opt.lr, secs, len(X) / secs if secs else 0.0, improved
        )
        history.append(m.as_row())
        if on_epoch is not None:
            on_epoch(m)
        if stopping.stop(True, on_log):
            break
    oof, Wb, Bb = best
    C = num_classes
    heads = {
        name: {"weight": Wb[(k + i) * C : (k + i + 1) * C].copy(), "bias": Bb[k + i].copy()}
        for i, name in enumerate(extra)
    }
    return CrossFit(oof, heads, stopping.best_epoch, history, folds, k)
