"""The head on frozen features, chosen per folder from out-of-fold evidence: which features (the final ones alone,
or with the intermediate depths: engine/network/depths.py) and how strongly regularised.

Every candidate (a feature set and a regularisation strength C) is judged the way cross-fitting judges images: k
fold heads each train on all folds but one and predict that one, and the mean out-of-fold cross-entropy over the
images it may judge says how well that candidate's head does on images it never saw. Each feature set keeps its best
C. With the earlier layers, the saved head mixes the two heads' logits, the earlier layers' head at the share
(``SHARES``) of lowest mixed out-of-fold loss; the final features alone are kept unless that mix's loss is lower by
more than a standard error of the comparison (:func:`prefer`): on a folder of everyday photos the depths help nothing
and can hurt with few labels.

The heads are exact logistic regressions (engine/train/logistic.py), all of them (fold heads, the final head and
any extra ones) solved at once for each strength, the strengths in a warm-started path from strong to weak that
stops once the out-of-fold loss has risen twice. Before that, the features are standardised (the final features
alone as one block scaled to a root-mean-square of 1 per feature, which leaves the head scikit-learn's problem on
them as they are; with the earlier layers, every feature to a standard deviation of 1, as Head2Toe and the issue's
own measurement did: 0.6-0.9 points better on clothing, flowers and digits than scaling by block) and each feature
set is rotated onto its leading principal axes (``MAX_DIMS``; computed from the rows given as ``stats``, never from
the labels; kept between runs by engine/embed/spaces.py): the penalty leaves little weight beyond them, and the
products shrink 4-7x. The heads come back as ordinary linear heads on the raw features (the scaling and rotation
folded in).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from engine.embed.spaces import SpaceStore, space_key
from engine.events import CancelToken, EpochMetrics, Phase, Progress
from engine.train.crossfit import judgeable
from engine.train.logistic import Solved, solve

# The regularisation strengths tried, as scikit-learn's C on features of root-mean-square 1. On the folders
# measured the chosen C ran from 0.03 (every label of photos) to 1 (10 labels a class of hand signs).
FINAL, DEPTHS = "final", "final+depths"
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
PATH_PATIENCE = 2  # the path stops after this many strengths in a row without a lower out-of-fold loss (or one, a
# clear rise)
# principal axes a feature set is rotated onto before the heads are solved: the final features' 1,280 lose nothing
# measurable at 384 (flowers, clothes, hand signs, digits within 0.3 point of 768); with the earlier layers' 2,816,
# 768 axes were 0.5-1.3 points better than 384 on clothing, flowers and hand signs (docs/benchmarks.md)
MAX_DIMS = {FINAL: 384, DEPTHS: 768}
STATS_ROWS = 2048  # rows the axes are computed from (a fixed draw of them when there are more)
SELECT_ROWS = 8000  # above this many images the features and C are chosen on a sample of this many
MAX_ITER = 200
SOLVER = 1  # how the heads are solved (engine/train/logistic.py, MAX_ITER): a change makes every kept path miss
MIN_LOSS_GAIN = 1e-3  # a lower out-of-fold loss than this (nats an image) is a tie (``prefer``)
# Every choice (each feature set's C, the earlier layers' share, the final features' power) reads the out-of-fold loss
# after the one temperature that suits each candidate best (``scaled_ce``): how well its heads rank the classes,
# whatever their overall confidence, which the saved head's calibration sets afterwards (engine/trust/calibration.py).
# The loss as it is favoured strong regularisation, whose small logits are cautious rather than right: on chest X-rays
# at 20 labels a class it picked C 0.003 (median of 24 draws) where the head at 0.1-0.3 was 1.1 points more accurate.
# With the power's tie going to the features as they are (``_as_they_are``), against the commit before, the app's head
# over 2-14 random splits a folder (docs/benchmarks.md, "The loss after a temperature"): hymenoptera +0.2 to +0.5,
# X-rays at 20 a class +0.9, hand signs at 10 a class +0.5, flowers and small photos at 10 a class -0.4 / -0.6 (still
# above the peer), the rest within 0.3.
SCALED = True
# With the earlier layers, the saved head mixes two heads' logits: the final features' head and the earlier layers'
# head, each at its own C, the latter's share one of these, chosen by the mixed out-of-fold loss (a mix of linear heads
# is one linear head). Measured against the hard choice between the two (share 1 only), the same one-standard-error
# rule, 6-12 random splits a folder at 20 labels a class (docs/benchmarks.md, "Mixing the two heads"): clothing +0.9
# points, hand signs +0.8, flowers +0.1, small photos +0.2, hymenoptera and scans unchanged (final alone kept).
SHARES = (0.25, 0.5, 0.75, 1.0)
WORDS = {"final": "final features", "final+depths": "with the earlier layers"}
# What the heads read of the final features: each raised to this power, sign kept (power normalisation, Perronnin et
# al. 2010: the final features are averages of ReLU6 maps, a few large values among many small ones). Measured with
# the app's head, 6-20 random splits a folder (docs/benchmarks.md, "The final features to a power"): square roots
# (0.5) gave hand signs +2.6 / +4.4 points at 20 / 10 labels a class, clothing +0.7, flowers and small photos +0.4 to
# +0.9, handwriting +0.6 to +1.1, but hymenoptera (ants and bees, classes ImageNet has) -0.8 to -1.1. At 0.65: hand
# signs +1.7 / +2.6, clothing +0.6, handwriting +0.7, small photos +0.5, hymenoptera -0.25 to -0.35 (the everyday
# photos' floor is half a point). The earlier layers' features are read as they are. Model.json says so
# (``final_power``); runs saved before it read the final features as they are (1).
FINAL_POWER = 0.65


def mapped(X: np.ndarray, final: int, power: float = FINAL_POWER, copy: bool = True) -> np.ndarray:
    """The features as the heads read them: the first ``final`` columns (the final features) raised to ``power``,
    sign kept (1: as they are), the earlier layers' as they are. ``copy=False`` maps ``X`` in place."""
    out = np.array(X, np.float32, copy=True) if copy else X
    if power != 1 and final and len(out):
        for r in range(0, len(out), 8192):  # (in slabs: no full-size temporaries at 100,000 images)
            part = out[r : r + 8192, :final]
            sign = np.sign(part)
            np.abs(part, out=part)
            with np.errstate(divide="ignore"):  # (log 0 = -inf, and exp(-inf) = 0)
                np.log(part, out=part)
            part *= np.float32(power)
            np.exp(part, out=part)  # (|x| ** power as exp(power log |x|): 8x faster than np.power on these features)
            part *= sign
    return out


