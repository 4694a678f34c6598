"""Confidence that means what it says: temperature scaling, its honest measurement, and "not sure" thresholds.

One temperature T is fitted on validation logits by minimising log-loss (Guo et al. 2017) under a weak prior that
keeps a few validation images from pushing it far from 1 (:func:`fit_temperature`); probabilities are then
``softmax(logits / T)`` everywhere (:func:`probabilities` below). Dividing by T > 0 never changes the top
class, so accuracy is unchanged. Every figure reported (expected calibration error, log-loss, the reliability bins,
accuracy against coverage) is measured on images the temperature was not fitted on: the test split when there is
one, otherwise two-fold on validation (fit on one half, measure on the other, and the reverse). NumPy only.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
DEFAULT_TARGET_ACCURACY = 0.95


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits (N, C), scaled by a calibration temperature (1 = none): ``softmax(logits /
    T)``, the one place where logits become the probabilities a user sees (predict, evaluate, calibration)."""
    logits = np.asarray(logits, dtype=np.float32)
    return softmax(logits / np.float32(temperature) if temperature != 1.0 else logits.copy())


PRIOR_SD = 0.5  # the prior on log T: normal, mean 0 (T = 1), this standard deviation


def fit_temperature(logits: np.ndarray, y: np.ndarray, prior_sd: float | None = PRIOR_SD) -> float:
    """The T > 0 that minimises the summed cross-entropy of ``softmax(logits / T)`` plus ``(log T)^2 / (2 sd^2)``: a
    normal prior on log T (None: plain log-loss), clipped to T in [0.01, 100].

    Why a prior: fitted on hymenoptera's 84 validation images, the plain minimum sharpened a fine-tuning run's
    probabilities with T = 0.17 and made its test log-loss worse (0.253 -> 0.372); with sd 0.5, T = 0.41 and 0.223.
    On flowers' 881 validation images the prior changed no temperature by 0.01 (docs/benchmarks.md, calibration).
    A grid in log T (61 points, 0.15 apart), then golden-section search around its best point (the objective need
    not be convex in T); 241 points and 60 steps (3x the time) moved no fitted T by 1e-7.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(z) == 0:
        return 1.0
    zy = z[np.arange(len(y)), y]

    def objective(u: float) -> float:  # u = log(1 / T)
        s = z * np.exp(u)
        m = s.max(1)
        ce = float(np.sum(np.log(np.exp(s - m[:, None]).sum(1)) + m - zy * np.exp(u)))
        return ce + (u * u / (2 * prior_sd**2) if prior_sd else 0.0)

    grid = np.linspace(np.log(0.01), np.log(100.0), 61)
    i = int(np.argmin([objective(u) for u in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = objective(b)
    return float(np.exp(-(lo + hi) / 2))


def chosen_temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The temperature a model uses, and the one fitted: the fitted one only where it lowers these images' log-loss
    by more than chance (the 95% t-interval of the per-image change below zero), else 1.

    Why: feature extraction's temperature is fitted on its fold heads' out-of-fold judgements and applied to the
    final head, which trained on every label and is sharper. With the exact head at the regularisation chosen out of
    fold, the fitted temperature stayed between 0.91 and 1.12 on five folders at 20 labels a class and at every label,
    never lowered the out-of-fold log-loss beyond chance, and applied anyway it made test calibration worse as often
    as better (mean ECE 0.0276 against 0.0274 without; flowers at 20 a class 0.036 -> 0.054; docs/benchmarks.md). A
    fine-tuned network (label smoothing: under-confident) gets its temperature, which lowers the loss clearly."""
    from engine.trust.scores import paired_mean_difference

    y = np.asarray(y, dtype=np.int64)
    fitted = fit_temperature(logits, y)
    if len(y) < 2 or fitted == 1.0:
        return 1.0, fitted
    z = np.asarray(logits, dtype=np.float64)

    def nll(t: float) -> np.ndarray:
        s = z / t
        m = s.max(1, keepdims=True)
        return (np.log(np.exp(s - m).sum(1)) + m[:, 0]) - s[np.arange(len(y)), y]

    _, (_, hi) = paired_mean_difference(nll(fitted) - nll(1.0))
    return (fitted if hi < 0 else 1.0), fitted


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))))


