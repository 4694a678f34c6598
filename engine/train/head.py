"""The linear head on fixed features, trained with NumPy alone.

Feature extraction trains nothing but this head, on embeddings that are usually already cached on disk, so a
second run needs no PyTorch at all: importing the CUDA build of torch alone took 2.7-4.1 s on the 2-core machine,
against about half a second for the rest of such a run. Fine-tuning uses the same trainer for its linear-probe
start (LP-FT). The head is an ``nn.Linear`` in the saved model; the arithmetic here is the same as PyTorch's: its
default initialisation, dropout on the features, cross-entropy, AdamW with cosine decay
(``tests/test_engine.py::test_numpy_head_matches_torch_training`` checks it step for step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.events import BatchMetrics, CancelToken, EpochMetrics, Throttle
from engine.meters import EarlyStopping
from engine.trust.calibration import softmax


class HeadAdamW:
    """AdamW (decoupled weight decay) with cosine decay to 0 over the planned steps, on NumPy arrays in place.

    The same update as ``torch.optim.AdamW`` stepped with ``CosineAnnealingLR(T_max=total_steps)``.
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float,
        weight_decay: float,
        total_steps: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        scales: list | None = None,
    ) -> None:
        """``scales``: per parameter, a factor on the learning rate (broadcast over it: rows of heads that learn
        at different rates); None: 1 everywhere."""
        self.params, self.base_lr, self.wd, self.total = params, lr, weight_decay, max(1, total_steps)
        self.scales = scales or [1.0] * len(params)
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0
        self.lr = lr

    def select(self, index: list) -> list[np.ndarray]:
        """Keep only the rows ``index[i]`` of parameter i (and of its moments and scale): heads that stopped
        learning leave the arithmetic. Returns the new parameter arrays."""
        self.params = [p[ix] for p, ix in zip(self.params, index)]
        self.m = [m[ix] for m, ix in zip(self.m, index)]
        self.v = [v[ix] for v, ix in zip(self.v, index)]
        self.scales = [s[ix] if isinstance(s, np.ndarray) else s for s, ix in zip(self.scales, index)]
        return self.params

    def step(self, grads: list[np.ndarray]) -> None:
        """One update, in place, spelled out with ``out=`` buffers: about a third of a cross-fitted epoch is this
        update (cProfile, flowers), and without the expressions' temporaries it ran 5-25% faster (21 heads x 10
        classes x 1,280 features: 1.18 against 1.24 ms a step)."""
        self.t += 1
        lr = self.lr
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v, s in zip(self.params, grads, self.m, self.v, self.scales):
            step = lr * s
            p *= 1 - step * self.wd
            m *= self.b1
            buf = np.multiply(g, 1 - self.b1, dtype=p.dtype)
            m += buf
            v *= self.b2
            np.multiply(g, g, out=buf)
            buf *= 1 - self.b2
            v += buf
            np.multiply(v, 1 / c2, out=buf)  # the denominator: sqrt(v / c2) + eps
            np.sqrt(buf, out=buf)
            buf += self.eps
            np.divide(m, buf, out=buf)
            buf *= step / c1 if np.ndim(step) == 0 else (step / c1).astype(p.dtype)
            p -= buf
        self.lr = 0.5 * self.base_lr * (1 + math.cos(math.pi * min(self.t, self.total) / self.total))


def init_linear(in_features: int, out_features: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``nn.Linear``'s default initialisation: weight and bias uniform in +-1/sqrt(in_features)."""
    bound = 1.0 / math.sqrt(in_features)
    w = rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32)
    b = rng.uniform(-bound, bound, out_features).astype(np.float32)
    return w, b


