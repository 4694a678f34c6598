"""Predict folders or files: every image file -> one CSV row (``path, prediction, confidence, p_<class>..., error``)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import PredictConfig
from .data import walk_images
from .device import resolve_device
from .events import Callbacks, Cancelled, CancelToken, EngineError, Phase, PredictionRow, Progress
from .forward import Forward, probabilities
from .loop import RateMeter
from .model import load_model
from .pixels import iter_decoded, stack_on
from .runs import atomic_write_text, csv_text


def csv_header(classes: list[str], top_k: int = 1) -> list[str]:
    head = ["path", "prediction", "confidence"] + [f"p_{c}" for c in classes]
    if top_k > 1:
        head.append("top_k")
    return head + ["error"]


def csv_row(row: PredictionRow, classes: list[str], top_k: int = 1) -> list[str]:
    if row.error:
        out = [row.path, "", ""] + [""] * len(classes)
        if top_k > 1:
            out.append("")
        return out + [row.error]
    out = [row.path, row.prediction, f"{row.confidence:.6f}"] + [f"{p:.6f}" for p in row.probabilities]
    if top_k > 1:
        order = np.argsort(-np.asarray(row.probabilities))[:top_k]
        out.append("; ".join(f"{classes[i]}:{row.probabilities[i]:.4f}" for i in order))
    return out + [""]


def predictions_csv(rows: Sequence[PredictionRow], classes: list[str], top_k: int = 1) -> str:
    """The CSV text the CLI writes; the GUI's "Export CSV" calls this too, so both files are identical."""
    return csv_text(csv_header(classes, top_k), (csv_row(r, classes, top_k) for r in rows))


def predict_paths(loaded, paths: Sequence[str], device, batch_size: int | None = None,
                  callbacks: Callbacks | None = None, cancel: CancelToken | None = None,
                  on_chunk=None) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Class probabilities for ``paths``; decodes ahead in threads and keeps no pixels beyond the current chunk.

    Returns (probs (K,C) for the K readable files, their indices, [(path, reason)] for the rest); raises
    :class:`Cancelled` when stopped. ``on_chunk(indices, probs, errors)`` is called per chunk in file order (used
    to stream rows).
    """
    import torch

    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    pre = loaded.preprocessing
    # Folded copy (the loaded model is left as it is, on the CPU) at the embedding's CPU batch size: 1,052 images on
    # 2 cores went from 26-27 to 49-53 images/s with batch 4.
    forward = Forward.frozen(loaded.model, pre, device, batch_size)
    bs = forward.batch_size
    probs_all, kept, errors = [], [], []
    meter = RateMeter(len(paths))
    done = 0
    with torch.inference_mode():
        for group in iter_decoded(paths, pre, pre.size, chunk=max(bs, 32), cancel=cancel,
                                  overlap=device.type != "cpu", device=device):
            good = [(i, a) for i, a, e in group if a is not None]
            bad = [(i, e) for i, a, e in group if a is None]
            logits = [forward(stack_on([a for _, a in good[s:s + bs]], device)).cpu().numpy()
                      for s in range(0, len(good), bs)]
            p = probabilities(np.concatenate(logits)) if logits else np.zeros((0, len(loaded.classes)), np.float32)
            idx = [i for i, _ in good]
            probs_all.append(p)
            kept.extend(idx)
            errors.extend((paths[i], e) for i, e in bad)
            if on_chunk is not None:
                on_chunk(idx, p, bad)
            done += len(group)
            cb.on_progress(Progress(Phase.PREDICTING, done, len(paths), meter.rate(done), meter.eta(done)))
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, len(loaded.classes)), np.float32)
    return probs, kept, errors


@dataclass
class PredictResult:
    rows: list[PredictionRow]
    classes: list[str]
    csv_path: str | None
    cancelled: bool = False
    seconds: float = 0.0
    n_errors: int = field(default=0)


def _collect(inputs: list, cancel: CancelToken) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under the given folders (recursive) and files, in order; folders that could not be listed."""
    for item in inputs:
        if not os.path.exists(item):
            raise EngineError(f"Not found: {item}")
    walk_errors: list[tuple[str, str]] = []
    paths: list[str] = []
    for item in inputs:  # a file named explicitly is predicted whatever its extension (or says why not)
        paths += walk_images(item, cancel, lambda p, r: walk_errors.append((p, r))) if os.path.isdir(item) \
            else [os.fspath(item)]
    if not paths:
        unlisted = "".join(f"; could not list {p}: {r}" for p, r in walk_errors)
        raise EngineError(f"No image files (jpg, png, bmp, gif, webp, tif) found under "
                          f"{', '.join(map(str, inputs))}{unlisted}.")
    return paths, walk_errors


def predict_folder(config: PredictConfig, callbacks: Callbacks | None = None,
                   cancel: CancelToken | None = None) -> PredictResult:
    """Predict every image file under ``config.images`` (folders searched recursively, and image files; rows in that
    order). Rows stream through ``callbacks.on_predictions``.

    The CSV (``config.csv``, optional) is written atomically at the end; a cancelled job writes no CSV (a partial
    file could be mistaken for a complete one) but returns the rows done so far.
    """
    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    loaded = load_model(config.run)
    classes = loaded.classes
    images = config.images
    inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    done: list[PredictionRow] = []
    try:
        paths, walk_errors = _collect(inputs, cancel)
        # A subfolder that could not be listed is a row with its reason, first, so nobody takes the CSV for complete.
        done = [PredictionRow(p, "", 0.0, (), r) for p, r in walk_errors]
        if done:
            cb.on_log(f"Could not list {len(done)} folder(s): " + "; ".join(f"{p}: {r}" for p, r in walk_errors))
            cb.on_predictions(list(done))
        rows: list[PredictionRow | None] = [None] * len(paths)
        emitted = 0

        def on_chunk(idx, probs, bad):
            nonlocal emitted
            for i, p in zip(idx, probs):
                j = int(p.argmax())
                rows[i] = PredictionRow(paths[i], classes[j], float(p[j]), tuple(float(v) for v in p))
            for i, e in bad:
                rows[i] = PredictionRow(paths[i], "", 0.0, (), e)
            end = emitted
            while end < len(rows) and rows[end] is not None:
                end += 1
            if end > emitted:
                cb.on_predictions(rows[emitted:end])
                done.extend(rows[emitted:end])
                emitted = end

        predict_paths(loaded, paths, resolve_device(config.device), config.batch_size, cb, cancel, on_chunk)
    except Cancelled:
        cb.on_log(f"Prediction stopped after {len(done)} files; no CSV written.")
        return PredictResult(done, classes, None, cancelled=True, seconds=time.perf_counter() - t0)
    if config.csv:
        try:
            atomic_write_text(config.csv, predictions_csv(done, classes, config.top_k))
        except OSError as exc:
            raise EngineError(f"Cannot write {config.csv}: {exc.strerror or exc}. Choose another file.") from exc
    n_err = sum(1 for r in done if r.error)
    return PredictResult(done, classes, config.csv, seconds=time.perf_counter() - t0, n_errors=n_err)