def scaled_log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    """Log-loss after the temperature that suits these logits best: how well a model ranks its answers, whatever
    its overall confidence (a model trained with label smoothing is under-confident; its raw loss is not
    comparable with one trained without; --mode auto compares this)."""
    return log_loss(probabilities(logits, fit_temperature(logits, y)), y)


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, the images in it, their mean confidence and their accuracy."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for i in range(bins):
        inside = (conf > edges[i]) & (conf <= edges[i + 1]) if i else (conf >= 0) & (conf <= edges[1])
        n = int(inside.sum())
        out.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "n": n,
                "confidence": float(conf[inside].mean()) if n else None,
                "accuracy": float(correct[inside].mean()) if n else None,
            }
        )
    return out


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the images in each."""
    total = len(y)
    if not total:
        return float("nan")
    return float(
        sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, y, bins) if b["n"])
    )


def ece_noise_floor(probs: np.ndarray, bins: int = ECE_BINS, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would still show on these images: each image's top answer drawn right
    with exactly its confidence, ``draws`` times, the mean ECE. On a few hundred images it is a few points, so an
    ECE near it is as low as these images can measure."""
    conf = probs.max(1).astype(np.float64)
    if not len(conf):
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] as reliability_bins
    conf_b = np.bincount(b, conf, minlength=bins)
    right = np.random.default_rng(seed).random((draws, len(conf))) < conf
    acc_b = np.stack([np.bincount(b, r, minlength=bins) for r in right])
    return float(np.abs(acc_b - conf_b).sum(1).mean() / len(conf))


def coverage_curve(probs: np.ndarray, y: np.ndarray) -> list[dict]:
    """Accuracy against coverage: answering only images whose confidence is at least each threshold.

    One point per distinct confidence (from the most confident image down), thinned to at most ~100 points.
    """
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    n = len(conf)
    if not n:
        return []
    cum = np.cumsum(correct)
    last = np.r_[conf[1:] != conf[:-1], True]  # the last image with each distinct confidence
    idx = np.flatnonzero(last)
    if len(idx) > 100:
        idx = idx[np.unique(np.linspace(0, len(idx) - 1, 100).round().astype(int))]
    return [{"threshold": float(conf[i]), "coverage": (i + 1) / n, "accuracy": float(cum[i] / (i + 1))} for i in idx]


def threshold_for(curve: list[dict], target_accuracy: float) -> tuple[float, float, float] | None:
    """(threshold, coverage, accuracy) of the lowest threshold whose answered images are at least
    ``target_accuracy`` right (the most images answered); None when no threshold reaches it. When answering every
    image reaches it, the threshold is 0: a new image less confident than every measured one is not marked unsure
    for that alone."""
    ok = [p for p in curve if p["accuracy"] >= target_accuracy]
    if not ok:
        return None
    best = max(ok, key=lambda p: p["coverage"])
    return (0.0 if best["coverage"] >= 1.0 else best["threshold"]), best["coverage"], best["accuracy"]