def cross_entropy(
    logits: np.ndarray, y: np.ndarray, class_weight: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy (weighted by class as PyTorch's ``weight=``: sum(w_y CE) / sum(w_y)) and the
    probabilities it came from."""
    p = softmax(logits.astype(np.float32, copy=True))
    ce = -np.log(np.maximum(p[np.arange(len(y)), y], 1e-30))
    if class_weight is None:
        return float(ce.mean()), p
    wy = class_weight[y]
    return float((wy * ce).sum() / wy.sum()), p


def loss_and_gradients(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, class_weight: np.ndarray | None = None
) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """Mean (class-weighted) cross-entropy of ``x @ w.T + b``, the logits, and the gradients for ``[w, b]``."""
    out = x @ w.T + b
    loss, g = cross_entropy(out, y, class_weight)
    g[np.arange(len(y)), y] -= 1.0  # d(mean CE)/d(logits) = (softmax - one_hot) / batch
    if class_weight is None:
        g /= len(y)
    else:
        wy = class_weight[y]
        g *= (wy / wy.sum())[:, None]
    return loss, out, [g.T @ x, g.sum(0)]


def centring(X: np.ndarray, centre: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The features less ``centre`` (None: their own mean), as float32, and the centre used.

    The heads train on centred features. The embeddings share a large common part (the mean embedding is 92% of
    the mean squared norm on the digits, 70% on hand signs, 32-51% on photos and clothing; Lite0) that dominates each
    weight's gradient, so (our reading) AdamW's steps on few labels go mostly into raising or lowering a class's score
    everywhere, the bias's job once the features are centred. Dropout is not the cause: with it off the gap stays
    (hands at 5 labels a class 0.575 -> 0.627, digits 0.489 -> 0.527). Centring is linear, so the saved head is the
    same ``nn.Linear``, the centre folded into its bias (:func:`fold_centre`). The rounds' trainer, random labels, 4
    seeds (docs/benchmarks.md): at 5 labels a class digits 0.469 -> 0.521, hands 0.575 -> 0.625, clothing 0.711 ->
    0.740, hymenoptera 0.690 -> 0.865; on every label digits 0.889 -> 0.906, the others level."""
    X = np.asarray(X, dtype=np.float32)
    c = X.mean(0) if centre is None else np.asarray(centre, dtype=np.float32)
    return np.ascontiguousarray(X - c), c


def fold_centre(head: dict[str, np.ndarray], centre: np.ndarray) -> dict[str, np.ndarray]:
    """A head trained on ``x - centre`` as one on ``x``: W (x - c) + b = W x + (b - W c)."""
    return {"weight": head["weight"], "bias": (head["bias"] - head["weight"] @ centre).astype(np.float32)}


def balanced_class_weights(
    y: np.ndarray, num_classes: int, ratio: float = 3.0, mode: str = "auto"
) -> np.ndarray | None:
    """Inverse-frequency class weights (mean 1) when asked ("on"), or by default ("auto") when the largest class
    has at least ``ratio`` times the images of the smallest; None: every image counts the same."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts[counts > 0]
    if mode == "off" or not len(present) or (mode == "auto" and present.max() < ratio * present.min()):
        return None
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return (w / w[counts > 0].mean()).astype(np.float32)


@dataclass
class HeadResult:
    head: dict[str, np.ndarray] | None  # the best epoch's {"weight": (C, D), "bias": (C,)}
    history: list[dict]
    best_epoch: int


def train_linear_head(
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xva: np.ndarray | None,
    yva: np.ndarray | None,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    seed: int,
    dropout: float = 0.2,
    cancel: CancelToken | None = None,
    class_weight: np.ndarray | None = None,
    on_batch: Callable[[BatchMetrics], None] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    centre: np.ndarray | None = None,
) -> HeadResult:
    """Minibatch AdamW on a linear head with early stopping on validation loss; keeps the best epoch.

    The head trains on the features less ``centre`` (None: the training images' mean; :func:`centring`) and is
    returned as a head on the features themselves. Raises :class:`Cancelled` when ``cancel`` is set (checked every
    step).
    """
    Xtr, c = centring(Xtr, centre)
    ytr = np.asarray(ytr, dtype=np.int64)
    has_val = Xva is not None and len(Xva) > 0
    if has_val:
        Xva, _ = centring(Xva, c)
        yva = np.asarray(yva, dtype=np.int64)
    rng = np.random.default_rng(seed)
    w, b = init_linear(Xtr.shape[1], num_classes, rng)
    n = len(Xtr)
    bs = min(batch_size, n)
    steps = math.ceil(n / bs)
    opt = HeadAdamW([w, b], lr, weight_decay, total_steps=epochs * steps)
    keep = 1.0 - dropout
    stopping = EarlyStopping(patience)
    best_head = None
    history: list[dict] = []
    throttle = Throttle(0.2)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        tot_loss, tot_correct = 0.0, 0
        for step in range(steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            idx = perm[step * bs : (step + 1) * bs]
            x, y = Xtr[idx], ytr[idx]
            if dropout > 0:
                x = x * ((rng.random(x.shape, dtype=np.float32) < keep) / np.float32(keep))
            loss, out, grads = loss_and_gradients(x, y, w, b, class_weight)
            opt.step(grads)
            tot_loss += loss * len(idx)
            tot_correct += int((out.argmax(1) == y).sum())
            if on_batch is not None and throttle.ready():
                seen = min((step + 1) * bs, n)
                on_batch(BatchMetrics(epoch, step + 1, steps, tot_loss / seen, tot_correct / seen, 0.0, 0.0))
        if has_val:
            lv = Xva @ w.T + b
            vloss, _ = cross_entropy(lv, yva, class_weight)
            vacc = float((lv.argmax(1) == yva).mean())
        else:
            vloss, vacc = tot_loss / n, float("nan")
        improved = stopping.update(vloss, epoch)
        if improved:
            best_head = {"weight": w.copy(), "bias": b.copy()}
        secs = time.perf_counter() - t0
        m = EpochMetrics(
            epoch, epochs, tot_loss / n, tot_correct / n, vloss, vacc, opt.lr, secs, n / secs if secs else 0.0, improved
        )
        history.append(m.as_row())
        if on_epoch is not None:
            on_epoch(m)
        if stopping.stop(has_val, on_log):
            break
    return HeadResult(fold_centre(best_head, c) if best_head else None, history, stopping.best_epoch)
