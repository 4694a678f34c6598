"""What the Model tab says about the open folder: which way to reuse the network, and how long fine-tuning would take
here. Pure functions of the session's fields and dataset, so each follows every setting it reads."""

from __future__ import annotations

from engine.train.auto import MIN_COMPARED, too_few_to_compare


def advice(mode: str, ds) -> str:
    """The recommendation for ``mode`` on ``ds`` (None: no folder open). Agrees with what automatic mode will do:
    under ``MIN_COMPARED`` validation images it keeps feature extraction without trying fine-tuning."""
    if ds is None:
        return (
            "Recommendation: <b>Automatic</b>. It tries feature extraction (seconds) and then "
            "fine-tuning, and keeps whichever gives more reliable answers on your images."
        )
    per_class = len(ds.samples) / max(1, len(ds.classes))
    n_val = len(ds.split("val"))
    if mode == "auto" and too_few_to_compare(n_val):
        return (
            f"Recommendation for this dataset: <b>Automatic</b>. With {n_val} validation images it keeps feature "
            f"extraction without trying fine-tuning: too few to compare the two (at least {MIN_COMPARED} are "
            "needed)."
        )
    if mode == "auto":
        return f"Recommendation for this dataset: <b>Automatic</b>. With about {per_class:.0f} images per class it " + (
            "will most likely keep feature extraction (fine-tuning has little to learn from), but checks."
            if per_class < 150
            else "has enough images for fine-tuning to pay off if your images look unlike "
            "everyday photos; it measures both on your validation images."
        )
    if per_class < 150:
        return (
            f"Recommendation for this dataset: <b>feature extraction</b>. With about {per_class:.0f} images "
            "per class, fine-tuning has little to learn from and can overfit; try it afterwards only if "
            "your images look unlike everyday photos."
        )
    return (
        f"Recommendation for this dataset: start with <b>feature extraction</b> as a baseline (fast), "
        f"then try <b>fine-tuning</b>: with about {per_class:.0f} images per class it often gains a few "
        "points, especially on unusual images. Compare the two runs in the Results tab."
    )


def fine_tuning_estimate(session) -> tuple[str, float] | None:
    """How long fine-tuning the open folder would take here, in words and minutes (None: no folder open), from
    the session's backbone, device, stages and epochs (speeds measured on this machine:
    engine/train/fine_tuning/estimate.py)."""
    from engine.config import DEFAULTS
    from engine.train.fine_tuning import estimate

    ds = session.dataset
    if ds is None:
        return None
    epochs = session.get("epochs") or DEFAULTS["fine-tuning"]["epochs"]
    est = estimate.estimate_fine_tuning(
        session.get("backbone"), session.get("device"), session.get("unfreeze"), len(ds.split("train")), epochs
    )
    return est.text, est.seconds / 60
