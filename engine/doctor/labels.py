"""The dataset doctor's wrong-label findings, listed only where they are likely true.

Every image is judged out of sample (feature extraction's cross-fitted head, engine/train/probe.py: its features and
regularisation chosen on this folder, so no image is judged by a head fitted on it) and the judgements are
calibrated: one temperature, fitted together with a share of labels drawn at random (:func:`fit_with_noise`), so
that the wrong labels being looked for do not soften every probability (one temperature alone, fitted on a product
folder with 20 wrong labels in 360, stayed near 1 and the check found 9 of them; fitted with the noise, 0.09 and all
20). An image is a candidate when another class comes first and its given class gets less than a level ``q``.

How true such a list is depends on the folder. On everyday photos the features are right about most images, so an
image whose label gets 0.1% is almost always mislabelled; on a folder the features classify at about 80% (small
photos, one kind of picture) the heads are confidently wrong about hard pictures far more often than labels are
wrong: 1,722 of 20,000 correctly labelled low-resolution photos were listed under the old rule (another class first,
the given one under 10%). So the level is chosen per folder from an estimate of the list's precision:

* if every label were right and the calibrated probabilities told how often each class is the true one, the rule
  would still list about ``E(q) = sum over images and classes c other than the top one of p(c) [p(c) < q]`` images
  (each image's chance of carrying a label the rule would list);
* it lists ``N(q)``; the excess ``N(q) - E(q)`` estimates the wrong labels among them, and ``1 - E(q) / N(q)`` the
  share of the list that is wrong labels (its precision).

The level is the one where the list's estimated wrong labels exceed its estimated right ones by the most
(``N - 2E``: each further image listed is more likely wrong-labelled than not), among the lists with an estimated
precision of at least ``MIN_PRECISION`` whose size is also beyond what chance gives (right labels drawn as the
probabilities say would list ``N`` or more with probability at most ``CHANCE``: a Poisson tail, one mislabelled
image among confident right ones counts); where no level reaches that, nothing is listed and the check says why
(:func:`unchecked_note`). With the noise fitted, the largest list of estimated precision one half (the rule
before) listed 35-45 images for 20 planted on hand signs and handwriting; this one 20-25, with as many of them.
This is the confident-learning idea (Northcutt et al. 2021: count what calibrated out-of-sample probabilities
cannot explain) applied to the one rule the app lists by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.events import CancelToken
from engine.train.crossfit import K_FOLDS, fold_ids
from engine.train.probe import Blocks, fit_probe
from engine.trust.calibration import fit_temperature, probabilities

MIN_PRECISION = 0.5  # a wrong-label finding is listed only where at least half the list is estimated to be
CHANCE = 0.05  # ... and right labels would make a list that long this rarely
CLEAR = 0.01  # nothing listed: "checked" when one label the features give under this would have been


@dataclass
class LabelCheck:
    """What the check found: the images listed and how sure the list is."""

    listed: list[tuple[int, int, float]]  # (image, the class it more likely belongs to, score: 1 - p(given))
    agreement: float  # out of sample, the share of images whose given class comes first
    precision: float | None = None  # estimated share of ``listed`` that are wrong labels (None: nothing listed)
    level: float | None = None  # images whose given class gets less than this (calibrated) are listed
    expected_if_right: float = 0.0  # how many the rule would list at that level if every label were right
    note: str = ""  # why nothing is listed, when nothing is

    def summary(self) -> str:
        if not self.listed:
            return self.note or "No image looks mislabelled."
        return (
            f"{len(self.listed)} image(s) probably in the wrong class: about {100 * self.precision:.0f}% of such "
            f"findings are wrong labels on this folder (about {self.expected_if_right:.1f} would be listed even if "
            "every label were right)"
        )


def out_of_sample_probs(
    feats: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    seed: int,
    keys: list[str] | None = None,
    blocks: Blocks | None = None,
    cancel: CancelToken | None = None,
    progress=None,
) -> np.ndarray:
    """Each image's calibrated class probabilities from the fold head that never saw it (feature extraction's
    cross-fitting and its head, the same folds: ``keys`` are the images' paths inside their class folders; None:
    their positions)."""
    keys = keys if keys is not None else [str(i) for i in range(len(y))]
    blocks = blocks or Blocks([feats.shape[1]])
    folds = fold_ids(y, keys, seed)
    # (the earlier layers' head kept or not, never mixed, and every choice by the out-of-fold loss as it is: the
    # wrong-label rule was measured on those choices)
    probe = fit_probe(
        feats, y, folds, num_classes, blocks, k=K_FOLDS, stats=feats, seed=seed, cancel=cancel, on_progress=progress,
        shares=(1.0,), scaled=False,
    )  # fmt: skip
    temperature, _ = fit_with_noise(probe.oof_logits, y, num_classes)
    return probabilities(probe.oof_logits, temperature)


def fit_with_noise(logits: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[float, float]:
    """The temperature T and the share of wrong labels e that make the given labels most likely when each is the
    image's true class (probability ``softmax(logits / T)``) with probability 1 - e, and any other class alike
    otherwise. Measured with planted wrong labels (20 in 360-4,300 images, 40 in 20,000) on products, scans, hand signs,
    handwriting, clothing, small and everyday photos: e came out near the planted share where the features separate
    the classes (products 5.6% for 5.6%, scans 4.2% for 4.2%, hand signs 1.7% for 1.7%), lower where they do not
    (flowers 0.0-0.5% for 0.5%), and 0.0% on every folder without planted labels; T sharper than one temperature
    alone where the folder is easy (scans 0.01 against 1.05), about the same where it is hard (flowers 0.84 / 0.86)."""
    from scipy.optimize import minimize  # (here: a training run imports this module but never calls it)

    z = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0 or num_classes < 2:
        return 1.0, 0.0
    start = fit_temperature(z, y)

    def nll(v):  # v = (log T, logit e)
        e = 1.0 / (1.0 + np.exp(-v[1]))
        p = probabilities(z, float(np.exp(np.clip(v[0], np.log(0.01), np.log(100.0)))))[np.arange(len(y)), y]
        return -float(np.log((1 - e) * p + e * (1 - p) / (num_classes - 1) + 1e-300).sum())

    fits = [minimize(nll, [np.log(start), a], method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-4})
            for a in (-6.0, -3.0)]  # fmt: skip
    best = min(fits, key=lambda r: r.fun)
    return float(np.clip(np.exp(best.x[0]), 0.01, 100.0)), float(1.0 / (1.0 + np.exp(-best.x[1])))


def check_labels(probs: np.ndarray, y: np.ndarray, min_precision: float = MIN_PRECISION) -> LabelCheck:
    """The wrong-label findings that ``probs`` (calibrated, out of sample) support, at the level of estimated
    precision ``min_precision`` (see the module docstring)."""
    from scipy.special import gammainc

    n, C = probs.shape
    rows = np.arange(n)
    given = probs[rows, y]
    top = probs.argmax(1)
    agreement = float((top == y).mean()) if n else 0.0
    candidates = np.flatnonzero(top != y)
    if not len(candidates):
        return LabelCheck([], agreement)
    # E(q): the rule's expected list if each label were drawn from its image's calibrated probabilities
    others = probs.copy()
    others[rows, top] = np.inf  # the top class is never listed against
    clean = np.sort(others[np.isfinite(others)])
    clean_sum = np.concatenate([[0.0], np.cumsum(clean, dtype=np.float64)])
    levels = np.sort(given[candidates])
    best, margin = None, -np.inf
    for i, g in enumerate(levels):  # the level just above each candidate's given probability
        q = np.nextafter(g, np.float32(1))
        listed = i + 1
        expected = float(clean_sum[np.searchsorted(clean, q, side="left")])
        precision = 1.0 - expected / listed
        if precision >= min_precision and gammainc(listed, expected) <= CHANCE and listed - 2 * expected > margin:
            best, margin = (q, listed, expected, precision), listed - 2 * expected
    if best is None:
        # Checked and none found, when a label the features give under CLEAR would have been listed on its own;
        # otherwise the folder's own uncertainty hides even such a label: say so.
        clear = float(clean_sum[np.searchsorted(clean, CLEAR, side="left")])
        return LabelCheck([], agreement, note="" if gammainc(1, clear) <= CHANCE else unchecked_note(agreement))
    q, _, expected, precision = best
    listed = [(int(i), int(top[i]), float(1 - given[i])) for i in candidates if given[i] < q]
    return LabelCheck(listed, agreement, precision, float(q), expected)


def unchecked_note(agreement: float) -> str:
    return (
        f"The labels could not be checked on this folder: out of sample the features confuse "
        f"{100 * (1 - agreement):.0f}% of its images, so a picture that looks like another class is as likely hard "
        "as mislabelled (no wrong-label finding reached an estimated precision of one half)."
    )
