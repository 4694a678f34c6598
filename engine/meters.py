"""Bookkeeping that every training loop shares: images/s and ETA, early stopping, and what a stage hands back.

The linear head (engine/train/head.py) and fine-tuning (engine/train/fine_tuning/loop.py) both use these, so the two
loops report
progress and stop early the same way, with the same words.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class RateMeter:
    """Images per second and the time left, from the work done since ``start`` (or construction)."""

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self, done: int) -> float:
        el = self.elapsed()
        return done / el if el > 0 else 0.0

    def eta(self, done: int, total: int | None = None) -> float:
        """Seconds left for ``total`` (default: the meter's) at the rate so far."""
        r = self.rate(done)
        left = (self.total if total is None else total) - done
        return left / r if r > 0 else 0.0


class EarlyStopping:
    """Tracks the best validation loss; ``update`` says whether this epoch improved on it, ``should_stop`` whether
    ``patience`` epochs in a row did not (patience 0: never)."""

    def __init__(self, patience: int, min_delta: float = 1e-6) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, 0, 0

    def update(self, loss: float, epoch: int) -> bool:
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, has_validation: bool = True) -> bool:
        return bool(self.patience) and has_validation and self.bad_epochs >= self.patience

    def message(self) -> str:
        return (
            f"Early stopping: validation loss has not improved for {self.patience} epochs "
            f"(best epoch {self.best_epoch})."
        )

    def stop(self, has_validation: bool, log: Callable[[str], None] | None) -> bool:
        """``should_stop``, saying so through ``log`` when it is time."""
        if not self.should_stop(has_validation):
            return False
        if log is not None:
            log(self.message())
        return True


@dataclass
class BackboneFacts:
    """What the run folder records about the backbone (from a loaded backbone, or from the cache without torch)."""

    preprocessing: object  # backbones.Preprocessing
    feature_dim: int
    weights_source: str
    weights_id: str
    device: str  # label for metrics.json

    @classmethod
    def of(cls, backbone, device_text: str) -> BackboneFacts:
        return cls(
            backbone.preprocessing,
            int(backbone.net.feature_dim),
            backbone.weights_source,
            backbone.weights_id,
            device_text,
        )


@dataclass
class TrainOutcome:
    """What a training stage (feature extraction or fine-tuning) hands to ``fit`` for saving.

    ``weights``: the best epoch's full classifier (torch tensors, or NumPy arrays when torch was never imported);
    ``logits``: the best epoch's raw class scores per held-out split ("val", "test"), None where a split is empty;
    ``features``: what "unfamiliar" compares for the "train" and "val" images: the trained network's embeddings, or
    (``familiar_pretrained`` set) the pretrained backbone's.
    """

    weights: dict
    history: list[dict]
    best_epoch: int
    logits: dict[str, np.ndarray | None]
    features: dict[str, np.ndarray | None]
    cancelled: bool = False
    embed_seconds: float | None = None  # feature extraction: time to get every feature (cache or backbone)
    embedded: int = 0  # images the backbone ran on (the rest came from the cache)
    from_cache: int = 0
    train_images_per_s: float | None = None  # fine-tuning: images through the backbone per second while training
    features_seconds: float = 0.0  # fine-tuning: the pass for 'unfamiliar' (pretrained backbone; tuned under torchrun)
    facts: BackboneFacts | None = None  # set by a stage that knows them without a loaded backbone
    features_path: dict | None = None  # feature extraction: which engine and precision made the features
    familiar_pretrained: bool = False  # fine-tuning: "unfamiliar" on the pretrained backbone's embeddings
    held_items: dict | None = None  # the samples behind ``logits`` per split; None: the dataset's splits
    cross_fit: dict | None = None  # feature extraction, cross-fitted: how (engine/train/crossfit.py)
    recipe: dict | None = None  # fine-tuning: input size and stages trained (engine/train/fine_tuning/recipe.py)
    depths: dict | None = None  # feature extraction: which features the head reads and why (train/probe.py)
