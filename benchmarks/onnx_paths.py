"""``python -m benchmarks onnx [FOLDER ...]``: the frozen backbone's CPU paths, in one process.

1. Forward only, random inputs already in memory, alternating the paths twice (the faster round counts): PyTorch
   eager fp32 (as loaded), the ``bench`` limit row (BatchNorm folded, channels_last, the engine's batch), ONNX
   Runtime fp32 and int8 (the engine's batch of 16).
2. End to end, the first feature-extraction run on each folder from an empty cache with ``--engine torch``,
   ONNX Runtime fp32 and int8: wall time, embedding images/s, validation accuracy, and where the time went.
3. ``--flavours v8,a7,s8``: each int8 flavour (engine/network/int8.py) on each folder: its one-time calibration, feature
   cosine with fp32 (worst / mean over 48 images) through this CPU's kernels and computed exactly (what a CPU that
   never saturates gives), forward images/s, and the validation accuracy of a feature-extraction run whose int8
   features are computed exactly. A flavour this CPU cannot run exactly is marked: its speed here says nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import numpy as np

SHARED = os.path.join("..", "shared", "datasets")


def _rate(fn, batch, seconds: float) -> float:
    fn(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def forward_rates(seconds: float = 5.0) -> dict[str, float]:
    import torch

    from engine.network import onnx_runtime as ob
    from engine.network.backbones import load_backbone
    from engine.network.forward import Forward

    bb = load_backbone()
    pre = bb.preprocessing
    cpu = torch.device("cpu")
    tmp = tempfile.mkdtemp(prefix="ts-bench-onnx-")
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (32, 3, pre.size, pre.size), dtype=np.uint8)
    graphs = ob.ensure_graphs(tmp, "efficientnet_lite0", bb, calib)
    eager = Forward(bb.net.eval(), pre, cpu, 4)
    limit = Forward.frozen(bb.net, pre, cpu, 4)
    fp32 = ob.OrtForward(graphs.fp32, pre, "fp32", 16)
    int8 = ob.OrtForward(graphs.int8, pre, "int8", 16)
    u8_4 = torch.from_numpy(rng.integers(0, 256, (4, 3, pre.size, pre.size), dtype=np.uint8))
    u8_16 = rng.integers(0, 256, (16, 3, pre.size, pre.size), dtype=np.uint8)

    def run_torch(f):
        def go(b):
            with torch.inference_mode():
                f(b)

        return go

    paths = {
        "torch eager fp32": (run_torch(eager), u8_4),
        "limit (folded, channels_last)": (run_torch(limit), u8_4),
        "onnxruntime fp32": (fp32, u8_16),
        "onnxruntime int8": (int8, u8_16),
    }
    best = {k: 0.0 for k in paths}
    for _ in range(2):
        for k, (fn, batch) in paths.items():
            best[k] = max(best[k], _rate(fn, batch, seconds))
    cos = ob.agreement(int8(u8_16), fp32(u8_16))
    best["int8 vs fp32 cosine on random inputs (mean)"] = float(cos.mean())
    return best


@contextlib.contextmanager
def _flavour(name: str, exact: bool):
    """Make the engine use int8 flavour ``name`` (and run it exactly) inside the block."""
    from engine.network import onnx_runtime as ob

    keep = {k: os.environ.get(k) for k in (ob.FLAVOUR_ENV, ob.EXACT_ENV)}
    os.environ[ob.FLAVOUR_ENV], os.environ[ob.EXACT_ENV] = name, "1" if exact else "0"
    try:
        yield
    finally:
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flavour_rows(folder: str, flavours: list[str]) -> list[dict]:
    """Agreement, speed and exact accuracy of each int8 flavour on ``folder`` (see the module docstring)."""
    from engine.config import TrainConfig
    from engine.data.folder import walk_images
    from engine.embed.embeddings import _sample_pixels
    from engine.network import onnx_runtime as ob
    from engine.network.backbones import load_backbone
    from engine.network.int8 import quantize
    from engine.train.fit import fit

    bb = load_backbone()
    pre = bb.preprocessing
    paths = walk_images(folder)
    calib, sample = _sample_pixels(paths, pre, ob.CALIBRATION, 0), _sample_pixels(paths, pre, 48, 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        ob.export_graph(bb.net, pre, fp32)
        ref = ob.OrtForward(fp32, pre, "fp32")(sample)
        batches = [ob._normalise(calib[i : i + 8], pre) for i in range(0, len(calib), 8)]
        for name in flavours:
            path = os.path.join(tmp, f"{name}.onnx")
            t0 = time.perf_counter()
            quantize(fp32, path, batches, name)
            row = {
                "folder": os.path.basename(os.path.normpath(folder)),
                "flavour": name,
                "calibration_s": time.perf_counter() - t0,
                "runs_exactly_here": name == "a7" or ob.has_vnni(),
            }
            fast = ob.OrtForward(path, pre, "int8")
            for key, fwd in (("kernels", fast), ("exact", ob.OrtForward(path, pre, "int8", exact=True))):
                cos = ob.agreement(fwd(sample), ref)
                row[f"{key}_worst"], row[f"{key}_mean"] = float(cos.min()), float(cos.mean())
            row["images_per_s"] = _rate(fast, sample[:16], 5.0)
            with _flavour(name, exact=True):
                res = fit(
                    TrainConfig(
                        data=folder,
                        out=os.path.join(tmp, f"r-{name}"),
                        engine="onnxruntime",
                        precision="int8",
                        cache_dir=os.path.join(tmp, f"cache-{name}"),
                    )
                )
            row["val_accuracy"] = res.metrics.get("val_accuracy")
            rows.append(row)
            print(f"  {row['folder']} {name}: {row}", file=sys.stderr, flush=True)
    return rows


def end_to_end(folder: str) -> list[dict]:
    from engine.config import TrainConfig
    from engine.train.fit import fit

    rows = []
    for engine, precision in (("torch", "auto"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("auto", "auto")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = fit(
                TrainConfig(
                    data=folder,
                    out=os.path.join(tmp, "r"),
                    engine=engine,
                    precision=precision,
                    cache_dir=os.path.join(tmp, "cache"),
                )
            )
            wall = time.perf_counter() - t0
        m = res.metrics
        rows.append(
            {
                "folder": os.path.basename(os.path.normpath(folder)),
                "path": f"{engine} {precision}",
                "wall_s": wall,
                "embed_s": m.get("embed_seconds"),
                "embed_images_per_s": m.get("embed_images_per_s"),
                "val_accuracy": m.get("val_accuracy"),
                "val_n": m.get("val_n"),
                "graphs_s": (m.get("features") or {}).get("graphs_seconds", 0.0),
                "chosen": (m.get("features") or {}).get("precision"),
            }
        )
        print(f"  {rows[-1]['folder']} {rows[-1]['path']}: {wall:.1f} s", file=sys.stderr, flush=True)
    return rows


def run_bench_onnx(a) -> int:
    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers")]
    rates = forward_rates()
    lim = rates["limit (folded, channels_last)"]
    print("\nForward only (2-core CPU, random inputs in memory, images/s; the faster of two alternating rounds):")
    for k, v in rates.items():
        print(f"  {k:45} {v:8.3f}" if "cosine" in k else f"  {k:45} {v:8.1f}  ({v / lim:.2f}x the limit)")
    present = [f for f in folders if os.path.isdir(f)]
    if not present:
        print(f"end to end skipped: {', '.join(folders)} not found")
        return 0
    flavours = [f for f in (a.flavours or "").split(",") if f]
    if flavours:
        _print_flavours([r for f in present for r in flavour_rows(f, flavours)])
    if a.flavours_only:
        return 0
    rows = [r for f in present for r in end_to_end(f)]
    print(f"\n{'folder':12} {'path':18} {'wall s':>7} {'graphs s':>8} {'embed s':>8} {'img/s':>7} {'val acc':>8}  used")
    for r in rows:
        print(
            f"{r['folder']:12} {r['path']:18} {r['wall_s']:7.1f} {r['graphs_s']:8.1f} {r['embed_s'] or 0:8.1f} "
            f"{r['embed_images_per_s'] or 0:7.1f} {r['val_accuracy']:8.3f}  {r['chosen'] or ''}"
        )
    print(
        "\nwall s = the first feature-extraction run from an empty cache (scan, hashing, decoding, embedding, head); "
        "graphs s = the one-time ONNX export and int8 calibration inside it; embed s = hashing + decoding + forward"
    )
    return 0


def _print_flavours(rows: list[dict]) -> None:
    from engine.network.onnx_runtime import has_vnni

    print(
        f"\nint8 flavours (this CPU: {'VNNI' if has_vnni() else 'no VNNI'}; cosine with fp32 worst / mean over 48 "
        "images; exact = what a CPU that never saturates computes; val acc from exact int8 features):"
    )
    print(f"{'folder':12} {'flavour':8} {'calib s':>7} {'kernels here':>14} {'exact':>14} {'img/s':>7} {'val acc':>8}")
    for r in rows:
        speed = f"{r['images_per_s']:7.1f}" if r["runs_exactly_here"] else "    n/a"  # saturates: not a real speed
        print(
            f"{r['folder']:12} {r['flavour']:8} {r['calibration_s']:7.1f} "
            f"{r['kernels_worst']:6.3f} / {r['kernels_mean']:5.3f} {r['exact_worst']:6.3f} / {r['exact_mean']:5.3f} "
            f"{speed} {r['val_accuracy']:8.3f}"
        )
