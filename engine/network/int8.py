"""Static int8 quantisation of an exported backbone (ONNX Runtime QDQ) that every x86 CPU runs exactly.

The shipped flavour, ``a7``: 8-bit per-channel weights, activations in 7 bits (0..127), and the first
``FP32_LEADING_CONVS`` convolutions (everything that reads the image or a half-resolution map) kept in fp32.

Why 7-bit activations: without AVX-512 VNNI / AVX-VNNI, ONNX Runtime's uint8 x int8 kernels add pairs of products
in 16 bits, which saturates once two products reach 2 x 255 x 128 (mean feature cosine with fp32 0.88 on
hymenoptera). The usual way out, 7-bit weights (``reduce_range``), costs the weights a bit and that is where
EfficientNet-Lite's error comes from (weights alone at 7 bits: mean cosine 0.984; at 8 bits: 0.996). With 7-bit
activations and 8-bit weights 127 x 128 x 2 stays under 32,767, so nothing saturates, and activations lose little.
A CPU with VNNI adds in 32 bits and computes the same graph to the same values, so one graph serves both kinds.

Flavours for VNNI CPUs were measured too (docs/benchmarks.md, "int8 on CPUs with VNNI"): ``s8``, the fully quantised
8-bit graph those CPUs got before, fell below the agreement check on the synthetic test folder and on flowers (worst /
mean cosine 0.85 / 0.953 and 0.90 / 0.975: --precision auto silently stayed on fp32); ``v8``, 8-bit activations
with the leading convolutions in fp32, agrees best (0.989 / 0.997, 0.992 / 0.996, 0.972 / 0.994 on the synthetic
folder, hymenoptera, flowers) but its validation accuracy on hymenoptera was 2 images below fp32 (a7: 1 above), and
its speed on a VNNI CPU is not measured yet. Both stay available to ``bench-onnx --flavours`` (and to
``TRANSFER_STUDIO_INT8_FLAVOUR``). What a graph computes where no product saturates is what ONNX Runtime computes with
its optimisations off (QDQ in float, ``exact=True`` in ``onnx_backend.OrtForward``): that is how the VNNI flavours
are measured and tested on a CPU without VNNI (on ``a7``, run both ways, the two agree to 0.001 in cosine).

How ``a7`` is made with ONNX Runtime's own quantiser: a first pass calibrates the usual 8-bit activation ranges; a
second one quantises with every activation's scale widened to 127 steps (``TensorQuantOverrides``), keeping the ReLU6
clips as nodes (``QDQKeepRemovableActivations``), which :func:`_clips_in_uint8` then turns into clips on the uint8
values (0..127: no float round trip, and nothing above 127 reaches a matrix product).
"""

from __future__ import annotations

import logging
import os

import numpy as np

QMAX_NO_VNNI = 127
# These first convolutions stay in fp32 (EfficientNet-Lite: the stem, block 0, block 1's expansion and
# depthwise: everything that reads the image or a half-resolution map, where low-bit activations cost the most).
# a7, kept in fp32 -> worst / mean cosine on 48 hymenoptera images, validation accuracy hymenoptera (fp32 0.948)
# and flowers (fp32 0.771): stem only 0.975 / 0.992, 0.935, 0.785; 3 convolutions 0.980 / 0.993, 0.941, 0.780;
# 5: 0.986 / 0.994, 0.948, 0.774, and 174 images/s against 199 with 3 (2 threads); 3 fell to a worst cosine of
# 0.755 on flowers calibrated on hymenoptera, 5 kept 0.978.
FP32_LEADING_CONVS = 5
# flavour -> (leading convolutions kept in fp32, top of the uint8 activations); v8 and s8 for bench-onnx's comparison
FLAVOURS = {"a7": (FP32_LEADING_CONVS, QMAX_NO_VNNI), "v8": (FP32_LEADING_CONVS, 255), "s8": (0, 255)}