def unmapped(X: np.ndarray, final: int, power: float) -> np.ndarray:
    """The first ``final`` columns of features :func:`mapped` raised to ``power``, as they were (a copy)."""
    return mapped(X[:, :final], final, 1.0 / power)  # (mapped copies)


@dataclass
class Blocks:
    """How a feature matrix's columns split: the final features first, then each tapped stage's."""

    widths: list[int]  # the final features' count, then each tap's

    @property
    def final(self) -> int:
        return self.widths[0]

    @property
    def total(self) -> int:
        return sum(self.widths)

    def slices(self) -> list[slice]:
        edges = np.cumsum([0, *self.widths])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclass
class Probe:
    """The chosen head and the evidence for it."""

    features: str  # FINAL or DEPTHS
    columns: int  # the raw feature columns the heads read (the final features, or all)
    C: float  # the final features' head's (the earlier layers' head's when its share is 1 or it was forced)
    oof_logits: np.ndarray  # (n, C) each image judged by the fold head that never saw it (the chosen candidate)
    heads: dict[str, dict[str, np.ndarray]]  # the extra heads by name, on the raw features' first ``columns``
    fold_heads: list[dict[str, np.ndarray]]
    tried: list[dict] = field(default_factory=list)  # per feature set and C: out-of-fold loss and accuracy
    comparison: dict | None = None  # final alone vs with depths: loss difference, its standard error, the verdict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    share: float = 0.0  # the earlier layers' head's share of the saved head's logits (0: the final features alone)
    power: float = 1.0  # the power the heads read the final features raised to (``mapped``; 1 when not given)
    power_check: dict | None = None  # the final features as they are against raised: losses, difference, verdict
    C_depths: float | None = None  # the earlier layers' head's C, when it has a share

    def summary(self) -> str:
        """One sentence for the log and the Results tab."""
        return self._choice() + (power_words(self.power_check) if self.power_check else "")

    def _choice(self) -> str:
        c = self.comparison
        if c is None:
            words = (
                "the final features and the earlier layers' (as asked)"
                if self.features == DEPTHS
                else "the final features"
            )
            return f"Head on {words} (C {self.C:g}, chosen out of fold)"
        gain = 100 * (c["accuracy"][DEPTHS] - c["accuracy"][FINAL])
        if self.features != DEPTHS:
            words = "final features alone kept"
        elif self.share < 1:
            words = f"earlier layers' head mixed in at {self.share:g}"
        else:
            words = "earlier layers' features kept"
        Cs = f"C {self.C:g}" + (f", {self.C_depths:g} with the earlier layers" if self.C_depths is not None else "")
        return (
            f"Head: {words} ({loss_words(c)} {c['loss'][FINAL]:.3f} final alone, {c['loss'][DEPTHS]:.3f} with "
            f"the earlier layers' head at {c['share']:g}, difference {c['difference']:+.3f} +- {c['se']:.3f}; "
            f"accuracy {gain:+.1f} points with it); {Cs}"
        )


