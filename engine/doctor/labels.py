"""The dataset doctor's wrong-label findings, listed only where they are likely true.

Every image is judged out of sample (feature extraction's cross-fitted head, engine/train/probe.py: its features and
regularisation chosen on this folder, so no image is judged by a head fitted on it) and the judgements are
calibrated (one temperature fitted on them). An image is a candidate when another class comes first and its given
class gets less than a level ``q``.

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

The list is the largest with an estimated precision of at least ``MIN_PRECISION`` whose size is also beyond what
chance gives (right labels drawn as the probabilities say would list ``N`` or more with probability at most
``CHANCE``: a Poisson tail, one mislabelled image among confident right ones counts); where no level reaches that,
nothing is listed and the check says why
(:func:`unchecked_note`). This is the confident-learning idea (Northcutt et al. 2021: count what calibrated
out-of-sample probabilities cannot explain) applied to the one rule the app lists by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc

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
    probe = fit_probe(
        feats, y, folds, num_classes, blocks, k=K_FOLDS, stats=feats, seed=seed, cancel=cancel, on_progress=progress
    )
    return probabilities(probe.oof_logits, fit_temperature(probe.oof_logits, y))


def check_labels(probs: np.ndarray, y: np.ndarray, min_precision: float = MIN_PRECISION) -> LabelCheck:
    """The wrong-label findings that ``probs`` (calibrated, out of sample) support, at the level of estimated
    precision ``min_precision`` (see the module docstring)."""
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
    best = None
    for i, g in enumerate(levels):  # the level just above each candidate's given probability
        q = np.nextafter(g, np.float32(1))
        listed = i + 1
        expected = float(clean_sum[np.searchsorted(clean, q, side="left")])
        precision = 1.0 - expected / listed
        if precision >= min_precision and gammainc(listed, expected) <= CHANCE:
            best = (q, listed, expected, precision)
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
