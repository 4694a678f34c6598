"""Embed once: frozen-backbone features for a list of files, cached on disk across runs (engine/embed/cache.py).

With ``taps`` (the EfficientNet-Lite family) one forward pass gives the final features and the intermediate stages'
pooled outputs after them (engine/network/depths.py), on PyTorch and ONNX Runtime's fp32 and int8 graphs alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from engine.data.decode import content_hash, iter_decoded, read_bytes, stack_on
from engine.data.known_files import KnownFiles
from engine.embed.cache import FeatureCache
from engine.events import Cancelled, CancelToken, EngineError, Phase, Progress
from engine.meters import RateMeter
from engine.network.backbones import LoadedBackbone, Preprocessing
from engine.network.forward import Forward
from engine.paths import default_cache_dir


def hash_files(
    paths: Sequence[str], cancel: CancelToken | None = None, known: KnownFiles | None = None
) -> tuple[list[str | None], list[tuple[str, str]]]:
    """Each file's content hash (None, with the reason in the errors, for a file that cannot be read); a file
    ``known`` to be unchanged since it was read is not read again."""
    hashes: list[str | None] = [None] * len(paths)
    errors: list[tuple[str, str]] = []
    for i, p in enumerate(paths):
        if cancel is not None and i % 256 == 0:
            cancel.raise_if_cancelled()
        try:
            hashes[i] = (known.hash_of(p) if known is not None else None) or content_hash(read_bytes(p))
        except OSError as exc:
            errors.append((p, f"cannot read file: {exc.strerror or exc}"))
    return hashes, errors


def _sample_pixels(paths: Sequence[str], pre: Preprocessing, n: int, offset: int) -> np.ndarray:
    """(K,3,S,S) uint8 of up to ``n`` readable images spread over ``paths`` (for calibration and checks)."""
    from engine.data.decode import decode_one

    step = max(1, len(paths) // max(1, n))
    out = []
    for p in list(paths)[offset % step :: step][:n]:
        arr, _ = decode_one(p, pre, pre.size)
        if arr is not None:
            out.append(arr.transpose(2, 0, 1))
    return np.stack(out) if out else np.zeros((0, 3, pre.size, pre.size), np.uint8)


def _onnx_forward(paths, backbone, backbone_name, cache_dir, precision, batch_size, log):
    """The ONNX Runtime session to embed with (graphs made once and kept under the cache folder) and the decision."""
    from engine.network import onnx_runtime as ob

    pre = backbone.preprocessing
    graphs_home = cache_dir or default_cache_dir()
    fp32, int8 = ob.graph_paths(graphs_home, backbone_name, backbone.weights_id, ob.taps_of(backbone.net))
    calibration, small = None, False
    if not os.path.isfile(int8):
        small = precision == "auto" and len(paths) < ob.INT8_MIN_IMAGES
        if precision == "int8" or (precision == "auto" and not small):
            calibration = _sample_pixels(paths, pre, ob.CALIBRATION, 0)
        elif small and log:
            log(
                f"Embedding in fp32: {len(paths)} images are too few for the int8 graph's one-time calibration to "
                f"pay off (from {ob.INT8_MIN_IMAGES}; --precision int8 makes it anyway)"
            )
    graphs = ob.ensure_graphs(graphs_home, backbone_name, backbone, calibration, log)
    check = precision == "auto" and os.path.isfile(graphs.int8)
    sample = _sample_pixels(paths, pre, ob.SAMPLE, 1) if check else None
    forward, decision = ob.choose(graphs, pre, precision, sample, batch_size or 16, log, backbone.net.final_dim)
    decision["graphs_seconds"] = round(graphs.seconds, 2)
    if small:
        decision["reason"] = f"int8 graph not made for {len(paths)} images (from {ob.INT8_MIN_IMAGES})"
    decision["graph"] = graphs.int8 if decision["precision"] == "int8" else graphs.fp32
    if calibration is not None and os.path.isfile(int8):
        decision["calibrated_on"] = f"{len(calibration)} images of this folder"
    return forward, decision


def embed_files(
    paths: Sequence[str],
    backbone: LoadedBackbone,
    device,
    *,
    cache_dir: str | None = None,
    backbone_name: str = "",
    batch_size: int | None = None,
    cancel: CancelToken | None = None,
    progress: Callable[[Progress], None] | None = None,
    log: Callable[[str], None] | None = None,
    engine: str = "torch",
    precision: str = "auto",
    taps: bool = False,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]], dict]:
    """Features for ``paths``. Returns (features (K,D) float32, indices of the K readable files, errors, stats).

    ``engine``/``precision``: see engine/network/onnx_runtime.py (``torch`` keeps PyTorch's eager forward). A cache in
    which every image already is, from any path the settings allow, is used as it is; stats["features"] says which
    path made the features. ``taps``: the intermediate stages' features too, after the final ones (where the
    backbone has them: ``stats["final_dim"]`` says where the final ones end).
    """
    from engine.network import depths

    taps = taps and depths.supports(backbone.net)
    was = backbone.net.taps
    backbone.net.with_taps(taps)
    try:
        return _embed_files(paths, backbone, device, cache_dir, backbone_name, batch_size, cancel, progress, log,
                            engine, precision, taps)  # fmt: skip
    finally:
        backbone.net.with_taps(was)


def _embed_files(paths, backbone, device, cache_dir, backbone_name, batch_size, cancel, progress, log, engine,
                 precision, taps):  # fmt: skip
    from engine.network import depths
    from engine.network import onnx_runtime as ob

    pre = backbone.preprocessing
    name = backbone_name or "backbone"
    n = len(paths)
    known = KnownFiles(cache_dir)
    hashes, errors = hash_files(paths, cancel, known)
    onnx = ob.use_onnx(engine, device)
    readable = [h for h in hashes if h is not None]
    cache = decision = None
    for v in ob.cache_variants(engine, precision, device):  # a complete cache of an allowed path: nothing to run
        c = FeatureCache(cache_dir, name, backbone.weights_id, pre, v, taps)
        if c.rebuilt_reason and log:
            log(c.rebuilt_reason)
        if cache_dir and c.has_all(readable):
            cache, decision = c, {**ob.describe_variant(v), "reason": "all from the cache"}
            break
    forward = None
    if cache is None and onnx:
        try:
            forward, decision = _onnx_forward(paths, backbone, name, cache_dir, precision, batch_size, log)
            variant = ob.variant_name(decision["precision"])
            cache = FeatureCache(cache_dir, name, backbone.weights_id, pre, variant, taps)
        except Cancelled:
            raise
        except Exception as exc:  # a broken ONNX Runtime install must not stop feature extraction
            if engine == "onnxruntime":
                raise EngineError(f"ONNX Runtime could not run the backbone: {exc}") from exc
            if log:
                log(f"ONNX Runtime could not run the backbone ({exc.__class__.__name__}: {exc}); using PyTorch")
            forward = None
    if cache is None:
        decision = {"engine": "torch", "precision": "fp32"}
        cache = FeatureCache(cache_dir, name, backbone.weights_id, pre, "torch", taps)
    dim, final_dim = backbone.net.feature_dim, backbone.net.final_dim
    feats = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    todo: list[int] = []
    for i, h in enumerate(hashes):
        vec = cache.get(h) if h is not None else None
        if vec is not None:
            feats[i] = vec
            ok[i] = True
        elif h is not None:
            todo.append(i)
    stats = {"cached": int(ok.sum()), "embedded": 0, "embed_seconds": 0.0, "features": decision, "final_dim": final_dim}
    if todo:
        if log:
            log(
                f"Embedding {len(todo)} image(s) with the frozen backbone ({n - len(todo)} already cached; "
                f"{decision['engine']} {decision['precision']})"
            )
        forward = forward or Forward.frozen(backbone.net, pre, device, batch_size)
        t0 = time.perf_counter()
        try:
            put = partial(cache.put, final_dim=final_dim, widths=depths.tap_widths(backbone.net) if taps else None)
            _embed_loop(forward, device, todo, [paths[i] for i in todo], feats, ok, hashes, put, errors, cancel,
                        progress)  # fmt: skip
        finally:
            # Also on cancel or error: what was embedded so far is kept for the next run.
            try:
                cache.save()
            except OSError as exc:  # a read-only or full cache disk must not fail the run
                if log:
                    log(f"Could not save the embedding cache ({exc.strerror or exc}); continuing without it")
        stats["embedded"] = int(sum(ok[i] for i in todo))
        stats["embed_seconds"] = time.perf_counter() - t0
    kept = [i for i in range(n) if ok[i]]
    if cache_dir:  # the files that decoded (or were cached) need not be read again while unchanged
        known.remember([paths[i] for i in kept], [hashes[i] for i in kept])
        known.save()
    stats["hashes"] = [hashes[i] for i in kept]  # content hashes of the kept files (the doctor's byte copies)
    return feats[kept], kept, errors, stats


def _embed_loop(forward, device, todo, todo_paths, feats, ok, hashes, put, errors, cancel, progress) -> None:
    """``forward``: a ``Forward`` (torch tensors out) or an ``OrtForward`` (NumPy out)."""
    import torch

    done = 0
    bs, pre = forward.batch_size, forward.pre
    meter = RateMeter(len(todo))
    with torch.inference_mode():
        for group in iter_decoded(
            todo_paths, pre, pre.size, chunk=max(bs, 64), cancel=cancel, overlap=device.type != "cpu", device=device
        ):
            good = [(todo[j], arr) for j, arr, err in group if arr is not None]
            errors.extend((todo_paths[j], err) for j, arr, err in group if arr is None)
            done += len(group) - len(good)
            for s in range(0, len(good), bs):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                part = good[s : s + bs]
                out = forward(stack_on([a for _, a in part], device))
                out = out if isinstance(out, np.ndarray) else out.cpu().numpy()
                for (i, _), vec in zip(part, out):
                    feats[i] = put(hashes[i], vec.copy())
                    ok[i] = True
                done += len(part)
                if progress is not None:  # per batch, so a bar moves and Stop is honoured within a batch
                    progress(Progress(Phase.EMBEDDING, done, len(todo), meter.rate(done), meter.eta(done)))
