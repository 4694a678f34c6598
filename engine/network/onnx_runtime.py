"""The frozen backbone through ONNX Runtime on the CPU: fp32, or int8 when its features agree with fp32.

PyTorch's eager CPU forward is not what a CPU can do: the same EfficientNet-Lite0 features run by ONNX Runtime were
2.2-3x faster in fp32, and 4.5-6x statically quantised to int8 (QDQ, per-channel weights; the network was designed
for int8: no squeeze-excite, ReLU6; engine/network/int8.py makes the flavour the CPU runs without saturating). The
graphs are
exported once per backbone and weights and kept beside the embedding cache (``graphs/``); the int8 graph is
calibrated on images of the first folder it is made for, and before each use its features are compared with fp32's on
a sample of the user's own images: below the thresholds it is not used and the log says so (``MIN_MEAN_COSINE``,
``MIN_COSINE``). Embeddings from different paths never share a cache file (the cache key names the path), and
model.json records which path made a run's features.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from engine.events import EngineError
from engine.network.backbones import Preprocessing

# int8 is used when the sample's mean cosine with fp32 reaches MIN_MEAN_COSINE and its worst image MIN_COSINE.
# Measured on the 2-core machine (no VNNI), worst / mean, then validation accuracy against fp32: int8 with 7-bit
# weights 0.937 / 0.974 on hymenoptera, 0.774 / 0.915 on flowers, and it lost 4 images there and 1.0 point on
# flowers: must not pass; the graph engine/network/int8.py makes now 0.986 / 0.994 and 0.978 / 0.992 (flowers, 24
# images),
# the same accuracy (0.948 both; 0.774 vs 0.771): must pass. The mean says how far the features moved; the worst
# image guards against a folder where a few images go badly wrong. fp32 vs PyTorch agrees to 1e-5.
MIN_MEAN_COSINE = 0.985
MIN_COSINE = 0.95
# --precision auto makes the int8 graph (9-12 s once, calibration) only for a folder at least this large: on the
# 2-core machine int8 embeds about 1.9 ms/image faster than fp32 end to end (flowers, 134 vs 107 images/s), so
# below ~4,700 images the first run would be slower. Once made, the graph serves every later folder.
INT8_MIN_IMAGES = 4000
SAMPLE = 24  # images compared before int8 is used
INT8_TAPS_REVISION = 2  # how the int8 graph with taps is made (its file name says it)
CALIBRATION = 64  # images the int8 graph is calibrated on
FLAVOUR_ENV = "TRANSFER_STUDIO_INT8_FLAVOUR"  # bench-onnx and the tests measure a flavour this CPU would not pick
EXACT_ENV = "TRANSFER_STUDIO_INT8_EXACT"  # "1": int8 sessions run exactly (OrtForward), for bench-onnx


_MISSING: list[str] = []  # why ONNX Runtime could not be imported (said in the error message)


def available() -> bool:
    """Whether ONNX Runtime loads and the onnx package (the export and the int8 quantiser need it) is installed.
    onnx and ``onnxruntime.quantization`` are found here, not imported: importing them (with ml_dtypes) holds the
    GIL for ~0.5 s, which froze the window for 450-530 ms at the start of every first embedding (the Label tab
    opening a folder; py-spy --gil). They are imported only where a graph is exported or quantised (once)."""
    import importlib.util

    try:
        import onnxruntime  # noqa: F401 (imported only to prove it loads)
    except ImportError as exc:
        _MISSING[:] = [f"{exc.__class__.__name__}: {exc}"]
        return False
    missing = [m for m in ("onnx", "onnxruntime.quantization") if importlib.util.find_spec(m) is None]
    if missing:
        _MISSING[:] = [f"{', '.join(missing)} not installed"]
        return False
    return True


def use_onnx(engine: str, device) -> bool:
    """auto: ONNX Runtime on the CPU when installed, PyTorch elsewhere (GPUs keep their own path)."""
    if engine == "torch":
        return False
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise EngineError("--engine onnxruntime runs on the CPU only: use --device cpu, or --engine auto.")
        if not available():
            raise EngineError(
                "--engine onnxruntime needs the onnxruntime and onnx packages: pip install onnxruntime "
                f"onnx ({'; '.join(_MISSING) or 'not importable'})"
            )
        return True
    return device.type == "cpu" and available()


def cache_variants(engine: str, precision: str, device=None) -> list[str]:
    """The embedding-cache variants a run with these settings may read, preferred first. Without a device (a rerun
    that does not import torch), "auto" accepts any complete cache of the backbone."""
    ort = [variant_name(p) for p in (("int8", "fp32") if precision == "auto" else (precision,))]
    if engine == "torch":
        return ["torch"]
    if engine == "onnxruntime":
        return ort
    if device is None:
        return ort + ["torch"]
    return ort if use_onnx(engine, device) else ["torch"]


def describe_variant(variant: str) -> dict:
    return (
        {"engine": "torch", "precision": "fp32"}
        if variant == "torch"
        else {"engine": "onnxruntime", "precision": variant.removeprefix("ort-")}
    )


def variant_name(precision: str) -> str:
    """The cache variant of an ONNX Runtime path ("ort-fp32", "ort-int8"): embeddings never mix across paths."""
    return f"ort-{precision}"


def _normalise(u8: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(N,3,S,S) uint8 -> the network's float32 input."""
    mean, std = pre.scale_255()
    return (u8.astype(np.float32) - mean) / std


