"""``evaluate``: score a labelled folder with a trained run (every image counts; figures: engine/trust/scores.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from engine.config import EvaluateConfig
from engine.data.folder import scan
from engine.events import Callbacks, Cancelled, CancelToken, EngineError
from engine.network.device import resolve_device
from engine.network.model import load_model
from engine.predict.predictions import predict_paths
from engine.trust.calibration import expected_calibration_error, log_loss
from engine.trust.scores import classification_metrics


@dataclass
class EvaluateResult:
    metrics: dict
    skipped: list[tuple[str, str]]
    cancelled: bool = False


def evaluate(
    config: EvaluateConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None
) -> EvaluateResult:
    """Score a labelled folder (either layout; every image counts) with a saved run."""
    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    loaded = load_model(config.run)
    skipped: list[tuple[str, str]] = []
    try:
        ds = scan(config.data, val_split=0.0, test_split=0.0, cancel=cancel, progress=cb.on_progress)
        skipped = ds.skipped
        unknown = [c for c in ds.classes if c not in loaded.classes]
        if unknown:
            raise EngineError(
                f"{config.data} has classes the model does not know: {', '.join(unknown)}. "
                f"The model knows: {', '.join(loaded.classes)}."
            )
        index = {c: i for i, c in enumerate(loaded.classes)}
        paths = [s.path for s in ds.samples]
        labels = np.array([index[ds.classes[s.label]] for s in ds.samples])
        scored = predict_paths(
            loaded, paths, resolve_device(config.device), config.batch_size, cb, cancel, engine=config.engine
        )
    except Cancelled:
        return EvaluateResult({}, skipped, cancelled=True)
    y = labels[scored.kept]
    m = classification_metrics(y, scored.probs.argmax(1), loaded.classes)
    if len(y):  # calibrated confidence on this folder (the run's temperature)
        m["log_loss"] = log_loss(scored.probs, y)
        m["ece"] = expected_calibration_error(scored.probs, y)
    if scored.distances is not None and loaded.unfamiliar_threshold is not None:
        m["unfamiliar_share"] = float((scored.distances > loaded.unfamiliar_threshold).mean())
    errors = scored.errors
    m["classes"] = loaded.classes
    m["data"] = os.path.abspath(config.data)
    return EvaluateResult(m, skipped + errors)
