"""Predict folders or files: every image file -> one CSV row (``path, prediction, confidence, p_<class>..., error``)."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .events import Callbacks, Cancelled, CancelToken, EngineError, Phase, PredictionRow, Progress
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
                  on_chunk=None) -> tuple[np.ndarray, list[int], list[tuple[str, str]], bool]:
    """Class probabilities for ``paths``; decodes ahead in threads and keeps no pixels beyond the current chunk.

    Returns (probs (K,C) for the K readable files, their indices, [(path, reason)] for the rest, cancelled).
    ``on_chunk(indices, probs, errors)`` is called per chunk in file order (used to stream rows).
    """
    import torch

    from .backbones import fold_batchnorm
    from .features import pick_batch_size
    from .model import make_classifier
    from .pixels import iter_decoded, stack_on

    cb = callbacks or Callbacks()
    pre = loaded.preprocessing
    # A copy with BatchNorm folded into the convolutions (the trained model itself is left as loaded, on the CPU),
    # and the embedding's CPU batch size: 1,052 images on 2 cores went from 26-27 to 49-53 images/s with batch 4.
    model = make_classifier(fold_batchnorm(loaded.model.backbone), len(loaded.classes))
    model.head = copy.deepcopy(loaded.model.head)
    model = model.to(device).eval()
    if device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    bs = batch_size or pick_batch_size(device)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    probs_all, kept, errors = [], [], []
    t0 = time.perf_counter()
    done = 0
    try:
        with torch.inference_mode():
            for group in iter_decoded(paths, pre, pre.size, chunk=max(bs, 32), cancel=cancel,
                                      overlap=device.type != "cpu", device=device):
                good = [(i, a) for i, a, e in group if a is not None]
                bad = [(i, e) for i, a, e in group if a is None]
                chunk_probs = []
                for s in range(0, len(good), bs):
                    part = good[s:s + bs]
                    x = stack_on([a for _, a in part], device).float().sub_(mean).div_(std)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        logits = model(x)
                    chunk_probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
                p = np.concatenate(chunk_probs) if chunk_probs else np.zeros((0, len(loaded.classes)), np.float32)
                idx = [i for i, _ in good]
                probs_all.append(p)
                kept.extend(idx)
                errors.extend((paths[i], e) for i, e in bad)
                if on_chunk is not None:
                    on_chunk(idx, p, bad)
                done += len(group)
                el = time.perf_counter() - t0
                rate = done / el if el > 0 else 0.0
                cb.on_progress(Progress(Phase.PREDICTING, done, len(paths), rate,
                                        (len(paths) - done) / rate if rate else 0.0))
    except Cancelled:
        return np.zeros((0, len(loaded.classes))), kept, errors, True
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, len(loaded.classes)), np.float32)
    return probs, kept, errors, False


@dataclass
class PredictResult:
    rows: list[PredictionRow]
    classes: list[str]
    csv_path: str | None
    cancelled: bool = False
    seconds: float = 0.0
    n_errors: int = field(default=0)


def predict_folder(run_dir: str, folder: str | Sequence[str], csv_path: str | None = None, top_k: int = 1,
                   device: str = "auto", batch_size: int | None = None, callbacks: Callbacks | None = None,
                   cancel: CancelToken | None = None, loaded=None) -> PredictResult:
    """Predict every image file under ``folder`` (recursive); ``folder`` may also be an image file, or a list of
    folders and files (rows in that order). Rows stream through ``callbacks.on_predictions``.

    The CSV is written atomically at the end; a cancelled job writes no CSV (a partial file could be mistaken for
    a complete one) but returns the rows done so far.
    """
    from .data import walk_images
    from .model import load_model
    from .train import resolve_device

    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    loaded = loaded or load_model(run_dir)
    inputs = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    for item in inputs:
        if not os.path.exists(item):
            raise EngineError(f"Not found: {item}")
    walk_errors: list[tuple[str, str]] = []
    paths: list[str] = []
    try:
        for item in inputs:  # a file named explicitly is predicted whatever its extension (or says why not)
            paths += walk_images(item, cancel, lambda p, r: walk_errors.append((p, r))) if os.path.isdir(item) \
                else [os.fspath(item)]
    except Cancelled:
        return PredictResult([], loaded.classes, None, cancelled=True)
    unlisted = "".join(f"; could not list {p}: {r}" for p, r in walk_errors)
    if not paths:
        raise EngineError(f"No image files (jpg, png, bmp, gif, webp, tif) found under "
                          f"{', '.join(map(str, inputs))}{unlisted}.")
    classes = loaded.classes
    # A subfolder that could not be listed is a row with its reason, first, so nobody takes the CSV for complete.
    unlisted_rows = [PredictionRow(p, "", 0.0, (), r) for p, r in walk_errors]
    if unlisted_rows:
        cb.on_log(f"Could not list {len(unlisted_rows)} folder(s){unlisted}")
        cb.on_predictions(unlisted_rows)
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
            emitted = end

    _, _, _, cancelled = predict_paths(loaded, paths, resolve_device(device), batch_size, cb, cancel, on_chunk)
    done = unlisted_rows + [r for r in rows if r is not None]
    if cancelled:
        cb.on_log(f"Prediction stopped after {len(done)} of {len(paths)} files; no CSV written.")
        return PredictResult(done, classes, None, cancelled=True, seconds=time.perf_counter() - t0)
    if csv_path:
        try:
            atomic_write_text(csv_path, predictions_csv(done, classes, top_k))
        except OSError as exc:
            raise EngineError(f"Cannot write {csv_path}: {exc.strerror or exc}. Choose another file.") from exc
    n_err = sum(1 for r in done if r.error)
    return PredictResult(done, classes, csv_path, seconds=time.perf_counter() - t0, n_errors=n_err)
