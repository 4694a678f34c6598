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

Several learning rates (``lrs``) can train side by side as groups of heads in the same lock-step; the out-of-fold
loss chooses among them (:func:`_choose`). With few labels two things matter: an epoch makes at least ``MIN_STEPS``
steps (passing over a few dozen images several times), and the loss that picks the epoch and the rate leaves out
the images whose class their fold's head never saw (a class wholly inside one fold).

The dataset doctor's out-of-sample label check uses this same function, with its own short recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.data.splits import _draw
from engine.events import BatchMetrics, CancelToken, EpochMetrics, Throttle
from engine.meters import EarlyStopping
from engine.train.head import HeadAdamW, centring, cross_entropy, fold_centre, init_linear
from engine.trust.calibration import softmax

K_FOLDS = 5
MASKS = 4096  # dropout masks drawn once per job
MIN_STEPS = 8  # an epoch makes at least this many steps (several passes over a few labels)


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
    lr: float = 0.0  # the learning rate of the heads kept (of several: see _choose)
    tried: list[dict] = field(default_factory=list)  # each rate's best out-of-fold loss and its epoch
    fold_heads: list[dict[str, np.ndarray]] = field(default_factory=list)  # the k fold heads kept with them


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


def _out_of_fold(X: np.ndarray, W: np.ndarray, B: np.ndarray, held: list[np.ndarray], C: int, group: int, G: int):
    """Each image's logits from the head of its fold, for every learning-rate group: ``(G, n, C)``.

    Group g's fold-f head is head ``g * group + f`` (rows ``(g * group + f) * C ..`` of W)."""
    oof = np.zeros((G, len(X), C), np.float32)
    for f, rows in enumerate(held):
        if len(rows):
            heads = [g * group + f for g in range(G)]
            w = W.reshape(-1, C, W.shape[1])[heads].reshape(G * C, -1)
            oof[:, rows] = (X[rows] @ w.T).reshape(len(rows), G, C).transpose(1, 0, 2) + B[heads][:, None]
    return oof


