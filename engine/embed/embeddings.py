"""Embed once: frozen-backbone features for a list of files, cached on disk across runs.

The cache is keyed by each file's content hash, the backbone, the identity of its weights and the preprocessing,
so renaming or moving files costs nothing and only new or changed images are embedded. The cache file is a
safetensors file replaced atomically; a damaged one is detected, deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.data.decode import content_hash, iter_decoded, read_bytes, stack_on
from engine.data.known_files import FILE as KNOWN_FILE
from engine.data.known_files import KnownFiles
from engine.events import Cancelled, CancelToken, EngineError, Phase, Progress
from engine.meters import RateMeter
from engine.network.backbones import LoadedBackbone, Preprocessing
from engine.network.forward import Forward
from engine.paths import default_cache_dir
from engine.runs import atomic_write_bytes


def _cache_key(backbone: str, weights_id: str, pre: Preprocessing, variant: str = "torch") -> str:
    """One backbone + weights + preprocessing + the path that ran it ("torch" keeps the original keys)."""
    text = f"{backbone}|{weights_id}|{pre.key()}" + ("" if variant == "torch" else f"|{variant}")
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# The cache's file names: embeddings "<backbone>-<key>.safetensors", the backbone's weights beside them
# "<backbone>-<key>.backbone.safetensors" (key: 16 hex digits). cache_contents() reads them back with _CACHE_FILE.
_SNAPSHOT = ".backbone"
_CACHE_FILE = re.compile(
    rf"^(?P<backbone>.+)-(?P<key>[0-9a-f]{{16}})(?P<snapshot>{re.escape(_SNAPSHOT)})?"
    r"\.safetensors$"
)


def _cache_file(
    folder: str, backbone: str, weights_id: str, pre: Preprocessing, snapshot: bool = False, variant: str = "torch"
) -> str:
    key = _cache_key(backbone, weights_id, pre, variant)
    return os.path.join(folder, f"{backbone}-{key}{_SNAPSHOT if snapshot else ''}.safetensors")


class VectorCache:
    """``content hash -> vector`` in one safetensors file (None: kept in memory only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False
        self.rebuilt_reason = ""
        if self.path and os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="numpy") as f:
                keys = json.loads(f.metadata()["keys"])
                feats = f.get_tensor("features")
            if feats.ndim != 2 or feats.shape[0] != len(keys) or not np.isfinite(feats).all():
                raise ValueError("shape or values do not match the index")
            self.vectors = {k: feats[i] for i, k in enumerate(keys)}
        except Exception as exc:  # a torn or tampered cache is never trusted
            self.rebuilt_reason = f"embedding cache {self.path} was damaged ({exc.__class__.__name__}); rebuilding it"
            self.vectors = {}
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def get(self, key: str) -> np.ndarray | None:
        return self.vectors.get(key)

    def has_all(self, keys) -> bool:
        """Whether every one of ``keys`` (at least one) is cached: a run can then skip the backbone."""
        keys = list(keys)
        return bool(keys) and all(k in self.vectors for k in keys)

    def put(self, key: str, vec: np.ndarray) -> None:
        self.vectors[key] = vec
        self.dirty = True

    def save(self) -> None:
        if not self.path or not self.dirty:
            return
        from safetensors.numpy import save

        keys = list(self.vectors)
        feats = np.stack([self.vectors[k] for k in keys]).astype(np.float32)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_write_bytes(self.path, save({"features": feats}, metadata={"keys": json.dumps(keys)}))
        self.dirty = False


class EmbeddingCache(VectorCache):
    """``content hash -> feature vector`` for one (backbone, weights, preprocessing)."""

    def __init__(
        self, folder: str | None, backbone: str, weights_id: str, pre: Preprocessing, variant: str = "torch"
    ) -> None:
        super().__init__(_cache_file(folder, backbone, weights_id, pre, variant=variant) if folder else None)


LAYOUT_FILE = "layouts-16px.safetensors"  # the dataset doctor's 16x16 grey thumbnails, any backbone


class LayoutCache(VectorCache):
    """``content hash -> 16x16 layout thumbnail`` (engine/doctor/findings.py): decoding every image again took 2.7 s
    of the
    doctor's 11 s on a cached 4,317-image folder."""

    def __init__(self, folder: str | None) -> None:
        super().__init__(os.path.join(folder, LAYOUT_FILE) if folder else None)


DETAIL_FILE = "details-64px.safetensors"  # engine/doctor/same_picture.py's thumbnails of candidate pairs, any backbone


class DetailCache(VectorCache):
    """``content hash -> 64x64 detail thumbnail`` (engine/doctor/same_picture.py), for the images of candidate pairs
    only."""

    def __init__(self, folder: str | None) -> None:
        super().__init__(os.path.join(folder, DETAIL_FILE) if folder else None)


class BackboneSnapshot:
    """The frozen backbone's weights, keyed like its embeddings and stored beside them.

    With every embedding cached and this file present, a feature-extraction run saves a complete model
    (these tensors plus the new head) without importing torch. Written once, atomically; a damaged or mismatched
    file is deleted and the caller takes the full path, which writes it again.
    """

    def __init__(self, folder: str, backbone: str, weights_id: str, pre: Preprocessing) -> None:
        self.path = _cache_file(folder, backbone, weights_id, pre, snapshot=True)
        self.weights_id = weights_id

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def save(self, tensors: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_write_bytes(self.path, save(tensors, metadata={"weights_id": self.weights_id}))

    def load(self) -> dict[str, np.ndarray] | None:
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="numpy") as f:
                if (f.metadata() or {}).get("weights_id") != self.weights_id:
                    raise ValueError("made from other weights")
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # torn, tampered or foreign: never trusted
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return None


