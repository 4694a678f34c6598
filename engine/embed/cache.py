"""The embedding cache on disk: every image's features per backbone, weights, preprocessing and the path that made
them, keyed by the file's content hash (renaming or moving files costs nothing; only new or changed images are
embedded). Each file is a safetensors file replaced atomically; a damaged one is detected, deleted and rebuilt.

Beside each file of final features (``<backbone>-<key>.safetensors``, float32) lies its file of intermediate-stage
features (``<backbone>-<key>.depths2.safetensors``, float16: 3,072 numbers an image for Lite0, 6 KB beside the final
features' 5 KB; engine/network/depths.py, whose ``VERSION`` the name carries). Caches written before the depths
existed, or with another version's, still load: an image whose depths are missing is embedded once more when a run
needs them, and both files get it (a ``.depths1`` file of the taps before is left unread; clearing the cache removes
it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from engine.data.known_files import FILE as KNOWN_FILE
from engine.data.known_files import KnownFiles
from engine.embed.spaces import FOLDER as SPACES
from engine.embed.spaces import kept_files
from engine.network import depths
from engine.network.backbones import Preprocessing
from engine.paths import default_cache_dir
from engine.runs import atomic_write_bytes


def _cache_key(backbone: str, weights_id: str, pre: Preprocessing, variant: str = "torch") -> str:
    """One backbone + weights + preprocessing + the path that ran it ("torch" keeps the original keys)."""
    text = f"{backbone}|{weights_id}|{pre.key()}" + ("" if variant == "torch" else f"|{variant}")
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# The cache's file names: embeddings "<backbone>-<key>.safetensors", their intermediate-stage features
# "<backbone>-<key>.depths2.safetensors", the backbone's weights "<backbone>-<key>.backbone.safetensors" (key: 16 hex
# digits). cache_contents() reads them back with _CACHE_FILE.
_SNAPSHOT = ".backbone"
_DEPTHS = f".depths{depths.VERSION}"
_CACHE_FILE = re.compile(
    rf"^(?P<backbone>.+)-(?P<key>[0-9a-f]{{16}})(?P<suffix>{re.escape(_SNAPSHOT)}|\.depths\d+)?"
    r"\.safetensors$"
)


def _cache_file(
    folder: str, backbone: str, weights_id: str, pre: Preprocessing, suffix: str = "", variant: str = "torch"
) -> str:
    key = _cache_key(backbone, weights_id, pre, variant)
    return os.path.join(folder, f"{backbone}-{key}{suffix}.safetensors")


class VectorCache:
    """``content hash -> vector`` in one safetensors file (None: kept in memory only)."""

    def __init__(self, path: str | None, dtype=np.float32) -> None:
        self.path, self.dtype = path, dtype
        self.vectors: dict[str, np.ndarray] = {}
        self.meta: dict = {}  # kept beside the vectors (the depths' block widths)
        self.dirty = False
        self.rebuilt_reason = ""
        if self.path and os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="numpy") as f:
                keys = json.loads(f.metadata()["keys"])
                self.meta = json.loads(f.metadata().get("meta", "{}"))
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
        feats = np.stack([self.vectors[k] for k in keys]).astype(self.dtype)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        meta = {"keys": json.dumps(keys), **({"meta": json.dumps(self.meta)} if self.meta else {})}
        atomic_write_bytes(self.path, save({"features": feats}, metadata=meta))
        self.dirty = False


class EmbeddingCache(VectorCache):
    """``content hash -> feature vector`` for one (backbone, weights, preprocessing)."""

    def __init__(
        self, folder: str | None, backbone: str, weights_id: str, pre: Preprocessing, variant: str = "torch"
    ) -> None:
        super().__init__(_cache_file(folder, backbone, weights_id, pre, variant=variant) if folder else None)


class FeatureCache:
    """An image's features as a run uses them: the final ones (``EmbeddingCache``) and, with ``taps``, the
    intermediate stages' after them (their own float16 file beside it). An image counts as cached only when every
    part a run needs is there."""

    def __init__(
        self, folder: str | None, backbone: str, weights_id: str, pre: Preprocessing, variant: str, taps: bool
    ) -> None:
        self.final = EmbeddingCache(folder, backbone, weights_id, pre, variant)
        path = _cache_file(folder, backbone, weights_id, pre, _DEPTHS, variant) if folder and taps else None
        self.depths = VectorCache(path, np.float16) if taps else None
        self.rebuilt_reason = self.final.rebuilt_reason or (self.depths.rebuilt_reason if self.depths else "")

    def get(self, key: str) -> np.ndarray | None:
        f = self.final.get(key)
        if f is None or self.depths is None:
            return f
        d = self.depths.get(key)
        return None if d is None else np.concatenate([f, d.astype(np.float32)])

    def stack(self, keys: list[str]) -> np.ndarray:
        """Every key's features (all cached: :meth:`has_all`) as one float32 array, row by row as :meth:`get`
        gives them, made in one piece (on a cached rerun of 4,317 images one profile gave 0.05 s, against 0.17 s for
        the float32 copies row by row)."""
        final = np.stack([self.final.vectors[k] for k in keys])
        if self.depths is None:
            return final.astype(np.float32, copy=False)
        rest = np.stack([self.depths.vectors[k] for k in keys])
        out = np.empty((len(keys), final.shape[1] + rest.shape[1]), np.float32)
        out[:, : final.shape[1]] = final
        out[:, final.shape[1] :] = rest
        return out

    def has_all(self, keys) -> bool:
        keys = list(keys)
        return self.final.has_all(keys) and (self.depths is None or self.depths.has_all(keys))

    @property
    def widths(self) -> list[int] | None:
        """The depths' block widths (engine/network/depths.py ``tap_widths``), as the file that holds them says."""
        if self.depths is None:
            return None
        return list(self.depths.meta.get("widths", [])) or None

    def put(self, key: str, vec: np.ndarray, final_dim: int, widths: list[int] | None = None) -> np.ndarray:
        """Store an image's features; returns them as the cache will give them back (the depths rounded to float16),
        so that a run on freshly embedded images and its rerun from the cache see the same numbers."""
        self.final.put(key, np.ascontiguousarray(vec[:final_dim]))
        if self.depths is None:
            return vec
        if widths and self.depths.meta.get("widths") != list(widths):
            if self.depths.vectors:  # made for other taps: never mixed
                self.depths.vectors.clear()
            self.depths.meta["widths"] = list(widths)
        d = vec[final_dim:].astype(np.float16)
        self.depths.put(key, d)
        return np.concatenate([vec[:final_dim], d.astype(np.float32)])

    def save(self) -> None:
        self.final.save()
        if self.depths is not None:
            self.depths.save()


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
        self.path = _cache_file(folder, backbone, weights_id, pre, _SNAPSHOT)
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
        if not m["suffix"]:
            try:
                from safetensors import safe_open

                with safe_open(path, framework="numpy") as f:
                    e["images"] = len(json.loads(f.metadata()["keys"]))
            except Exception:
                e["images"] = None  # damaged: the next run that uses it rebuilds it

    def other(name: str, what: str, files: list[str], images: int | None = None) -> None:
        """An entry for the cache's other files (``what`` in the backbone column), when there are any."""
        if files:
            size = sum(os.path.getsize(p) for p in files)
            entries[(name, "")] = {"backbone": what, "key": "-", "images": images, "bytes": size, "files": files}

    thumbs = [p for p in (os.path.join(folder, LAYOUT_FILE), os.path.join(folder, DETAIL_FILE)) if os.path.isfile(p)]
    other("layouts", "(dataset check thumbnails)", thumbs)
    index = os.path.join(folder, KNOWN_FILE)  # which files were read before (engine/data/known_files.py)
    if os.path.isfile(index):
        other("files", "(files read before)", [index], len(KnownFiles(folder).entries))
    other("spaces", "(head spaces)", kept_files(folder))  # engine/embed/spaces.py
    graphs = os.path.join(folder, "graphs")  # ONNX Runtime's exported and quantised backbones
    files = sorted(
        os.path.join(graphs, n)
        for n in (os.listdir(graphs) if os.path.isdir(graphs) else [])
        if n.endswith((".onnx", ".onnx.json"))
    )
    other("graphs", "(onnx graphs)", files, 0)
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
    try:
        os.rmdir(os.path.join(folder or default_cache_dir(), SPACES))  # (only when empty: it holds nothing else)
    except OSError:
        pass
    return freed