class _LockStep:
    """Every head's weights, optimiser and dropout bank; :meth:`epoch` makes one pass of shared batches.

    ``scale`` (H,): each head's factor on the learning rate (heads of one learning-rate group share it)."""

    def __init__(self, X, y, own, C, batch_size, epochs, lr, weight_decay, dropout, class_weight, seed, scale=None):
        self.X, self.y, self.own, self.C = X, y, own, C
        self.H = own.shape[1]
        self.rng = np.random.default_rng(seed)
        dim = X.shape[1]
        self.W = np.empty((self.H * C, dim), np.float32)  # head h's rows: h*C .. (h+1)*C
        self.B = np.empty((self.H, C), np.float32)
        for h in range(self.H):  # every head starts as nn.Linear would
            self.W[h * C : (h + 1) * C], self.B[h] = init_linear(dim, C, self.rng)
        self.bs = min(batch_size, len(X))
        # An epoch of a few dozen labels was one step: 100 epochs, 100 steps, a head still near its start (20
        # digits: 0.26 against logistic regression's 0.32). Such an epoch passes over the images several times.
        self.passes = max(1, math.ceil(MIN_STEPS / math.ceil(len(X) / self.bs)))
        self.steps = self.passes * math.ceil(len(X) / self.bs)
        scales = None
        if scale is not None and np.any(scale != 1):
            scale = np.asarray(scale, np.float32)
            scales = [np.repeat(scale, C)[:, None], scale[:, None]]
        self.opt = HeadAdamW([self.W, self.B], lr, weight_decay, total_steps=epochs * self.steps, scales=scales)
        keep = 1.0 - dropout
        self.bank = (self.rng.random((MASKS, dim), dtype=np.float32) < keep) / np.float32(keep) if dropout > 0 else None
        self.cw = np.ones(C, np.float32) if class_weight is None else class_weight.astype(np.float32)
        self.report = 0
        self.throttle = Throttle(0.2)  # batch events at most 5 a second

    def keep(self, heads: list[int]) -> None:
        """Train only these heads from now on (in this order)."""
        heads = np.asarray(heads)
        rows = (heads[:, None] * self.C + np.arange(self.C)).ravel()
        self.W, self.B = self.opt.select([rows, heads])
        self.own = self.own[:, heads]
        self.H = len(heads)

    def epoch(self, epoch: int, cancel: CancelToken | None, on_batch) -> tuple[float, float]:
        """One pass; returns the reported head's training loss and accuracy over its own images."""
        n = len(self.X)
        perm = np.concatenate([self.rng.permutation(n) for _ in range(self.passes)])
        per_pass = math.ceil(n / self.bs)
        r = self.report
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for step in range(self.steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            p, b = divmod(step, per_pass)  # (a pass's last batch may be short, as in a one-pass epoch)
            idx = perm[p * n + b * self.bs : p * n + min((b + 1) * self.bs, n)]
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
    lrs: tuple[float, ...] | None = None,
    dropout: float = 0.2,
    class_weight: np.ndarray | None = None,
    cancel: CancelToken | None = None,
    on_batch: Callable[[BatchMetrics], None] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    centre: np.ndarray | None = None,
    judge: np.ndarray | None = None,
) -> CrossFit:
    """Train k fold heads (and the ``extra`` heads, each on the images its boolean mask selects: ``{"final": all}``
    for the model to save) in lock-step; keep the epoch whose out-of-fold loss is lowest.

    ``lrs``: learning rates to try (default: ``lr`` alone). Each is a group of k + extra heads in the same
    lock-step, each group keeps its epoch of lowest out-of-fold loss, and the first rate given is kept unless
    another's loss is lower by more than a standard error (:func:`_choose`): no one rate suits every folder (the
    flowers' head is best within a few epochs at 3e-3, the digits' still improves at epoch 100 and needs ~10x the
    rate; measured in docs/benchmarks.md), and judging every image out of sample is what lets the choice be made
    without a validation split. The heads train on the features less ``centre`` (None: their mean;
    :func:`engine.train.head.centring`) and are returned as heads on the features themselves. ``judge``: the images
    whose out-of-fold loss chooses the epoch and the rate (default: all), so that a head trained without some images
    is also chosen without them (the labelling rounds' random checks). The epoch metrics report the winning-so-far
    group: its first extra head's training loss (the final head's) and its out-of-fold loss and accuracy as the
    validation figures. Raises
    :class:`Cancelled` when ``cancel`` is set (checked every step)."""
    X, c = centring(X, centre)
    y = np.asarray(y, dtype=np.int64)
    extra = extra or {}
    lrs = tuple(lrs) if lrs else (lr,)
    G = len(lrs)
    own = np.stack([folds != f for f in range(k)] + [np.asarray(m, bool) for m in extra.values()], 1)  # (n, H)
    group = own.shape[1]  # heads per learning-rate group
    held = [np.flatnonzero(folds == f) for f in range(k)]
    fair = judgeable(y, folds, k, num_classes, judge)
    scale = np.repeat(np.array(lrs, np.float64) / lrs[0], group)
    heads = _LockStep(
        X, y, np.tile(own, (1, G)), num_classes, batch_size, epochs, lrs[0], weight_decay, dropout, class_weight,
        seed, scale,
    )  # fmt: skip
    stopping = EarlyStopping(patience)  # the run: the best loss of any group
    peaked = [EarlyStopping(patience) for _ in lrs]  # each group's own best; one that peaked leaves the lock-step
    active = list(range(G))  # the groups still training, in the order of their heads in the lock-step
    bests: dict[int, tuple] = {}  # group -> its best epoch's (out-of-fold logits, weight rows, bias rows)
    curve: dict[int, list[float]] = {g: [] for g in range(G)}  # each group's out-of-fold loss by epoch
    history: list[dict] = []
    lead = 0  # the group whose loss the epochs report: the best so far
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        heads.report = active.index(lead) * group + (k if extra else 0)  # its final head, else its fold 0's
        loss, acc = heads.epoch(epoch, cancel, on_batch)
        oof = _out_of_fold(X, heads.W, heads.B, held, num_classes, group, len(active))
        vlosses = [cross_entropy(oof[j][fair], y[fair], class_weight)[0] for j in range(len(active))]
        for j, g in enumerate(active):
            curve[g].append(vlosses[j])
            if peaked[g].update(vlosses[j], epoch):
                rows = slice(j * group * num_classes, (j + 1) * group * num_classes)
                bests[g] = (oof[j], heads.W[rows].copy(), heads.B[j * group : (j + 1) * group].copy())
        lead = min(bests, key=lambda g: peaked[g].best_loss)
        j = int(np.argmin(vlosses))
        vloss, vacc = vlosses[j], float((oof[j].argmax(1) == y).mean())
        improved = stopping.update(vloss, epoch)
        secs = time.perf_counter() - t0
        m = EpochMetrics(
            epoch, epochs, loss, acc, vloss, vacc, heads.opt.lr * lrs[lead] / lrs[0], secs,
            len(X) / secs if secs else 0.0, improved,
        )  # fmt: skip
        history.append(m.as_row())
        if on_epoch is not None:
            on_epoch(m)
        if stopping.stop(True, on_log):
            break
        still = [g for g in active if g == lead or not _behind(curve[g], peaked[lead].best_loss, peaked[g], epochs)]
        if len(still) < len(active):  # AdamW alone is ~0.4 ms a step per group (10 classes): drop the losers
            heads.keep([active.index(g) * group + h for g in still for h in range(group)])
            active = still
    g = _choose({h: (b[0][fair],) for h, b in bests.items()}, y[fair], lead)
    tried = [{"lr": lrs[h], "loss": peaked[h].best_loss, "epoch": peaked[h].best_epoch} for h in sorted(bests)]
    if G > 1 and on_log is not None:
        on_log(
            f"Learning rate {lrs[g]:g} kept (out-of-fold loss "
            + ", ".join(f"{t['lr']:g}: {t['loss']:.3f} at epoch {t['epoch']}" for t in tried)
            + ("; the lowest" if g == lead else f"; {lrs[lead]:g} was lower by less than its standard error")
            + ")"
        )
    oof, Wb, Bb = bests[g]  # the chosen group's heads alone: its k fold heads, then the extra ones

    def head(h: int) -> dict[str, np.ndarray]:
        return fold_centre({"weight": Wb[h * num_classes : (h + 1) * num_classes].copy(), "bias": Bb[h]}, c)

    named = {name: head(k + i) for i, name in enumerate(extra)}
    return CrossFit(oof, named, peaked[g].best_epoch, history, folds, k, lrs[g], tried, [head(f) for f in range(k)])