def cache_contents(folder: str | None = None) -> list[dict]:
    """What the embedding cache holds: one entry per backbone/weights/preprocessing, with the number of images
    whose features are stored and the bytes on disk (embeddings plus the backbone snapshot kept beside them)."""
    folder = folder or default_cache_dir()
    entries: dict[tuple[str, str], dict] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for name in names:
        m = _CACHE_FILE.match(name)
        path = os.path.join(folder, name)
        if not m or not os.path.isfile(path):
            continue
        e = entries.setdefault(
            (m["backbone"], m["key"]),
            {"backbone": m["backbone"], "key": m["key"], "images": 0, "bytes": 0, "files": []},
        )
        e["bytes"] += os.path.getsize(path)
        e["files"].append(path)
        if not m["snapshot"]:
            try:
                from safetensors import safe_open

                with safe_open(path, framework="numpy") as f:
                    e["images"] = len(json.loads(f.metadata()["keys"]))
            except Exception:
                e["images"] = None  # damaged: the next run that uses it rebuilds it
    thumbs = [p for p in (os.path.join(folder, LAYOUT_FILE), os.path.join(folder, DETAIL_FILE)) if os.path.isfile(p)]
    if thumbs:
        entries[("layouts", "")] = {
            "backbone": "(dataset check thumbnails)",
            "key": "-",
            "images": None,
            "bytes": sum(os.path.getsize(p) for p in thumbs),
            "files": thumbs,
        }
    index = os.path.join(folder, KNOWN_FILE)  # which files were read before (engine/data/known_files.py)
    if os.path.isfile(index):
        entries[("files", "")] = {
            "backbone": "(files read before)",
            "key": "-",
            "images": len(KnownFiles(folder).entries),
            "bytes": os.path.getsize(index),
            "files": [index],
        }
    graphs = os.path.join(folder, "graphs")  # ONNX Runtime's exported and quantised backbones
    files = sorted(
        os.path.join(graphs, n)
        for n in (os.listdir(graphs) if os.path.isdir(graphs) else [])
        if n.endswith((".onnx", ".onnx.json"))
    )
    if files:
        entries[("graphs", "")] = {
            "backbone": "(onnx graphs)",
            "key": "-",
            "images": 0,
            "bytes": sum(os.path.getsize(f) for f in files),
            "files": files,
        }
    return list(entries.values())


def clear_cache(folder: str | None = None) -> int:
    """Delete the cached embeddings and backbone snapshots (only files this cache writes); returns bytes freed.
    Runs only embed their images again: nothing else depends on the cache."""
    freed = 0
    for e in cache_contents(folder):
        for path in e["files"]:
            try:
                size = os.path.getsize(path)
                os.unlink(path)
                freed += size
            except OSError:
                pass
    return freed


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
    fp32, int8 = ob.graph_paths(graphs_home, backbone_name, backbone.weights_id)
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
    forward, decision = ob.choose(graphs, pre, precision, sample, batch_size or 16, log)
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
) -> tuple[np.ndarray, list[int], list[tuple[str, str]], dict]:
    """Features for ``paths``. Returns (features (K,D) float32, indices of the K readable files, errors, stats).

    ``engine``/``precision``: see engine/network/onnx_runtime.py (``torch`` keeps PyTorch's eager forward). A cache in
    which
    every image already is, from any path the settings allow, is used as it is; stats["features"] says which path
    made the features.
    """
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
        c = EmbeddingCache(cache_dir, name, backbone.weights_id, pre, v)
        if c.rebuilt_reason and log:
            log(c.rebuilt_reason)
        if cache_dir and c.has_all(readable):
            cache, decision = c, {**ob.describe_variant(v), "reason": "all from the cache"}
            break
    forward = None
    if cache is None and onnx:
        try:
            forward, decision = _onnx_forward(paths, backbone, name, cache_dir, precision, batch_size, log)
            cache = EmbeddingCache(cache_dir, name, backbone.weights_id, pre, ob.variant_name(decision["precision"]))
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
        cache = EmbeddingCache(cache_dir, name, backbone.weights_id, pre)
    dim = backbone.net.feature_dim
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
    stats = {"cached": int(ok.sum()), "embedded": 0, "embed_seconds": 0.0, "features": decision}
    if todo:
        if log:
            log(
                f"Embedding {len(todo)} image(s) with the frozen backbone ({n - len(todo)} already cached; "
                f"{decision['engine']} {decision['precision']})"
            )
        forward = forward or Forward.frozen(backbone.net, pre, device, batch_size)
        t0 = time.perf_counter()
        try:
            _embed_loop(
                forward, device, todo, [paths[i] for i in todo], feats, ok, hashes, cache, errors, cancel, progress
            )
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


def _embed_loop(forward, device, todo, todo_paths, feats, ok, hashes, cache, errors, cancel, progress) -> None:
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
                    feats[i] = vec
                    ok[i] = True
                    cache.put(hashes[i], vec.copy())
                done += len(part)
                if progress is not None:  # per batch, so a bar moves and Stop is honoured within a batch
                    progress(Progress(Phase.EMBEDDING, done, len(todo), meter.rate(done), meter.eta(done)))