def loss_words(record: dict, prefix: str = "out-of-fold ") -> str:
    """Which out-of-fold loss a comparison or power check (as model.json keeps it) read: after each candidate's own
    temperature (``SCALED``), or as it is (runs saved before, the dataset doctor)."""
    return prefix + ("loss after a temperature" if record.get("scaled") else "loss")


def power_words(check: dict) -> str:
    """What the final features' power check found, in words (a Probe's ``power_check``, as model.json keeps it)."""
    p = check["power"]
    raised, plain = check["loss"][str(p)], check["loss"]["1"]
    how = "as they are" if check["kept"] == 1 else f"raised to the power {p:g}"
    return (
        f"; the final features read {how} ({loss_words(check)} {raised:.3f} raised, {plain:.3f} as they are, "
        f"difference {check['difference']:+.3f} +- {check['se']:.3f})"
    )


def _normalisers(S: np.ndarray, blocks: Blocks, per_feature: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per column of the rows ``S``: the centre and a scale: each feature to a standard deviation of 1
    (``per_feature``), else each block to a root-mean-square of 1 per feature (which leaves the final features' head
    the problem scikit-learn solves on them as they are, up to the scale of C)."""
    centre = S.mean(0).astype(np.float32)
    if per_feature:
        sd = S.std(0).astype(np.float32)
        return centre, (1.0 / np.maximum(sd, 1e-3 * max(float(sd.mean()), 1e-12))).astype(np.float32)
    scale = np.empty(S.shape[1], np.float32)
    for s in blocks.slices():
        d = S[:, s] - centre[s]
        ms = float(np.einsum("ij,ij->", d, d)) / max(len(S), 1) / max(s.stop - s.start, 1)
        scale[s] = 1.0 / math.sqrt(ms) if ms > 0 else 1.0
    return centre, scale


def _space(S: np.ndarray, blocks: Blocks, name: str, seed: int, store: SpaceStore):
    """The centre, scale and principal axes (or None) of a feature set, from its rows ``S``: as ``store`` kept them
    (they depend on these rows alone: engine/embed/spaces.py), else computed and kept."""
    key = space_key(name, S, MAX_DIMS[name], seed)
    kept = store.get(key)
    if kept is not None:
        return kept
    centre, scale = _normalisers(S, blocks, per_feature=name == DEPTHS)
    A = (S - centre) * scale
    V = principal_axes(A - A.mean(0), MAX_DIMS[name], seed)
    store.put(key, centre, scale, V)
    return centre, scale, V


def principal_axes(A: np.ndarray, k: int, seed: int = 0) -> np.ndarray | None:
    """An orthonormal basis (D, k) of the ``k`` leading principal axes of the centred rows ``A`` (m, D), up to a
    rotation among them (the head's penalty is the same in any rotation); None when there are at most ``k`` columns
    (nothing to gain). A randomised range finder with one power iteration (Halko et al. 2011): four products with
    ``A`` (0.2-0.3 s on 2,048 x 2,816 features), where the Gram matrix with a QR-based iteration took 3 s on the
    2-core machine; on flowers' features it keeps 96.5% of the variance, the best 384 axes 96.7%."""
    m, D = A.shape
    k = min(k, m - 1)
    if D <= k or k < 1:
        return None
    rng = np.random.default_rng(seed)
    Y = _orthonormal(A @ rng.standard_normal((D, k)).astype(np.float32))
    Y = _orthonormal(A @ (A.T @ Y))
    V = _orthonormal(A.T @ Y)
    return np.ascontiguousarray(V) if V.shape[1] else None  # (no variance at all: the features as they are)


def _orthonormal(Y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of Y's columns: Cholesky QR in float64 (an eigendecomposition or LAPACK's QR cost 10x
    more here); when the columns are (nearly) dependent, which few images make them, through the eigenvectors of
    their Gram matrix, dropping the directions that add nothing."""
    S = (Y.T @ Y).astype(np.float64)
    if not S.size or not np.abs(S).max() > 0:
        return Y[:, :0]
    d = np.sqrt(np.maximum(np.diag(S), 1e-300))
    try:
        R = np.linalg.cholesky(S / np.outer(d, d)).T  # unit diagonal: Cholesky sees the columns' angles
        if np.diag(R).min() > 1e-6:
            return (Y / d.astype(np.float32)) @ _upper_inverse(R).astype(np.float32)
    except np.linalg.LinAlgError:
        pass
    w, U = np.linalg.eigh(S)
    keep = w > w.max() * 1e-10
    return (Y @ (U[:, keep] / np.sqrt(w[keep])).astype(np.float32)).astype(np.float32)


def _upper_inverse(R: np.ndarray) -> np.ndarray:
    """The inverse of an upper-triangular matrix, by halves ([[A, B], [0, D]]^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]]):
    NumPy has no triangular inverse, and its general one took 23 ms at 768 x 768 against 5 ms."""
    n = len(R)
    if n <= 128:
        return np.linalg.inv(R)
    k = n // 2
    A, D = _upper_inverse(R[:k, :k]), _upper_inverse(R[k:, k:])
    out = np.zeros_like(R)
    out[:k, :k], out[k:, k:], out[:k, k:] = A, D, -(A @ R[:k, k:]) @ D
    return out


def prefer(ce_final: np.ndarray, ce_depths: np.ndarray) -> tuple[bool, float, float]:
    """Whether the depths' per-image out-of-fold losses beat the final features' by more than one standard error of
    the paired difference (the same images judged both ways); the mean difference and its standard error.

    The one-standard-error rule (Breiman et al. 1984; Hastie et al.): the simpler model is kept unless the other is
    better by more than a standard error, so a tie goes to the final features. Measured at 10 and 20 labels a class,
    five draws each (docs/benchmarks.md): on hymenoptera the difference was never positive (the depths lost 0-11
    test points there), on handwritten digits it was 3-7 standard errors (+6 to +15 points), and on clothing and hand
    signs 0.7-3 (the depths won 14 of 15 draws by +0.7 to +4.3); at 1.96 standard errors, as first written, the
    depths were kept in 2 of 5 clothing draws at 10 labels a class, at one, in all 5."""
    d = ce_final - ce_depths
    if len(d) < 2:
        return False, float(d.mean()) if len(d) else 0.0, math.inf
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    # (and by more than a thousandth of a nat an image: where both judge every image right with near-certainty, the
    # losses are ~1e-5 and their difference, however many standard errors, is no evidence of anything)
    return bool(d.mean() > max(se, MIN_LOSS_GAIN)), float(d.mean()), se


def per_image_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def scaled_ce(logits: np.ndarray, y: np.ndarray, fair: np.ndarray) -> np.ndarray:
    """Each image's cross-entropy after the one temperature that minimises the mean over ``fair``'s images: the logits
    times the s > 0 found by Newton's method (the loss is convex in s: its second derivative is the variance of the
    logits under the softmax). The same temperature as engine/trust/calibration.py ``fit_temperature`` without its
    prior, whose grid and golden-section search took 88 ms on 4,317 x 5 logits against 5 ms: it runs for every
    strength and share (up to 20 times a run)."""
    z = np.asarray(logits, np.float64)
    zf, yf = z[fair], y[fair]
    if not len(zf):
        return per_image_ce(z, y)
    zy = zf[np.arange(len(yf)), yf]
    s = 1.0
    for _ in range(30):
        a = zf * s
        p = np.exp(a - a.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        m = (p * zf).sum(1)
        g = float((m - zy).sum())
        h = float((p * zf * zf).sum() - (m * m).sum())
        if h <= 1e-12:
            break
        step = g / h
        s_new = min(max(s - step, s / 4), s * 4, 1e3)
        if abs(s_new - s) < 1e-6 * s:
            s = s_new
            break
        s = max(s_new, 1e-3)
    return per_image_ce(z * s, y)


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    num_classes: int,
    blocks: Blocks,
    *,
    k: int,
    extra: dict[str, np.ndarray] | None = None,
    class_weight: np.ndarray | None = None,
    judge: np.ndarray | None = None,
    stats: np.ndarray | None = None,
    features: str = "auto",
    Cs: tuple[float, ...] | dict[str, tuple[float, ...]] = C_GRID,
    seed: int = 0,
    cancel: CancelToken | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    spaces: SpaceStore | None = None,
    shares: tuple[float, ...] = SHARES,
    fixed_share: float | None = None,
    power: float | None = None,
    scaled: bool = SCALED,
) -> Probe:
    """Choose the features and C out of fold and solve the heads (see the module docstring).

    ``X`` (n, blocks.total): the labelled images' raw features; ``folds`` (n,): each image's fold in 0..k-1;
    ``extra``: more heads to solve at the chosen candidate, each on the images its boolean mask selects
    (``{"final": all}`` for the model to save); ``judge``: the images whose out-of-fold loss makes the choices
    (default: every image whose class its fold's head has seen); ``stats``: features (any rows, labelled or not)
    that fix the centring, scaling and axes (default: ``X``); ``features``: "auto", or "final" / "depths" to force
    one set; ``spaces``: where those are kept between runs (engine/embed/spaces.py; None: this process's memory);
    ``shares``: the earlier layers' head's shares of the logits tried (``(1.0,)``: a choice between the two heads);
    ``fixed_share``: that share, already chosen (no comparison decides it); ``Cs``: the strengths tried, or per
    feature set; ``power``: the power ``X``'s (and ``stats``') final features were raised to (:func:`mapped`):
    when the final features alone are kept, their head at the chosen C on the features as they are is tried too
    (:func:`_as_they_are`; the Probe's ``power`` says which the heads read); ``scaled``: every choice reads the
    out-of-fold loss after each candidate's own temperature (``SCALED``), else as it is (the dataset doctor's).
    Raises :class:`Cancelled` when ``cancel`` is set (checked every iteration)."""
    t0 = time.perf_counter()
    extra = extra or {}
    y = np.asarray(y, np.int64)
    X = np.asarray(X, np.float32)
    stats = X if stats is None else np.asarray(stats, np.float32)
    if len(y) > SELECT_ROWS and not isinstance(Cs, dict) and len(Cs) > 1:
        return _chosen_on_a_sample(X, y, folds, num_classes, blocks, k, extra, class_weight, judge, stats, features, Cs,
                                   seed, cancel, on_epoch, on_progress, on_log, t0, spaces, shares, power,
                                   scaled)  # fmt: skip
    rows = np.arange(len(stats))
    if len(rows) > STATS_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), STATS_ROWS, replace=False))
    fair = judgeable(y, folds, k, num_classes, judge)
    sets = [FINAL] if blocks.total == blocks.final or features == "final" else [FINAL, DEPTHS]
    sets = [DEPTHS] if features == "depths" and DEPTHS in sets else sets
    weights = _head_weights(y, folds, k, extra, class_weight, num_classes)
    report = _Reporter(y, folds, k, weights.shape[1], fair, len(sets), on_epoch, on_progress)
    results = {}
    for name in sets:
        cols = blocks.final if name == FINAL else blocks.total
        grid = Cs[name] if isinstance(Cs, dict) else Cs
        results[name] = _solve_set(X[:, :cols], stats[:, :cols], rows, y, folds, k, weights, grid, fair,
                                   Blocks(blocks.widths[:1] if name == FINAL else blocks.widths), num_classes,
                                   seed, cancel, report, spaces or SpaceStore(), scaled)  # fmt: skip
    chosen, comparison, share = sets[0], None, float(sets[0] == DEPTHS)
    r = results[chosen]
    if len(sets) == 2:
        tried, fixed = (shares, False) if fixed_share is None else ((fixed_share,), True)
        r, share, comparison = _mixed(results[FINAL], results[DEPTHS], y, fair, tried, fixed, scaled)
        chosen = DEPTHS if share else FINAL
    r, kept_power, power_check = _as_they_are(r, chosen, X, stats, rows, y, folds, k, weights, fair, blocks,
                                              num_classes, power, seed, cancel, spaces, scaled)  # fmt: skip
    probe = Probe(
        features=chosen, columns=r["cols"], C=r["C"], oof_logits=r["oof"],
        heads={name: r["heads"][k + i] for i, name in enumerate(extra)}, fold_heads=r["heads"][:k],
        tried=[row for n in sets for row in results[n]["table"]], comparison=comparison, history=report.history,
        seconds=time.perf_counter() - t0, share=share,
        C_depths=results[DEPTHS]["C"] if len(sets) == 2 and 0 < share < 1 else None, power=kept_power,
        power_check=power_check,
    )  # fmt: skip
    if on_log is not None:
        on_log(probe.summary() + f" ({probe.seconds:.1f} s)")
    return probe


def _head_weights(y, folds, k, extra, class_weight, num_classes) -> np.ndarray:
    """(n, k + E): each image's weight in each head: the k fold heads (every fold but their own), then ``extra``'s
    (their masks), times its class's weight."""
    own = np.stack([folds != f for f in range(k)] + [np.asarray(m, bool) for m in extra.values()], 1)
    cw = np.ones(num_classes, np.float32) if class_weight is None else np.asarray(class_weight, np.float32)
    return own.astype(np.float32) * cw[y][:, None]


def _as_they_are(r, chosen, X, stats, rows, y, folds, k, weights, fair, blocks, num_classes, power, seed, cancel,
                 spaces, scaled) -> tuple[dict, float, dict | None]:  # fmt: skip
    """The final features' head ``r`` (on them raised to ``power``) against the same head, at the same C, on the
    final features as they are: the power is kept only when its out-of-fold loss is lower by more than a standard
    error (:func:`prefer`); a tie goes to the features as they are, the simpler candidate, as a tie between the
    feature sets goes to the final features alone. Only when the final features alone were ``chosen`` and a power
    below 1 is given (else ``r`` as it is, with no check): where the earlier layers add nothing, the pictures are
    mostly of things ImageNet has, on which the power cost hymenoptera 0.3-0.8 point. With the tie the other way
    (the power kept unless the features as they are were clearly better) hymenoptera stayed 0.5-0.9 below the peer
    over 14 random splits (docs/benchmarks.md, "The loss after a temperature"). One more head at one C."""
    if chosen != FINAL or power is None or power == 1:
        return r, power or 1.0, None
    f = blocks.final
    quiet = _Reporter(y, folds, k, weights.shape[1], fair, 1, None, None)
    raw = _solve_set(unmapped(X, f, power), unmapped(stats, f, power), rows, y, folds, k, weights, (r["C"],), fair,
                     Blocks(blocks.widths[:1]), num_classes, seed, cancel, quiet, spaces or SpaceStore(),
                     scaled)  # fmt: skip
    raised, diff, se = prefer(raw["judged"][fair], r["judged"][fair])  # (diff: how much lower raised is)
    check = {"power": power, "loss": {str(power): float(r["judged"][fair].mean()),
                                      "1": float(raw["judged"][fair].mean())},
             "difference": -diff, "se": se, "kept": power if raised else 1.0, "scaled": scaled}  # fmt: skip
    return (r, power, check) if raised else (raw, 1.0, check)


def _mixed(a: dict, b: dict, y: np.ndarray, fair: np.ndarray, shares: tuple[float, ...],
           fixed: bool = False, scaled: bool = SCALED) -> tuple[dict, float, dict]:  # fmt: skip
    """The final features' head ``a`` and the earlier layers' head ``b`` (each at its own C, out-of-fold logits,
    heads): the share of ``b``'s logits (from ``shares``) whose mixed out-of-fold loss is lowest, kept when it beats
    the final features alone by more than a standard error (:func:`prefer`; ``fixed``: kept), else share 0. Returns
    the mixed candidate as :func:`_solve_set` returns one (its heads on every column), the share and the comparison."""
    rows = []
    for s in shares:
        oof = (1 - s) * a["oof"] + s * b["oof"]
        ce = per_image_ce(oof, y)
        judged = scaled_ce(oof, y, fair) if scaled else ce
        rows.append({"share": s, "loss": float(judged[fair].mean()),
                     "accuracy": float((oof.argmax(1) == y)[fair].mean()), "oof": oof, "judged": judged})  # fmt: skip
    best = min(rows, key=lambda row: row["loss"])
    better, diff, se = prefer(a["judged"][fair], best["judged"][fair])
    share = best["share"] if better or fixed else 0.0
    comparison = {
        "loss": {FINAL: float(a["judged"][fair].mean()), DEPTHS: best["loss"]},
        "scaled": scaled,
        "accuracy": {FINAL: float((a["oof"].argmax(1) == y)[fair].mean()), DEPTHS: best["accuracy"]},
        "difference": diff,
        "se": se,
        "images": int(fair.sum()),
        "share": best["share"],
        "shares": [{k: row[k] for k in ("share", "loss", "accuracy")} for row in rows],
        "kept": DEPTHS if share else FINAL,
    }
    if not share:
        return a, 0.0, comparison
    if share == 1:
        return b, 1.0, comparison
    heads = []
    for ha, hb in zip(a["heads"], b["heads"]):
        weight = share * hb["weight"]
        weight[:, : ha["weight"].shape[1]] += (1 - share) * ha["weight"]
        heads.append({"weight": weight, "bias": (share * hb["bias"] + (1 - share) * ha["bias"]).astype(np.float32)})
    return dict(C=a["C"], oof=best["oof"], judged=best["judged"], heads=heads, cols=b["cols"]), share, comparison


def _chosen_on_a_sample(X, y, folds, num_classes, blocks, k, extra, class_weight, judge, stats, features, Cs, seed,
                        cancel, on_epoch, on_progress, on_log, t0, spaces, shares, power, scaled) -> Probe:  # fmt: skip
    """Above ``SELECT_ROWS`` images: the features and C chosen on a fixed sample of that many (a share of every
    class), then the heads solved at that choice on every image. The path's cost then stops growing with the folder
    (60,000 images: one strength solved on all of them instead of a dozen), and the out-of-fold judgements of every
    image still come from the fold heads that never saw it."""
    rng = np.random.default_rng(seed)
    share = SELECT_ROWS / len(y)
    pick = np.sort(np.concatenate([rng.choice(idx, max(1, round(share * len(idx))), replace=False)
                                   for idx in (np.flatnonzero(y == c) for c in np.unique(y))]))  # fmt: skip
    chose = fit_probe(
        X[pick], y[pick], folds[pick], num_classes, blocks, k=k, class_weight=class_weight,
        judge=None if judge is None else judge[pick], stats=stats, features=features, Cs=Cs, seed=seed,
        cancel=cancel, on_progress=on_progress, spaces=spaces, shares=shares, power=power, scaled=scaled,
    )  # fmt: skip
    if chose.power != (power or 1.0):  # the final features as they are: the heads on every image read them so
        X, stats = unmapped(X, blocks.final, power), unmapped(stats, blocks.final, power)
        blocks = Blocks(blocks.widths[:1])
    if 0 < chose.share < 1:  # both heads at their strengths, mixed at the chosen share
        how = dict(features="auto", Cs={FINAL: (chose.C,), DEPTHS: (chose.C_depths,)}, fixed_share=chose.share)
    else:
        how = dict(features="final" if chose.features == FINAL else "depths", Cs=(chose.C,))
    probe = fit_probe(
        X, y, folds, num_classes, blocks, k=k, extra=extra, class_weight=class_weight, judge=judge, stats=stats,
        seed=seed, cancel=cancel, on_epoch=on_epoch, on_progress=on_progress, spaces=spaces, scaled=scaled, **how,
    )  # fmt: skip
    probe.tried, probe.power, probe.power_check = chose.tried, chose.power, chose.power_check
    if chose.comparison:
        probe.comparison = {**chose.comparison, "sample": f"{len(pick)} of {len(y)} images"}
    probe.seconds = time.perf_counter() - t0
    if on_log is not None:
        on_log(probe.summary() + f" (chosen on {len(pick)} of the {len(y)} images; {probe.seconds:.1f} s)")
    return probe


def _solve_set(X, stats, rows, y, folds, k, weights, Cs, fair, blocks, num_classes, seed, cancel, report,
               spaces, scaled) -> dict:  # fmt: skip
    """One feature set: its heads for every C solved at once; the C of lowest out-of-fold loss (after each C's own
    temperature where ``scaled``), and its heads as linear heads on the raw features."""
    name = FINAL if blocks.total == blocks.final else DEPTHS
    centre, scale, V = _space(stats[rows], blocks, name, seed, spaces)
    # ((x - centre) * scale) @ V as one product with the features as they are (no scaled copy of them)
    Z = X @ (scale[:, None] * V) - (centre * scale) @ V if V is not None else (X - centre) * scale
    shift = Z.mean(0)
    Z -= shift  # (the bias is free: centring only helps the solver)
    # Fewer images than columns (a labelling round: 300 labels, axes from the whole pile): every head's weights lie in
    # the span of the centred rows (the loss's gradient does, and any other part only adds to the penalty), so the
    # heads are solved on the rows' coordinates in an orthonormal basis of that span, the same optimum in fewer
    # columns, and turned back at the end.
    Q = np.linalg.qr(Z.T)[0].astype(np.float32) if len(Z) < Z.shape[1] else None
    Zs = Z @ Q if Q is not None else Z
    per = weights.shape[1]
    kept = _KeptPath(spaces if Q is None and spaces.paths else None, Zs, y, weights, num_classes)
    best, table, solved, before, rising = None, [], None, None, 0
    for ci, c in enumerate(Cs):  # strongest first, each from the one before: a regularisation path
        lam = np.array([1.0 / (c * max(float(weights[:, h].sum()), 1e-12)) for h in range(per)], np.float32)
        start = solved
        if before is not None:  # along the path in log C, from the last two strengths' heads (-20% iterations)
            start = replace(solved, weight=2 * solved.weight - before.weight, bias=2 * solved.bias - before.bias)
        before = solved
        solved = kept.get(c) or kept.put(c, solve(Zs, y, weights, lam, num_classes, max_iter=MAX_ITER, cancel=cancel,
                                                  observe=report, init=start))  # fmt: skip
        oof = _out_of_fold(Zs, solved.weight, solved.bias, 0, folds, k)
        ce = per_image_ce(oof, y)
        report.solved(name, c, Zs, solved, oof, ce)
        judged = scaled_ce(oof, y, fair) if scaled else ce
        table.append({"C": c, "loss": float(ce[fair].mean()), "accuracy": float((oof.argmax(1) == y)[fair].mean())})
        if scaled:
            table[-1]["scaled loss"] = float(judged[fair].mean())
        if best is None or judged[fair].mean() < best[2][fair].mean():
            best, rising = (ci, oof, judged, solved), 0
        else:
            rising += 1
        # past the best strength: weaker ones only fit the folds' own images closer. One step past it suffices where
        # the loss rose clearly (by more than a standard error of the paired per-image difference); the weakest
        # strengths are the dearest to solve (on flowers 0.5 s of the head's 2.2)
        if rising == PATH_PATIENCE or (rising and prefer(judged[fair], best[2][fair])[0]):
            break
    kept.save()
    ci, oof, judged, solved = best
    heads = []
    for h in range(per):  # logits = ((x - centre) * scale @ V - shift) @ W + b, as one linear map of x
        W, b = solved.weight[h], solved.bias[h]
        W = Q @ W if Q is not None else W
        VW = V @ W if V is not None else W  # (cols, C)
        weight = (scale[:, None] * VW).T
        bias = b - shift @ W - (centre * scale) @ VW
        heads.append({"weight": np.ascontiguousarray(weight, np.float32), "bias": bias.astype(np.float32)})
    rows_out = [{"features": name, **row} for row in table]
    return dict(C=Cs[ci], oof=oof, judged=judged, heads=heads, table=rows_out, cols=X.shape[1])


class _KeptPath:
    """The heads a feature set's path solved for exactly this problem, kept beside the spaces: found by a hash of
    everything a solve reads (the features on the axes, the labels, every head's weights, ``SOLVER``), so a rerun on
    the same images, labels and settings reads each strength's heads instead of solving them again (the very same
    heads: the solver is deterministic), and anything changed misses and is solved. The solves were 2.2 s of a
    profiled 5.2 s cached flowers rerun on a 2-core AVX2 EPYC (docs/benchmarks.md). Only where the store keeps paths (a
    training run's: ``SpaceStore(paths=True)``) and on the principal axes (``store`` None otherwise)."""

    def __init__(self, store: SpaceStore | None, Z: np.ndarray, y: np.ndarray, weights: np.ndarray, classes: int):
        self.store, self.new = store, {}
        if store is None:
            self.kept = {}
            return
        h = hashlib.blake2b(f"path|{SOLVER}|{Z.shape}|{weights.shape}|{classes}".encode(), digest_size=16)
        for a in (np.ascontiguousarray(Z, np.float32), np.asarray(y, np.int64), np.asarray(weights, np.float32)):
            h.update(np.ascontiguousarray(a).data)
        self.key = h.hexdigest()
        self.kept = store.get_arrays(self.key) or {}
        self.shapes = {"weight": (weights.shape[1], Z.shape[1], classes), "bias": (weights.shape[1], classes)}

    def get(self, c: float) -> Solved | None:
        w, b = self.kept.get(f"{c:g}/weight"), self.kept.get(f"{c:g}/bias")
        if w is None or b is None or w.shape != self.shapes["weight"] or b.shape != self.shapes["bias"]:
            return None
        return Solved(w, b, 0, np.ones(len(w), bool), self.kept.get(f"{c:g}/loss", np.zeros(len(w))))

    def put(self, c: float, s: Solved) -> Solved:
        self.new.update({f"{c:g}/weight": s.weight, f"{c:g}/bias": s.bias, f"{c:g}/loss": s.loss})
        return s

    def save(self) -> None:
        if self.store is not None and self.new:
            self.store.put_arrays(self.key, {**self.kept, **self.new})


def _out_of_fold(Z, W, b, first, folds, k) -> np.ndarray:
    """Each image's logits from the fold head (heads ``first .. first + k - 1``) that did not train on it."""
    out = np.zeros((len(Z), W.shape[2]), np.float32)
    for f in range(k):
        rows = np.flatnonzero(folds == f)
        if len(rows):
            out[rows] = Z[rows] @ W[first + f] + b[first + f]
    return out


class _Reporter:
    """Progress through the solver's iterations (the bar moves), and one epoch event per regularisation strength
    solved (the plots and history.csv): the training loss and accuracy of the first extra head (the model to save;
    else fold 0's head) and the fold heads' out-of-fold loss and accuracy as the validation figures, with the
    strength C in the learning rate's column (the head has no learning rate)."""

    def __init__(self, y, folds, k, per, fair, n_sets, on_epoch, on_progress) -> None:
        self.y, self.folds, self.k, self.per, self.fair = y, folds, k, per, fair
        self.on_epoch, self.on_progress = on_epoch, on_progress
        self.epochs = len(C_GRID) * n_sets  # (a bound: a path stops once past its best strength)
        self.epoch, self.iterations, self.best = 0, 0, math.inf
        self.history: list[dict] = []
        self.t = time.perf_counter()

    def __call__(self, it: int, T: np.ndarray, done: np.ndarray) -> None:
        self.iterations += 1
        if self.on_progress is not None:
            total = self.epochs * MAX_ITER
            self.on_progress(Progress(Phase.TRAINING, min(self.epoch * MAX_ITER + it, total), total))

    def solved(self, name: str, c: float, Z: np.ndarray, s, oof: np.ndarray, ce: np.ndarray) -> None:
        y, fair, k = self.y, self.fair, self.k
        self.epoch += 1
        h = k if self.per > k else 0
        own = np.ones(len(y), bool) if self.per > k else self.folds != 0
        train = (Z @ s.weight[h] + s.bias[h])[own]  # (no copy of the features)
        loss = float(ce[fair].mean())
        improved = loss < self.best - 1e-6
        self.best = min(self.best, loss)
        now = time.perf_counter()
        secs, self.t = now - self.t, now
        m = EpochMetrics(
            self.epoch, self.epochs, float(per_image_ce(train, y[own]).mean()),
            float((train.argmax(1) == y[own]).mean()), loss, float((oof.argmax(1) == y)[fair].mean()), 0.0, secs,
            0.0, improved, label=f"{WORDS[name]}, C {c:g}",
        )  # fmt: skip
        self.iterations = 0
        self.history.append({**m.as_row(), "C": c, "depths": int(name == DEPTHS)})  # (history.csv: numbers only)
        if self.on_epoch is not None:
            self.on_epoch(m)
