"""Features from every depth of a frozen backbone: its intermediate block groups' outputs, pooled, beside the final
features, from the same forward pass.

The final pooled features are what ImageNet's classifier read; on pictures unlike everyday photos (hand signs on one
wall, clothing on one background, handwritten characters, scans) the earlier layers hold more of what tells the
classes apart: Head2Toe (Evci et al., ICML 2022) showed linear heads on pooled intermediate features matching
fine-tuning on average. Measured here with EfficientNet-Lite0 and logistic regression on 20 labels a class / every
label (docs/benchmarks.md, "More from the frozen network"): hand signs 0.88 -> 0.94 / 0.98 -> 0.99, clothing 0.81 ->
0.82 / 0.86 -> 0.89, handwritten digits 0.87 -> 0.97 / 0.94 -> 0.98; on everyday photos they can hurt (hymenoptera at
20 a class 0.91 -> 0.83), which is why the head chooses per folder (engine/train/probe.py).

What is tapped (``LAYOUTS[VERSION]``): the outputs of block groups 2-7 (24-320 channels, at 1/4 to 1/32 of the input),
each averaged over each quarter of the picture (a 2x2 grid, Head2Toe's pooling): 3,072 numbers beside Lite0's 1,280.
Until version 2, groups 6 and 7 were averaged over the whole picture (1,536 numbers); with the head as it is now
(engine/train/probe.py: two heads mixed, the final features to a power), their grid measured +0.6 point on clothing,
+1.6 on hand signs and +0.8 on chest X-rays at 20 labels a class over random splits, nothing on the folders where the
final features alone are read (docs/benchmarks.md, "Every group on a grid"). Runs saved with version 1's taps still
load: their network computes the taps their head was trained on (``LAYOUTS``, :func:`version_of`). Only the
EfficientNet-Lite family is tapped; torchvision backbones give their final features alone.
"""

from __future__ import annotations

# (block group, pooling): groups numbered as FeatureNet.stage_names (0 the stem, 1-7 the block groups, 8 the head)
LAYOUTS: dict[int, tuple[tuple[int, str], ...]] = {
    1: ((2, "grid"), (3, "grid"), (4, "grid"), (5, "grid"), (6, "mean"), (7, "mean")),
    2: ((2, "grid"), (3, "grid"), (4, "grid"), (5, "grid"), (6, "grid"), (7, "grid")),
}
VERSION = 2  # what the taps are: a cache or a graph made for other taps is never mixed with these


def supports(net) -> bool:
    """Whether this backbone's intermediate stages can be tapped (the EfficientNet-Lite family)."""
    return getattr(net, "kind", "") == "lite"


def tap_widths(net, version: int | None = None) -> list[int]:
    """The number of features each tap adds (channels x cells), in order (``version``: of ``LAYOUTS``; default: the
    one the network computes)."""
    out = []
    for group, pool in LAYOUTS[version or getattr(net, "tap_version", VERSION)]:
        last = net.body.get_submodule(net.stage_names[group][-1])
        channels = last._block_args.output_filters
        out.append(channels * (4 if pool == "grid" else 1))
    return out


def describe(widths: list[int], version: int = VERSION) -> list[dict]:
    """The taps as model.json records them (``widths``: :func:`tap_widths`, or as a cache file kept them)."""
    return [
        {"stage": group, "pool": "2x2" if pool == "grid" else "mean", "dims": int(w)}
        for (group, pool), w in zip(LAYOUTS[version], widths)
    ]


def version_of(record: list[dict] | None) -> int | None:
    """The version of ``LAYOUTS`` whose taps model.json's ``record`` (:func:`describe`) describes; None when no
    version of this program computes them."""
    if not record:
        return None
    got = tuple((r.get("stage"), "grid" if r.get("pool") == "2x2" else "mean") for r in record)
    return next((v for v, layout in LAYOUTS.items() if layout == got), None)


def _grid(x):
    """The mean of each quarter of (N, C, H, W) -> (N, 4C), cells as adaptive pooling places them (overlapping by
    a row when H is odd), written with slices so that every exporter traces it."""
    import torch

    h, w = int(x.shape[2]), int(x.shape[3])
    rows = [(0, -(-h // 2)), (h // 2, h)]
    cols = [(0, -(-w // 2)), (w // 2, w)]
    cells = [x[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, 2).flatten(1)


def lite_forward(body, x, layout: tuple[tuple[int, str], ...] | None):
    """EfficientNet-Lite's ``extract_features``, returning the final pooled features and (``layout``: one of
    ``LAYOUTS``, None for none) the pooled outputs of those taps concatenated after them."""
    import torch

    x = body._swish(body._bn0(body._conv_stem(x)))
    ends = {}
    if layout:
        groups = [[], *lite_block_groups(body)]  # as FeatureNet numbers the stages: [stem], groups 1-7
        ends = {groups[g][-1]: pool for g, pool in layout}
    parts = []
    n = len(body._blocks)
    for idx, block in enumerate(body._blocks):
        rate = body._global_params.drop_connect_rate
        x = block(x, drop_connect_rate=rate * float(idx) / n if rate else rate)
        if idx in ends:
            parts.append(_grid(x) if ends[idx] == "grid" else x.mean((2, 3)))
    x = body._swish(body._bn1(body._conv_head(x)))
    final = x.mean((2, 3))
    return torch.cat([final, *parts], 1) if parts else final


def lite_block_groups(body) -> list[list[int]]:
    """The block indices of each of the architecture's block groups (consecutive blocks with the same output
    width): Lite0's seven."""
    groups: list[list[int]] = []
    last = None
    for i, b in enumerate(body._blocks):
        width = b._block_args.output_filters
        if width != last:
            groups.append([])
            last = width
        groups[-1].append(i)
    return groups
