"""Fine-tuning small pictures at their own size: the input size, the stages trained, the backbone's learning rate.

A picture of 128 px upscaled to the backbone's 224 px input holds no more detail than at 128, but costs 3x as much
per layer. On a Lite backbone the frozen stages run once per image (engine/train/fine_tuning/inputs.py), so at 128 px
an epoch can
train every stage but the stem and the first two block groups (13 of Lite0's 16 blocks) in about the time the last 3
stages take at 224. Measured on flowers (128 px files with no more detail than 50-60 px pictures: a 64 px round trip
changes them by 45.6 dB PSNR; 5 classes; validation accuracy, docs/benchmarks.md): feature extraction 0.771; the
last 3 stages at 224 px 0.780; all but the first 3 stages at 128 px 0.819 with the backbone at 0.1x the head's
learning rate, 0.823 at 0.3x (validation loss 0.596 -> 0.533), 0.833 at 1x, which on the 483 training pictures of
the "pairs" folder collapsed to chance (0.3x: 1.000, 0.1x: 0.983). Only the early stages (edges and textures at full
resolution) stay as ImageNet taught them; what has to learn how blurred, drawn or synthetic pictures look trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SMALL_SIDE = 160  # pictures whose median shorter side is at most this are "small"
SMALL_SIZE = 128  # the input size fine-tuning uses for them
SMALL_FROZEN = 3  # stages --unfreeze auto leaves frozen for them: the stem and the first two block groups
DEFAULT_UNFREEZE = 3  # stages --unfreeze auto trains otherwise (the last two block groups and the head conv)
LR_MULT, SMALL_LR_MULT = 0.1, 0.3  # --backbone-lr-mult left to auto: otherwise / small pictures
SAMPLE = 200  # headers read to measure a folder's picture size


@dataclass(frozen=True)
class Recipe:
    size: int  # input size fine-tuning trains and predicts at
    unfreeze: int | str  # the stages it trains
    lr_mult: float  # the backbone's learning rate over the head's
    small: bool  # the small-pictures recipe applies
    median_side: int | None  # measured shorter side (median over a sample), None when not measured
    reason: str  # one sentence for the log and metrics.json

    def to_dict(self) -> dict:
        return {
            "input_size": self.size,
            "unfreeze": self.unfreeze,
            "backbone_lr_mult": self.lr_mult,
            "small_pictures": self.small,
            "median_shorter_side": self.median_side,
            "reason": self.reason,
        }


def median_shorter_side(paths: list[str], sample: int = SAMPLE) -> int | None:
    """The median shorter side of up to ``sample`` of ``paths`` (evenly spaced), from the files' headers only."""
    import numpy as np
    from PIL import Image

    step = max(1, len(paths) // sample)
    sides = []
    for p in paths[::step][:sample]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except Exception:  # an unreadable file is skipped (and reported) by decoding; here it only doesn't count
            continue
    return int(np.median(sides)) if sides else None


def choose(
    backbone, unfreeze, small_images: str, paths: list[str], cached_path, lr_mult: float | None = None
) -> Recipe:
    """The fine-tuning recipe for these training images. Small pictures (``small_images`` "auto", a Lite backbone
    whose frozen stages can run once: ``cached_path(n_trained)``) train at ``SMALL_SIZE``, and ``unfreeze="auto"``
    then trains all but ``SMALL_FROZEN`` stages; otherwise the backbone's own input size and, for "auto",
    ``DEFAULT_UNFREEZE`` stages. A number of stages (or "all") given by the user is kept either way."""
    pre = backbone.preprocessing
    n_stages = len(getattr(backbone.net, "stage_names", []) or [])
    small_unfreeze = n_stages - SMALL_FROZEN if unfreeze == "auto" else unfreeze
    plain = Recipe(
        pre.size,
        DEFAULT_UNFREEZE if unfreeze == "auto" else unfreeze,
        lr_mult or LR_MULT,
        False,
        None,
        f"fine-tuning at the backbone's {pre.size} px input",
    )
    if (
        small_images != "auto"
        or getattr(backbone.net, "kind", None) != "lite"
        or pre.size <= SMALL_SIZE
        or small_unfreeze == "all"
        or not cached_path(small_unfreeze)
    ):
        return plain
    side = median_shorter_side(paths)
    if side is None or side > SMALL_SIDE:
        return replace(plain, median_side=side)
    return Recipe(
        SMALL_SIZE,
        small_unfreeze,
        lr_mult or SMALL_LR_MULT,
        True,
        side,
        f"your pictures are small (median shorter side {side} px): fine-tuning trains at {SMALL_SIZE} px "
        f"(upscaling to {pre.size} px adds no detail), where an epoch costs a third as much"
        + (f" and can afford to train {small_unfreeze} of {n_stages} stages" if unfreeze == "auto" else ""),
    )


def at_size(backbone, size: int):
    """``backbone`` with its preprocessing at ``size`` px (the same network and weights)."""
    if backbone.preprocessing.size == size:
        return backbone
    return replace(backbone, preprocessing=replace(backbone.preprocessing, size=size, resize=size))
