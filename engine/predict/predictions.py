"""Predict folders or files: every image file -> one CSV row
(``path, prediction, confidence, p_<class>... [, top_k], status, error``).

Probabilities are calibrated with the run's temperature; ``status`` says whether to trust the answer (see
``engine.events.PredictionRow``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.config import PredictConfig
from engine.data.decode import iter_decoded, stack_on
from engine.data.folder import walk_images
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, PredictionRow, Progress
from engine.meters import RateMeter
from engine.network.device import resolve_device
from engine.network.forward import Forward
from engine.network.model import load_model
from engine.runs import atomic_write_text, csv_text
from engine.trust.calibration import probabilities
from engine.trust.familiarity import knn_distance


def csv_header(classes: list[str], top_k: int = 1) -> list[str]:
    head = ["path", "prediction", "confidence"] + [f"p_{c}" for c in classes]
    if top_k > 1:
        head.append("top_k")
    return head + ["status", "error"]


def csv_row(row: PredictionRow, classes: list[str], top_k: int = 1) -> list[str]:
    if row.error:
        out = [row.path, "", ""] + [""] * len(classes)
        if top_k > 1:
            out.append("")
        return out + ["error", row.error]
    out = [row.path, row.prediction, f"{row.confidence:.6f}"] + [f"{p:.6f}" for p in row.probabilities]
    if top_k > 1:
        order = np.argsort(-np.asarray(row.probabilities))[:top_k]
        out.append("; ".join(f"{classes[i]}:{row.probabilities[i]:.4f}" for i in order))
    return out + [row.status, ""]


def status_of(
    confidence: float, distance: float | None, min_confidence: float, unfamiliar_threshold: float | None
) -> str:
    """``unfamiliar`` before ``unsure`` before ``ok`` (errors never get here)."""
    if distance is not None and unfamiliar_threshold is not None and distance > unfamiliar_threshold:
        return "unfamiliar"
    return "unsure" if confidence < min_confidence else "ok"


def unsure_threshold(loaded, config: PredictConfig) -> float:
    """The confidence below which a prediction is ``unsure``: the config's, else the one saved with the model."""
    if config.min_confidence is not None:
        return config.min_confidence
    if config.target_accuracy is None:
        return loaded.min_confidence
    from engine.runs import read_json
    from engine.trust.calibration import threshold_for

    try:
        curve = (read_json(os.path.join(loaded.run_dir, "metrics.json")).get("calibration") or {}).get("coverage")
    except EngineError:
        curve = None
    if not curve:
        raise EngineError(
            "This run has no accuracy-against-coverage measurement (it was saved before calibration "
            "existed, or without validation images): use --min-confidence instead."
        )
    hit = threshold_for(curve, config.target_accuracy)
    if hit is None:
        best = max(p["accuracy"] for p in curve)
        raise EngineError(
            f"No confidence threshold made validation images {config.target_accuracy:.0%} right "
            f"(the best was {best:.1%}): choose a lower --target-accuracy."
        )
    return hit[0]


def predictions_csv(rows: Sequence[PredictionRow], classes: list[str], top_k: int = 1) -> str:
    """The CSV text the CLI writes; the GUI's "Export CSV" calls this too, so both files are identical."""
    return csv_text(csv_header(classes, top_k), (csv_row(r, classes, top_k) for r in rows))


@dataclass
class Scored:
    """``predict_paths``' answer: for the K readable files (their indices in ``kept``), calibrated probabilities and
    each one's distance to the training images (None for runs saved without their embeddings)."""

    probs: np.ndarray
    distances: np.ndarray | None
    kept: list[int]
    errors: list[tuple[str, str]]


def _onnx_features(loaded, device, engine: str, batch_size: int | None, log):
    """For a feature-extraction run on the CPU: an ONNX Runtime session of its frozen backbone, in the precision its
    training features were made with (so predictions see the same features), or None to use PyTorch."""
    from engine.network import onnx_runtime as ob
    from engine.paths import default_cache_dir

    made = loaded.meta.get("features") or {}
    if loaded.meta.get("mode") != "feature-extraction" or not ob.use_onnx(engine, device):
        return None
    if engine != "onnxruntime" and made.get("engine") != "onnxruntime":
        return None  # trained on PyTorch's features: predict with them too
    from engine.network import depths

    # embedded with the earlier layers' features (the head may not read them); which taps: those the head reads (a
    # run saved with version 1's), else this version's (a head on the final features reads the same ones from both)
    record = loaded.meta.get("depths")
    taps = (depths.version_of(record.get("taps")) or depths.VERSION) if record else 0
    fp32, int8 = ob.graph_paths(default_cache_dir(), loaded.meta["backbone"], loaded.meta.get("weights_id", ""), taps)
    if made.get("graph") and os.path.isfile(made["graph"]):  # the very graph the training features came from
        if made.get("precision") == "int8":
            int8 = made["graph"]
        else:
            fp32 = made["graph"]
    precision = made.get("precision", "fp32")
    if precision == "int8" and not os.path.isfile(int8):
        if log:
            log(
                "This run's int8 graph is not on this machine: predicting with fp32 features (they agreed with "
                "int8 when it was trained)"
            )
        precision = "fp32"
    if not os.path.isfile(fp32):
        os.makedirs(os.path.dirname(fp32), exist_ok=True)
        net = loaded.model.backbone
        was = (net.taps, net.tap_version)
        try:
            ob.export_graph(net.with_taps(bool(taps), taps or None), loaded.preprocessing, fp32)
        finally:
            net.with_taps(*was)
    return ob.OrtForward(int8 if precision == "int8" else fp32, loaded.preprocessing, precision, batch_size or 16)