def _halves(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of indices into two halves, stratified by class."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a.extend(idx[::2])
        b.extend(idx[1::2])
    return np.array(sorted(a), dtype=np.int64), np.array(sorted(b), dtype=np.int64)


def calibrate(
    val_logits: np.ndarray,
    val_y: np.ndarray,
    test_logits: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
    seed: int = 0,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
) -> dict:
    """Fit the temperature on validation and measure it honestly; the ``calibration`` block of metrics.json.

    Returns ``temperature`` (fitted on all of validation, used where it clearly helps: :func:`chosen_temperature`),
    ``measured_on``, ECE and log-loss
    ``before``/``after``, ``bins`` (reliability diagram, after), ``coverage`` (accuracy against coverage, after) and
    ``min_confidence`` for ``target_accuracy`` (see :func:`default_threshold`).
    """
    val_y = np.asarray(val_y, dtype=np.int64)
    temperature, fitted = chosen_temperature(val_logits, val_y)
    if test_logits is not None and len(test_logits):
        measured_on = "test"
        raw, y = np.asarray(test_logits, np.float32), np.asarray(test_y, dtype=np.int64)
        after = probabilities(raw, temperature)
    else:
        measured_on = "validation, two-fold"
        a, b = _halves(val_y, seed)
        raw, y = np.asarray(val_logits, np.float32), val_y
        after = np.empty_like(raw)
        for fit_idx, eval_idx in ((a, b), (b, a)):
            if len(eval_idx):
                t = chosen_temperature(raw[fit_idx], y[fit_idx])[0] if len(fit_idx) else 1.0
                after[eval_idx] = probabilities(raw[eval_idx], t)
    before = probabilities(raw, 1.0)
    curve = coverage_curve(after, y)
    threshold = default_threshold(curve, target_accuracy)
    return {
        "temperature": temperature,
        "temperature_fitted": fitted,  # (used only where it lowered the log-loss beyond chance: chosen_temperature)
        "measured_on": measured_on,
        "n": int(len(y)),
        "bins_count": ECE_BINS,
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "ece_noise_floor": ece_noise_floor(after),
        "log_loss_before": log_loss(before, y),
        "log_loss_after": log_loss(after, y),
        "bins": reliability_bins(after, y),
        "coverage": curve,
        **threshold,
    }


def default_threshold(curve: list[dict], target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """The "not sure" threshold saved with a new model: the lowest confidence at which the answered images were at
    least ``target_accuracy`` right (measured as above). When no threshold reaches the target, none is set
    (min_confidence 0: nothing is marked unsure) and the target is recorded as not reached."""
    hit = threshold_for(curve, target_accuracy)
    if hit is None:
        return {
            "target_accuracy": target_accuracy,
            "min_confidence": 0.0,
            "expected_coverage": 1.0,
            "expected_accuracy": curve[-1]["accuracy"] if curve else None,
            "target_reached": False,
        }
    t, cov, acc = hit
    return {
        "target_accuracy": target_accuracy,
        "min_confidence": t,
        "expected_coverage": cov,
        "expected_accuracy": acc,
        "target_reached": True,
    }


def in_words(bins: list[dict], near: float = 0.9) -> str:
    """ "When it says 90%, it is right 88% of the time": the bin around ``near`` (or the fullest high one)."""
    filled = [b for b in bins if b["n"]]
    if not filled:
        return ""
    b = min(filled, key=lambda b: (abs((b["lo"] + b["hi"]) / 2 - near), -b["n"]))
    return (
        f"When it says {100 * b['confidence']:.0f}%, it is right {100 * b['accuracy']:.0f}% of the time "
        f"({b['n']} images)."
    )


def set_unsure_threshold(run_dir: str, target_accuracy: float) -> dict:
    """Save a new "not sure" threshold with a run: the one that made validation images ``target_accuracy`` right
    (from its metrics.json coverage curve). model.json is rewritten atomically; returns its new ``unsure`` block."""
    import os

    from engine.events import EngineError
    from engine.runs import atomic_write_json, json_safe, read_json, validate_model_json

    meta_path = os.path.join(run_dir, "model.json")
    meta = read_json(meta_path)
    validate_model_json(meta, meta_path)
    curve = (read_json(os.path.join(run_dir, "metrics.json")).get("calibration") or {}).get("coverage")
    if not curve:
        raise EngineError(
            "This run has no accuracy-against-coverage measurement (saved before calibration existed, "
            "or without validation images): it cannot pick a threshold from a target."
        )
    meta["unsure"] = json_safe(default_threshold(curve, target_accuracy))
    atomic_write_json(meta_path, meta)
    return meta["unsure"]
