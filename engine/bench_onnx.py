"""``python -m engine bench-onnx [FOLDER ...]``: the frozen backbone's CPU paths, in one process.

1. Forward only, random inputs already in memory, alternating the paths twice (the faster round counts): PyTorch
   eager fp32 (as loaded), the ``bench`` limit row (BatchNorm folded, channels_last, the engine's batch), ONNX
   Runtime fp32 and int8 (the engine's batch of 16).
2. End to end, the first feature-extraction run on each folder from an empty cache with ``--engine torch``,
   ONNX Runtime fp32 and int8: wall time, embedding images/s, validation accuracy, and where the time went.
"""
from __future__ import annotations

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

    from . import onnx_backend as ob
    from .backbones import load_backbone
    from .forward import Forward

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

    paths = {"torch eager fp32": (run_torch(eager), u8_4), "limit (folded, channels_last)": (run_torch(limit), u8_4),
             "onnxruntime fp32": (fp32, u8_16), "onnxruntime int8": (int8, u8_16)}
    best = {k: 0.0 for k in paths}
    for _ in range(2):
        for k, (fn, batch) in paths.items():
            best[k] = max(best[k], _rate(fn, batch, seconds))
    cos = ob.agreement(int8(u8_16), fp32(u8_16))
    best["int8 vs fp32 cosine on random inputs (mean)"] = float(cos.mean())
    return best


def end_to_end(folder: str) -> list[dict]:
    from .config import TrainConfig
    from .train import fit

    rows = []
    for engine, precision in (("torch", "auto"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("auto", "auto")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = fit(TrainConfig(data=folder, out=os.path.join(tmp, "r"), engine=engine, precision=precision,
                                  cache_dir=os.path.join(tmp, "cache")))
            wall = time.perf_counter() - t0
        m = res.metrics
        rows.append({"folder": os.path.basename(os.path.normpath(folder)), "path": f"{engine} {precision}",
                     "wall_s": wall, "embed_s": m.get("embed_seconds"), "embed_images_per_s": m.get("embed_images_per_s"),
                     "val_accuracy": m.get("val_accuracy"), "val_n": m.get("val_n"),
                     "graphs_s": (m.get("features") or {}).get("graphs_seconds", 0.0),
                     "chosen": (m.get("features") or {}).get("precision")})
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
    rows = [r for f in present for r in end_to_end(f)]
    print(f"\n{'folder':12} {'path':18} {'wall s':>7} {'graphs s':>8} {'embed s':>8} {'img/s':>7} {'val acc':>8}  used")
    for r in rows:
        print(f"{r['folder']:12} {r['path']:18} {r['wall_s']:7.1f} {r['graphs_s']:8.1f} {r['embed_s'] or 0:8.1f} "
              f"{r['embed_images_per_s'] or 0:7.1f} {r['val_accuracy']:8.3f}  {r['chosen'] or ''}")
    print("\nwall s = the first feature-extraction run from an empty cache (scan, hashing, decoding, embedding, head); "
          "graphs s = the one-time ONNX export and int8 calibration inside it; embed s = hashing + decoding + forward")
    return 0