def _pretrained_forward(loaded, device, engine: str, batch_size: int | None, log):
    """For a fine-tuning run whose "unfamiliar" compares the pretrained backbone's embeddings: that backbone (ONNX
    Runtime fp32 on the CPU, else PyTorch), or None when its weights cannot be loaded here (no "unfamiliar" marks,
    said in the log)."""
    from engine.network import onnx_runtime as ob
    from engine.network.backbones import load_backbone
    from engine.paths import default_cache_dir

    name = loaded.meta["backbone"]
    try:
        bb = load_backbone(name, (loaded.meta.get("config") or {}).get("weights"))
    except EngineError as exc:
        log(f"No 'unfamiliar' marks: the pretrained backbone could not be loaded ({exc})")
        return None
    if bb.weights_id != loaded.meta.get("weights_id", bb.weights_id):
        log("No 'unfamiliar' marks: the pretrained weights here differ from those the run was trained from")
        return None
    if ob.use_onnx(engine, device):
        graphs = ob.ensure_graphs(default_cache_dir(), name, bb, None, log)
        ort = ob.OrtForward(graphs.fp32, bb.preprocessing, "fp32", batch_size or 16)
        size = bb.preprocessing.size
        # a small-pictures run decodes at its own size (engine/train/fine_tuning/recipe.py); the pretrained backbone
        # takes its own
        if loaded.preprocessing.size == size:
            return ort
        from engine.data.decode import resize_batch

        return lambda u8: ort(resize_batch(u8, bb.preprocessing, size))
    return Forward.frozen(bb.net, bb.preprocessing, device, batch_size)  # (Forward resizes to its own size)


def predict_paths(
    loaded,
    paths: Sequence[str],
    device,
    batch_size: int | None = None,
    callbacks: Callbacks | None = None,
    cancel: CancelToken | None = None,
    on_chunk=None,
    engine: str = "torch",
) -> Scored:
    """Calibrated class probabilities (and distances to the training images) for ``paths``; decodes ahead in threads
    and keeps no pixels beyond the current chunk. Raises :class:`Cancelled` when stopped.

    ``on_chunk(indices, probs, distances or None, errors)`` is called per chunk in file order (to stream rows).
    """
    import torch

    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    pre = loaded.preprocessing
    train_emb = loaded.train_embeddings()
    onnx = _onnx_features(loaded, device, engine, batch_size, cb.on_log)
    # Folded copy (the loaded model is left as it is, on the CPU) at the embedding's CPU batch size: 1,052 images on
    # 2 cores went from 26-27 to 49-53 images/s with batch 4.
    forward = onnx or Forward.frozen(loaded.model, pre, device, batch_size)
    classifier = loaded.model if onnx else forward.net
    head = classifier.head
    bs = forward.batch_size
    pooled: list = []  # fine-tuning runs: what "unfamiliar" compares (pretrained embeddings, or frozen stages pooled)
    hook = pretrained = None
    if train_emb is not None and loaded.familiar_pretrained:
        pretrained = _pretrained_forward(loaded, device, engine, batch_size, cb.on_log)
        train_emb = train_emb if pretrained is not None else None
    elif train_emb is not None and loaded.familiar_frozen_stages and not onnx:
        from engine.train.fine_tuning.inputs import pooled_prefix_hook

        hook = pooled_prefix_hook(forward.net.backbone, loaded.familiar_frozen_stages, pooled)
        train_emb = train_emb if hook is not None else None
    probs_all, dist_all, kept, errors = [], [], [], []
    meter = RateMeter(len(paths))
    done = 0
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if hook is not None:
            stack.callback(hook.remove)
        for group in iter_decoded(
            paths, pre, pre.size, chunk=max(bs, 32), cancel=cancel, overlap=device.type != "cpu", device=device
        ):
            good = [(i, a) for i, a, e in group if a is not None]
            bad = [(i, e) for i, a, e in group if a is None]
            batches = [stack_on([a for _, a in good[s : s + bs]], device) for s in range(0, len(good), bs)]
            if onnx:
                feats = [torch.from_numpy(onnx(b)) for b in batches]
            else:
                feats = [forward(b, module=forward.net.backbone) for b in batches]
            f = torch.cat(feats) if feats else torch.zeros(0, head.in_features, device=device)
            if pretrained is not None:  # the same stacked pixels, through the pretrained backbone
                pooled.extend(torch.as_tensor(pretrained(b)) for b in batches)
            # (a graph that also computes the earlier layers' features may serve a head on the final ones: they
            # come first)
            p = probabilities(classifier.classify(f).float().cpu().numpy(), loaded.temperature)
            familiar = torch.cat(pooled) if pooled else f[:, : loaded.final_dim]
            pooled.clear()
            d = knn_distance(familiar.cpu().numpy(), train_emb) if train_emb is not None and len(f) else None
            idx = [i for i, _ in good]
            probs_all.append(p)
            if d is not None:
                dist_all.append(d)
            kept.extend(idx)
            errors.extend((paths[i], e) for i, e in bad)
            if on_chunk is not None:
                on_chunk(idx, p, d, bad)
            done += len(group)
            cb.on_progress(Progress(Phase.PREDICTING, done, len(paths), meter.rate(done), meter.eta(done)))
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, len(loaded.classes)), np.float32)
    distances = np.concatenate(dist_all) if train_emb is not None and dist_all else None
    return Scored(probs, distances, kept, errors)