def judgeable(
    y: np.ndarray, folds: np.ndarray, k: int, num_classes: int, within: np.ndarray | None = None
) -> np.ndarray:
    """The images the out-of-fold loss judges (for the epoch and the rate): those whose class their fold's head has
    seen. With a few labels a class may sit wholly in one fold; its images are always wrong there and their loss
    only grows with the heads' confidence, so the loss never fell below epoch 1's (20 digits: an untrained head,
    0.12 accuracy). All images when no class is seen across folds (one label a class). ``within``: only those of
    them it selects too, unless it selects none of them."""
    seen = np.zeros((k, num_classes), bool)
    for f in range(k):
        seen[f, np.unique(y[folds != f])] = True
    fair = seen[folds, y]
    fair = fair if fair.any() else np.ones(len(y), bool)
    return fair & within if within is not None and (fair & within).any() else fair


def _behind(curve: list[float], lead_loss: float, stopping: EarlyStopping, epochs: int) -> bool:
    """Whether a group is out of the race: it stopped improving (its own early stop), or even going on at the pace
    of its last few epochs to the last epoch it would not reach the leader's best loss (with the cosine decay the
    pace only slows: the guess is generous). So the flowers' 3e-2 group, past its best at epoch 2, leaves at epoch
    6 rather than 17, and the digits' 3e-3 group, far behind 3e-2 and closing slowly, no longer runs all 100
    epochs beside it."""
    if stopping.should_stop():
        return True
    p = min(stopping.patience, 5)
    if not p or len(curve) <= p:
        return False
    pace = max(curve[-1 - p] - curve[-1], 0.0) / p
    return curve[-1] - lead_loss > pace * (epochs - len(curve))


def _choose(bests: dict[int, tuple], y: np.ndarray, lead: int) -> int:
    """The first group (in the order the rates were given: the default first) whose out-of-fold loss is within one
    standard error of the lowest (per image, paired: the same images judged both ways); else the lowest.

    The lowest of several losses measured on the same few images is partly luck: on 60 photos the higher rates won
    by noise and lost ~3 test points (docs/benchmarks.md). The one-standard-error rule keeps the default unless
    another rate is better by more than that."""
    ce = {g: _per_image_ce(b[0], y) for g, b in bests.items()}
    for g in sorted(bests):
        d = ce[g] - ce[lead]
        if g == lead or d.mean() <= d.std(ddof=1) / math.sqrt(len(d)):
            return g
    return lead


def _per_image_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = softmax(logits.astype(np.float32, copy=True))
    return -np.log(np.maximum(p[np.arange(len(y)), y], 1e-30))
