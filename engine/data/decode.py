"""Decode once: files -> fixed-size uint8 arrays, in parallel threads, with per-file errors instead of exceptions.

Both training modes and prediction go through here, so an image is read from disk and decoded once per job; the
uint8 result (3 bytes per pixel at the model's input size) is what epochs reuse.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.data.deep_grey import is_deep_grey
from engine.data.folder import MAX_PIXELS, describe_error, open_rgb
from engine.events import CancelToken
from engine.network.backbones import Preprocessing


def decode_workers() -> int:
    """Decoding threads: one per core (up to 8), or TRANSFER_STUDIO_DECODE_THREADS (the GUI sets it lower on
    small machines so its own thread keeps a core)."""
    env = os.environ.get("TRANSFER_STUDIO_DECODE_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, (os.cpu_count() or 2)))


def crop_geometry(w: int, h: int, pre: Preprocessing, size: int) -> tuple[int, int, int, int]:
    """ "center-crop": resize a w x h image to (nw, nh), the shorter side to size*resize/crop, then crop the
    centre square at (left, top) (torchvision's eval recipe)."""
    short = max(size, int(round(size * pre.resize / pre.size)))
    scale = short / min(w, h)
    nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def to_square(im, pre: Preprocessing, size: int) -> np.ndarray:
    """Resize a PIL RGB image to ``size`` x ``size`` following ``pre.mode``; returns HxWx3 uint8."""
    from PIL import Image

    if pre.mode == "center-crop":
        nw, nh, left, top = crop_geometry(*im.size, pre, size)
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        im = im.crop((left, top, left + size, top + size))
    else:
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def content_hash(data: bytes) -> str:
    """A file's key in the embedding cache. Grey images deeper than 8 bits get a tag: their decoding changed on
    2026-11-29 (engine/data/folder.py ``grey_to_8_bits``), so embeddings cached from the old, nearly black pixels are
    not
    reused."""
    h = hashlib.blake2b(data, digest_size=16)
    if is_deep_grey(data):
        h.update(b"|deep-grey-2")
    return h.hexdigest()


def decode_one(path: str, pre: Preprocessing, size: int) -> tuple[np.ndarray | None, str]:
    """(HxWx3 uint8, "") or (None, reason)."""
    try:
        data = read_bytes(path)
        if not data:
            return None, "empty file (0 bytes)"
        return to_square(open_rgb(data, draft_size=size), pre, size), ""
    except Exception as exc:  # every failure means: skip this file and say why
        return None, describe_error(exc)


def iter_decoded(
    paths: Sequence[str],
    pre: Preprocessing,
    size: int,
    chunk: int = 64,
    cancel: CancelToken | None = None,
    overlap: bool = True,
    device=None,
) -> Iterator[list[tuple[int, np.ndarray | None, str]]]:
    """Yield chunks of ``(index, array or None, error)`` in order, decoding in a thread pool.

    PIL releases the GIL while decoding, so with ``overlap`` the next chunks decode while the caller runs the model
    on a GPU. Without it (the model runs on the CPU) each chunk is decoded on all cores and then handed over:
    decoding threads competing with PyTorch's own CPU threads made embedding ~25% slower on 2 cores (measured).
    With a CUDA ``device`` JPEGs are decoded there instead (``iter_decoded_torch``: the arrays are then (3,S,S)
    uint8 tensors on the device; ``stack_on`` takes either kind).
    """
    if device is not None and getattr(device, "type", "") == "cuda" and gpu_decode_enabled():
        yield from iter_decoded_torch(paths, pre, size, device, chunk, cancel)
        return
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


def stack_on(arrays: list, device):
    """A (N,3,S,S) uint8 tensor on ``device`` from ``iter_decoded``'s arrays (HxWx3 NumPy, or (3,S,S) tensors)."""
    import torch

    if isinstance(arrays[0], np.ndarray):
        return torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True).permute(0, 3, 1, 2)
    return torch.stack(arrays).to(device)