@dataclass
class PredictResult:
    rows: list[PredictionRow]
    classes: list[str]
    csv_path: str | None
    cancelled: bool = False
    seconds: float = 0.0
    n_errors: int = field(default=0)
    sorted_summary: str = ""  # with sort_into: how many images went where


def _collect(inputs: list, cancel: CancelToken) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under the given folders (recursive) and files, in order; folders that could not be listed."""
    for item in inputs:
        if not os.path.exists(item):
            raise EngineError(f"Not found: {item}")
    walk_errors: list[tuple[str, str]] = []
    paths: list[str] = []
    for item in inputs:  # a file named explicitly is predicted whatever its extension (or says why not)
        paths += (
            walk_images(item, cancel, lambda p, r: walk_errors.append((p, r)))
            if os.path.isdir(item)
            else [os.fspath(item)]
        )
    if not paths:
        unlisted = "".join(f"; could not list {p}: {r}" for p, r in walk_errors)
        raise EngineError(
            f"No image files (jpg, png, bmp, gif, webp, tif) found under {', '.join(map(str, inputs))}{unlisted}."
        )
    return paths, walk_errors


def predict_folder(
    config: PredictConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None
) -> PredictResult:
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
    min_conf = unsure_threshold(loaded, config)
    if not loaded.calibrated:
        cb.on_log(
            "This run was saved before calibration existed: its probabilities are the network's own "
            "(temperature 1), and no image can be marked unfamiliar."
        )
    images = config.images
    inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    done: list[PredictionRow] = []
    try:
        paths, walk_errors = _collect(inputs, cancel)
        # A subfolder that could not be listed is a row with its reason, first, so nobody takes the CSV for complete.
        done = [PredictionRow(p, "", 0.0, (), r, "error") for p, r in walk_errors]
        if done:
            cb.on_log(f"Could not list {len(done)} folder(s): " + "; ".join(f"{p}: {r}" for p, r in walk_errors))
            cb.on_predictions(list(done))
        rows: list[PredictionRow | None] = [None] * len(paths)
        emitted = 0

        def on_chunk(idx, probs, distances, bad):
            nonlocal emitted
            for n, (i, p) in enumerate(zip(idx, probs)):
                j = int(p.argmax())
                status = status_of(
                    float(p[j]),
                    None if distances is None else float(distances[n]),
                    min_conf,
                    loaded.unfamiliar_threshold,
                )
                rows[i] = PredictionRow(paths[i], classes[j], float(p[j]), tuple(float(v) for v in p), "", status)
            for i, e in bad:
                rows[i] = PredictionRow(paths[i], "", 0.0, (), e, "error")
            end = emitted
            while end < len(rows) and rows[end] is not None:
                end += 1
            if end > emitted:
                cb.on_predictions(rows[emitted:end])
                done.extend(rows[emitted:end])
                emitted = end

        predict_paths(
            loaded, paths, resolve_device(config.device), config.batch_size, cb, cancel, on_chunk, config.engine
        )
    except Cancelled:
        cb.on_log(f"Prediction stopped after {len(done)} files; no CSV written.")
        return PredictResult(done, classes, None, cancelled=True, seconds=time.perf_counter() - t0)
    if config.csv:
        try:
            atomic_write_text(config.csv, predictions_csv(done, classes, config.top_k))
        except OSError as exc:
            raise EngineError(f"Cannot write {config.csv}: {exc.strerror or exc}. Choose another file.") from exc
    n_err = sum(1 for r in done if r.error)
    res = PredictResult(done, classes, config.csv, seconds=time.perf_counter() - t0, n_errors=n_err)
    if config.sort_into:
        from engine.predict.sorting import SortConfig, sort_into

        sorted_ = sort_into(SortConfig(done, config.sort_into), cb, cancel)
        res.sorted_summary = sorted_.summary(config.sort_into)
        cb.on_log(res.sorted_summary)
    return res