def quantize(fp32: str, out: str, batches: list[np.ndarray], flavour: str) -> dict:
    """Quantise ``fp32`` into ``out`` (atomically), calibrated on ``batches`` of network inputs, in ``flavour``
    (one of ``FLAVOURS``); returns what was done (recorded beside the graph)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown int8 flavour {flavour!r} (one of {', '.join(FLAVOURS)})")
    lead, qmax = FLAVOURS[flavour]
    prepped, tmp = f"{out}.pre-{os.getpid()}.onnx", f"{out}.tmp-{os.getpid()}.onnx"
    quiet = logging.getLogger()  # the quantiser logs per-tensor notes on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quant_pre_process(fp32, prepped, skip_symbolic_shape=True)
        first, pooling = _leading_convs(prepped, lead), _tap_pooling(prepped)
        exclude = first + pooling
        if qmax == 255:
            _quantize_static(prepped, tmp, batches, exclude=exclude)
            info = {"activations": "uint8"}
        else:
            _quantize_static(prepped, tmp, batches, exclude=exclude, keep_clips=True)
            overrides = {
                t: [
                    {
                        "scale": np.array(s * 255 / qmax, dtype=np.float32),
                        "zero_point": np.array(round(z * qmax / 255), dtype=np.uint8),
                    }
                ]
                for t, (s, z) in _activation_params(tmp).items()
            }
            # every activation's range is given now: one image is enough for the calibration this pass insists on
            _quantize_static(
                prepped,
                tmp,
                [batches[0][:1]],
                exclude=exclude,
                keep_clips=True,
                extra={"TensorQuantOverrides": overrides},
            )
            _clips_in_uint8(tmp, qmax)
            info = {"activations": f"uint8, 0..{qmax}"}
        os.replace(tmp, out)
    finally:
        quiet.setLevel(level)
        for p in (prepped, tmp):
            if os.path.exists(p):
                os.unlink(p)
    return {
        "format": "QDQ",
        "per_channel": True,
        "flavour": flavour,
        "weights": "int8 per channel",
        **info,
        "kept_in_fp32": first,
        **({"taps_pooled_in_float": len(pooling)} if pooling else {}),
    }


def _quantize_static(src: str, dst: str, batches: list[np.ndarray], exclude=(), keep_clips=False, extra=None):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"images": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    options = {"QDQKeepRemovableActivations": keep_clips, **(extra or {})}
    quantize_static(
        src,
        dst,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=False,
        nodes_to_exclude=list(exclude),
        extra_options=options,
    )


def _leading_convs(path: str, n: int) -> list[str]:
    """The first ``n`` convolutions of the graph, in order."""
    import onnx

    return [node.name for node in onnx.load(path).graph.node if node.op_type == "Conv"][:n] if n else []


def _tap_pooling(path: str) -> list[str]:
    """The nodes that pool the intermediate stages' outputs into the taps and join them to the final features
    (engine/network/depths.py), kept in float: quantised, the output's Concat shared one 7-bit scale between the
    final features (values ~0.2) and the taps (~3), and the taps' means were rounded again; the graph's features
    then agreed with fp32 at a cosine of 0.93 (final) and 0.79-0.94 (taps) on flowers, against 0.993 for the graph
    without taps. The block outputs themselves stay quantised: the taps read them as the int8 network computes
    them. The final features' pooling (the mean of the last activation, a Clip) is quantised as in the graph without
    taps. Empty for a graph without taps."""
    import onnx

    nodes = onnx.load(path).graph.node
    producer = {o: n for n in nodes for o in n.output}
    return [
        n.name
        for n in nodes
        if n.op_type in ("Slice", "Unsqueeze", "Concat", "Flatten")
        or (n.op_type == "ReduceMean" and getattr(producer.get(n.input[0]), "op_type", "") != "Clip")
    ]


def _activation_params(path: str) -> dict[str, tuple[float, int]]:
    """Scale and zero point of every activation the QDQ graph at ``path`` quantises."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(path).graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    return {
        n.input[0]: (float(init[n.input[1]]), int(init[n.input[2]]))
        for n in g.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init
    }


def _clips_in_uint8(path: str, qmax: int) -> None:
    """Rewrite ``DequantizeLinear -> Clip -> QuantizeLinear`` (same scale and zero point on both sides) as a Clip of
    the uint8 values, its top at most ``qmax``; and clip every other quantised activation to that top too, so
    no value the 16-bit kernel cannot take reaches a matrix product."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(path)
    g = m.graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    replace, drop, clipped = {}, set(), set()

    def u8(name: str, value: float) -> str:
        g.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.uint8), name))
        return name

    for n in g.node:
        if n.op_type != "Clip":
            continue
        dq, after = producer.get(n.input[0]), consumers.get(n.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        scale, zero = float(init[dq.input[1]]), int(init[dq.input[2]])
        if float(init[q.input[1]]) != scale or int(init[q.input[2]]) != zero:
            continue
        lo = float(init[n.input[1]]) if len(n.input) > 1 and n.input[1] else -np.inf
        hi = float(init[n.input[2]]) if len(n.input) > 2 and n.input[2] else np.inf
        qlo = int(np.clip(zero + np.round(lo / scale), 0, qmax)) if np.isfinite(lo) else 0
        qhi = int(np.clip(zero + np.round(hi / scale), 0, qmax)) if np.isfinite(hi) else qmax
        replace[id(n)] = helper.make_node(
            "Clip",
            [dq.input[0], u8(f"{n.name}_u8lo", qlo), u8(f"{n.name}_u8hi", qhi)],
            [q.output[0]],
            name=f"{n.name}_u8",
        )
        drop.add(id(q))
        clipped.add(q.output[0])
        if len(consumers[dq.output[0]]) == 1:  # the new clip is the only reader of the value before it
            drop.add(id(dq))
            clipped.add(dq.input[0])
    nodes = []
    for n in g.node:
        if id(n) in drop:
            continue
        nodes.append(replace.get(id(n), n))
        out = n.output[0] if n.output else ""
        if (
            n.op_type == "QuantizeLinear"
            and id(n) not in drop
            and out not in clipped
            and len(n.input) > 2
            and init.get(n.input[2], np.zeros(0)).dtype == np.uint8
            and n.input[0] not in init
        ):
            # the consumers read the clipped copy
            clipped_name = f"{out}_u8top"
            for c in consumers.get(out, []):
                c.input[:] = [clipped_name if i == out else i for i in c.input]
            nodes.append(
                helper.make_node(
                    "Clip",
                    [out, u8(f"{out}_u8lo", 0), u8(f"{out}_u8hi", qmax)],
                    [clipped_name],
                    name=f"{out}_u8top_clip",
                )
            )
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, path)