def decode_all(
    paths: Sequence[str],
    pre: Preprocessing,
    size: int,
    cancel: CancelToken | None = None,
    progress: Callable[[int, int], None] | None = None,
    device=None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode every path into one (N,3,S,S) uint8 array. Returns (array, kept indices, [(path, reason)]).
    With a CUDA ``device`` the JPEGs are decoded on it (see ``iter_decoded``). ``out``: an (N,3,S,S) uint8 array
    to fill instead of a new one in memory (a file on disk: see ``PixelStore``)."""
    n = len(paths)
    if out is None:
        out = np.empty((n, 3, size, size), dtype=np.uint8)
    kept, bad = [], []
    done = 0
    for group in iter_decoded(paths, pre, size, cancel=cancel, device=device):
        for i, arr, err in group:
            if arr is None:
                bad.append((paths[i], err))
            else:
                out[len(kept)] = arr.transpose(2, 0, 1) if isinstance(arr, np.ndarray) else arr.cpu().numpy()
                kept.append(i)
        done += len(group)
        if progress is not None:
            progress(done, n)
    return out[: len(kept)], kept, bad


def available_memory() -> int | None:
    """Bytes of RAM the system can hand out now without swapping, or None where it cannot tell."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        elif sys.platform.startswith("win"):
            import ctypes

            class _Status(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong)] + [
                    (name, ctypes.c_ulonglong)
                    for name in (
                        "total",
                        "avail",
                        "total_page",
                        "avail_page",
                        "total_virtual",
                        "avail_virtual",
                        "avail_extended",
                    )
                ]

            st = _Status()
            st.dwLength = ctypes.sizeof(_Status)
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):
                return int(st.avail)
        else:  # macOS and other Unix: half the physical memory, as a cautious guess at what is free
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError, AttributeError):
        pass
    return None