class OrtForward:
    """Same use as ``forward.Forward`` for a frozen backbone: uint8 batches in, float32 features out (NumPy)."""

    backend = "onnxruntime"

    def __init__(
        self, path: str, pre: Preprocessing, precision: str, batch_size: int = 16, exact: bool = False
    ) -> None:
        """``exact``: run the graph with ONNX Runtime's optimisations off (an int8 graph's QDQ in float), which is
        what a CPU whose integer products never saturate computes: how a flavour this CPU cannot run exactly is
        measured and tested (engine/network/int8.py). Slow; never the app's path."""
        import onnxruntime as ort

        exact = exact or (precision == "int8" and os.environ.get(EXACT_ENV) == "1")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        threads = int(os.environ.get("TRANSFER_STUDIO_ORT_THREADS", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.pre, self.precision, self.batch_size = pre, precision, batch_size
        self.input = self.session.get_inputs()[0].name

    def __call__(self, u8) -> np.ndarray:
        x = u8.numpy() if hasattr(u8, "numpy") else np.asarray(u8)
        if x.shape[1] != 3:  # HxWx3 arrays stacked: to (N,3,S,S)
            x = x.transpose(0, 3, 1, 2)
        return self.session.run(None, {self.input: _normalise(np.ascontiguousarray(x), self.pre)})[0]


@dataclass
class Graphs:
    fp32: str
    int8: str
    seconds: float  # one-time cost of making what was missing (0 when both were cached)


def graph_paths(cache_dir: str, backbone: str, weights_id: str, taps: bool | int = False) -> tuple[str, str]:
    """The fp32 graph and this CPU's int8 graph (each flavour its own file: engine/network/int8.py); ``taps``: the
    graphs whose output also holds the intermediate stages' features (engine/network/depths.py; True: this version's
    taps, a number: that version's), files of their own."""
    from engine.network.depths import VERSION

    folder = os.path.join(cache_dir, "graphs")
    version = VERSION if taps is True else int(taps)
    stem = f"{backbone}-{weights_id}" + (f".taps{version}" if taps else "")
    # (the int8 graph with taps as made before its taps' pooling was kept in float: int8.py _tap_pooling; that file
    # is left unread, and the graph is made again under this name)
    revision = f".r{INT8_TAPS_REVISION}" if taps else ""
    return (
        os.path.join(folder, f"{stem}.fp32.onnx"),
        os.path.join(folder, f"{stem}.int8-{int8_flavour()}{revision}.onnx"),
    )


def export_graph(net, pre: Preprocessing, path: str) -> None:
    """``net`` (BatchNorm folded, fp32) as an ONNX graph at ``path`` (atomically), batch size free."""
    import torch

    from engine.network.backbones import fold_batchnorm

    model = fold_batchnorm(net).float().eval()
    example = torch.zeros(2, 3, pre.size, pre.size)
    tmp = f"{path}.tmp-{os.getpid()}"
    kwargs = dict(
        input_names=["images"],
        output_names=["features"],
        opset_version=17,
        dynamic_axes={"images": {0: "N"}, "features": {0: "N"}},
    )
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding are for its developers
        try:
            torch.onnx.export(model, (example,), tmp, dynamo=False, **kwargs)
        except TypeError:  # torch without the dynamo switch
            torch.onnx.export(model, (example,), tmp, **kwargs)
    os.replace(tmp, path)


def int8_flavour() -> str:
    """The int8 flavour to make: ``a7`` on every CPU (engine/network/int8.py says why VNNI CPUs get it too)."""
    from engine.network.int8 import FLAVOURS

    forced = os.environ.get(FLAVOUR_ENV, "")
    if forced:
        if forced not in FLAVOURS:
            raise EngineError(f"{FLAVOUR_ENV}={forced!r}: use one of {', '.join(FLAVOURS)}, or unset it.")
        return forced
    return "a7"


def has_vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 without saturating (AVX-512 VNNI / AVX-VNNI; Linux tells, elsewhere
    assume not). Without it, ONNX Runtime's uint8 x int8 kernels saturate their 16-bit intermediate sums, so only
    the a7 flavour runs exactly (what bench-onnx and the tests need to know)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _quantize(fp32: str, int8: str, calibration: np.ndarray, pre: Preprocessing) -> dict:
    from engine.network.int8 import quantize

    batches = [_normalise(calibration[i : i + 8], pre) for i in range(0, len(calibration), 8)]
    return quantize(fp32, int8, batches, int8_flavour())


def taps_of(net) -> int:
    """Which taps ``net``'s graph outputs: 0 for none, else their version (engine/network/depths.py)."""
    return net.tap_version if getattr(net, "taps", False) else 0


def ensure_graphs(cache_dir: str, backbone_name: str, backbone, calibration: np.ndarray | None, log=None) -> Graphs:
    """The fp32 and int8 graphs of ``backbone`` (made once, then reused); ``calibration``: (N,3,S,S) uint8 images
    of the user's own folder for the int8 graph (only needed when it is missing)."""
    fp32, int8 = graph_paths(cache_dir, backbone_name, backbone.weights_id, taps_of(backbone.net))
    os.makedirs(os.path.dirname(fp32), exist_ok=True)
    t0 = time.perf_counter()
    if not os.path.isfile(fp32):
        if log:
            log("Exporting the backbone to ONNX (once per backbone)")
        export_graph(backbone.net, backbone.preprocessing, fp32)
    if not os.path.isfile(int8) and calibration is not None and len(calibration):
        if log:
            log(f"Quantising the backbone to int8, calibrated on {len(calibration)} of your images (once)")
        done = _quantize(fp32, int8, calibration, backbone.preprocessing)
        _write_json(int8 + ".json", {"calibration_images": int(len(calibration)), **done})
    return Graphs(fp32, int8, time.perf_counter() - t0)


def _write_json(path: str, obj) -> None:
    from engine.runs import atomic_write_json

    atomic_write_json(path, obj)


def agreement(a: np.ndarray, b: np.ndarray, final_dim: int | None = None) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``; with ``final_dim`` (features with the
    intermediate stages' after the final ones), the lower of the two parts' cosines, so that neither part can hide
    behind the other."""
    if final_dim is not None and a.shape[1] > final_dim:
        return np.minimum(agreement(a[:, :final_dim], b[:, :final_dim]), agreement(a[:, final_dim:], b[:, final_dim:]))
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na, 1e-12)


def choose(
    graphs: Graphs,
    pre: Preprocessing,
    precision: str,
    sample: np.ndarray | None,
    batch_size: int,
    log=None,
    final_dim: int | None = None,
) -> tuple[OrtForward, dict]:
    """The session to embed with, and what was decided (recorded in model.json)."""
    fp32 = OrtForward(graphs.fp32, pre, "fp32", batch_size)
    if precision == "fp32" or not os.path.isfile(graphs.int8):
        if precision == "int8":
            raise EngineError("The int8 graph could not be made (no images to calibrate it on).")
        return fp32, {
            "engine": "onnxruntime",
            "precision": "fp32",
            "reason": "asked for" if precision == "fp32" else "no int8 graph",
        }
    int8 = OrtForward(graphs.int8, pre, "int8", batch_size)
    flavour = {"int8_flavour": int8_flavour()}
    if precision == "int8":
        return int8, {"engine": "onnxruntime", "precision": "int8", "reason": "asked for", **flavour}
    if sample is None or not len(sample):
        return fp32, {"engine": "onnxruntime", "precision": "fp32", "reason": "no images to check int8 on"}
    cos = agreement(int8(sample), fp32(sample), final_dim)
    decision = {
        "engine": "onnxruntime",
        **flavour,
        "checked_images": int(len(sample)),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "threshold": MIN_COSINE,
        "mean_threshold": MIN_MEAN_COSINE,
    }
    if cos.min() >= MIN_COSINE and cos.mean() >= MIN_MEAN_COSINE:
        return int8, {**decision, "precision": "int8", "reason": "agrees with fp32"}
    if log:
        log(
            f"int8 features differ from fp32 on your images (cosine mean {cos.mean():.4f}, worst {cos.min():.4f}; "
            f"needed {MIN_MEAN_COSINE} and {MIN_COSINE}): using fp32"
        )
    return fp32, {**decision, "precision": "fp32", "reason": "int8 disagreed with fp32"}
