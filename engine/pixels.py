"""Decode once: files -> fixed-size uint8 arrays, in parallel threads, with per-file errors instead of exceptions.

Both training modes and prediction go through here, so an image is read from disk and decoded once per job; the
uint8 result (3 bytes per pixel at the model's input size) is what epochs reuse.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np

from .backbones import Preprocessing
from .data import describe_error, open_rgb
from .events import CancelToken


def decode_workers() -> int:
    """Decoding threads: one per core (up to 8), or TRANSFER_STUDIO_DECODE_THREADS (the GUI sets it lower on
    small machines so its own thread keeps a core)."""
    env = os.environ.get("TRANSFER_STUDIO_DECODE_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, (os.cpu_count() or 2)))


def to_square(im, pre: Preprocessing, size: int) -> np.ndarray:
    """Resize a PIL RGB image to ``size`` x ``size`` following ``pre.mode``; returns HxWx3 uint8."""
    from PIL import Image

    if pre.mode == "center-crop":
        # Resize the shorter side to size*resize/crop, then take the centre square (torchvision's eval recipe).
        short = max(size, int(round(size * pre.resize / pre.size)))
        w, h = im.size
        scale = short / min(w, h)
        nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    else:
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_one(path: str, pre: Preprocessing, size: int) -> tuple[np.ndarray | None, str]:
    """(HxWx3 uint8, "") or (None, reason)."""
    try:
        data = read_bytes(path)
        if not data:
            return None, "empty file (0 bytes)"
        return to_square(open_rgb(data, draft_size=size), pre, size), ""
    except Exception as exc:  # every failure means: skip this file and say why
        return None, describe_error(exc)


def iter_decoded(paths: Sequence[str], pre: Preprocessing, size: int, chunk: int = 64,
                 cancel: CancelToken | None = None,
                 overlap: bool = True) -> Iterator[list[tuple[int, np.ndarray | None, str]]]:
    """Yield chunks of ``(index, array or None, error)`` in order, decoding in a thread pool.

    PIL releases the GIL while decoding, so with ``overlap`` the next chunks decode while the caller runs the model
    on a GPU. Without it (the model runs on the CPU) each chunk is decoded on all cores and then handed over:
    decoding threads competing with PyTorch's own CPU threads made embedding ~25% slower on 2 cores (measured).
    """
    with ThreadPoolExecutor(max_workers=decode_workers(), thread_name_prefix="decode") as pool:
        pending = []
        pos = 0
        ahead = 2 if overlap else 1  # chunks in flight

        def submit_next() -> bool:
            nonlocal pos
            if pos >= len(paths):
                return False
            idx = list(range(pos, min(pos + chunk, len(paths))))
            pos += len(idx)
            pending.append([(i, pool.submit(decode_one, paths[i], pre, size)) for i in idx])
            return True

        for _ in range(ahead):
            submit_next()
        while pending:
            if cancel is not None and cancel.cancelled:
                for group in pending:
                    for _, fut in group:
                        fut.cancel()
                cancel.raise_if_cancelled()
            group = pending.pop(0)
            out = []
            for i, fut in group:
                arr, err = fut.result()
                out.append((i, arr, err))
            if overlap:
                submit_next()
                yield out
            else:
                yield out
                submit_next()


def decode_all(paths: Sequence[str], pre: Preprocessing, size: int, cancel: CancelToken | None = None,
               progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode every path into one (N,3,S,S) uint8 array. Returns (array, kept indices, [(path, reason)])."""
    n = len(paths)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    kept, bad = [], []
    done = 0
    for group in iter_decoded(paths, pre, size, cancel=cancel):
        for i, arr, err in group:
            if arr is None:
                bad.append((paths[i], err))
            else:
                out[len(kept)] = arr.transpose(2, 0, 1)
                kept.append(i)
        done += len(group)
        if progress is not None:
            progress(done, n)
    return out[:len(kept)], kept, bad