class PixelStore:
    """Where fine-tuning keeps its decoded images: in memory when they fit comfortably (half of what is available),
    otherwise in a file on disk (a NumPy memmap; each epoch then reads from the OS's page cache or the disk), so a
    folder bigger than the machine's memory is slower instead of killed by the out-of-memory killer.
    ``close()`` removes the file (on POSIX it is unlinked at once, so even a killed process leaves nothing)."""

    def __init__(self, need_bytes: int, folder: str | None) -> None:
        avail = available_memory()
        self.on_disk = avail is not None and need_bytes > avail // 2
        self.folder = None
        self.avail = avail
        if self.on_disk:
            base = folder or tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            free = shutil.disk_usage(base).free
            if need_bytes > 0.9 * free:
                from engine.events import EngineError

                raise EngineError(
                    f"The decoded images need {need_bytes / 1e9:.1f} GB: more than the memory available "
                    f"({avail / 1e9:.1f} GB) and the free disk space in {base} ({free / 1e9:.1f} GB). Use feature "
                    "extraction (it keeps features, not pixels), fewer images, or free some disk space."
                )
            self.folder = tempfile.mkdtemp(prefix="pixels-", dir=base)

    def array(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A new uint8 array for ``decode_all`` to fill: None (decode_all allocates in memory) unless on disk."""
        if not self.on_disk:
            return None
        fd, path = tempfile.mkstemp(suffix=".u8", dir=self.folder)
        os.close(fd)
        arr = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
        try:
            os.unlink(path)  # POSIX: the mapping keeps the data; the name is gone even if the process is killed
        except OSError:
            pass  # Windows: an open mapping cannot be deleted; close() removes the folder
        return arr

    def close(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# ------------------------------------------------------------------------------------------- decoding on the GPU


def gpu_decode_enabled() -> bool:
    """JPEGs are decoded with nvjpeg on CUDA unless TRANSFER_STUDIO_GPU_DECODE=0 (or torchvision lacks it)."""
    if os.environ.get("TRANSFER_STUDIO_GPU_DECODE", "1") == "0":
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 (imported only to prove it exists)
    except ImportError:
        return False
    return True


def _read_for_torch(path: str) -> tuple[bytes | None, bool, str]:
    """(file bytes, whether torchvision may decode it, error). Only plain JPEGs qualify: RGB or grey, no EXIF
    rotation (nvjpeg ignores it), within the pixel limit; everything else is decoded by PIL as usual."""
    try:
        data = read_bytes(path)
    except OSError as exc:
        return None, False, describe_error(exc)
    if data[:3] != b"\xff\xd8\xff":
        return data, False, ""
    try:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:  # header only
                ok = im.mode in ("RGB", "L") and im.width * im.height <= MAX_PIXELS and im.getexif().get(0x0112, 1) == 1
    except Exception:
        ok = False  # PIL will say what is wrong with it
    return data, ok, ""


def _resize_tensor(img, pre: Preprocessing, size: int):
    """``to_square`` for a (3,H,W) uint8 tensor on any device (bilinear with antialiasing, as PIL's resize)."""
    return resize_batch(img.unsqueeze(0), pre, size)[0]


def resize_batch(u8, pre: Preprocessing, size: int):
    """``to_square`` for a (N,3,H,W) uint8 batch on any device, still uint8 (bilinear with antialiasing)."""
    import torch
    import torch.nn.functional as F

    x = u8.float()
    h, w = u8.shape[-2:]
    if pre.mode == "center-crop":
        nw, nh, left, top = crop_geometry(w, h, pre, size)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x[..., top : top + size, left : left + size]
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _torch_decode(items: list[tuple[int, bytes]], device) -> dict:
    """index -> (3,H,W) uint8 tensor on ``device``, or None where torchvision could not decode that file. On CUDA
    the whole list goes to nvjpeg at once; a batch that fails (it never returns part of one) is retried per file."""
    if not items:  # a chunk with no plain JPEG in it (all PNG, say): nothing to hand to nvjpeg
        return {}
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(datas):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (PIL stays the fallback)
            warnings.simplefilter("ignore")
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in items]
    try:
        return {i: t for (i, _), t in zip(items, run(tensors))}
    except Exception:
        out = {}
        for (i, _), t in zip(items, tensors):
            try:
                out[i] = run([t])[0]
            except Exception:
                out[i] = None
        return out


def iter_decoded_torch(
    paths: Sequence[str], pre: Preprocessing, size: int, device, chunk: int = 64, cancel: CancelToken | None = None
):
    """``iter_decoded`` with the JPEGs decoded by torchvision on ``device`` (nvjpeg, batched, on CUDA) and resized
    there: yields chunks of ``(index, (3,S,S) uint8 tensor on device or None, error)`` in order. Files torchvision
    does not take (PNG, EXIF-rotated, CMYK, damaged, ...) are decoded by PIL in the thread pool, exactly as
    ``decode_one`` does, so errors read the same."""
    import torch

    with ThreadPoolExecutor(max_workers=decode_workers(), thread_name_prefix="decode") as pool:
        for start in range(0, len(paths), chunk):
            if cancel is not None:
                cancel.raise_if_cancelled()
            idx = list(range(start, min(start + chunk, len(paths))))
            read = list(pool.map(_read_for_torch, [paths[i] for i in idx]))
            decoded = _torch_decode([(i, d) for i, (d, ok, _) in zip(idx, read) if ok], device)
            pil = {
                i: pool.submit(decode_one, paths[i], pre, size)
                for i, (d, _, err) in zip(idx, read)
                if not err and decoded.get(i) is None
            }
            out = []
            for i, (_, _, err) in zip(idx, read):
                if err:
                    out.append((i, None, err))
                elif decoded.get(i) is not None:
                    out.append((i, _resize_tensor(decoded[i], pre, size), ""))
                else:
                    arr, e = pil[i].result()
                    out.append((i, None if arr is None else torch.from_numpy(arr).permute(2, 0, 1).to(device), e))
            yield out
