"""Features from every depth of a frozen backbone: its intermediate block groups' outputs, pooled, beside the final
features, from the same forward pass.

The final pooled features are what ImageNet's classifier read; on pictures unlike everyday photos (hand signs on one
wall, clothing on one background, handwritten characters, scans) the earlier layers hold more of what tells the
classes apart: Head2Toe (Evci et al., ICML 2022) showed linear heads on pooled intermediate features matching
fine-tuning on average. Measured here with EfficientNet-Lite0 and logistic regression on 20 labels a class / every
label (docs/benchmarks.md, "More from the frozen network"): hand signs 0.88 -> 0.94 / 0.98 -> 0.99, clothing 0.81 ->
0.82 / 0.86 -> 0.89, handwritten digits 0.87 -> 0.97 / 0.94 -> 0.98; on everyday photos they can hurt (hymenoptera at
20 a class 0.91 -> 0.83), which is why the head chooses per folder (engine/train/probe.py).

What is tapped (``LITE_TAPS``): the block groups 2-5 (24-112 channels, at 1/4 to 1/16 of the input) averaged over
each quarter of the picture (a 2x2 grid, Head2Toe's pooling where channels are few) and groups 6-7 (192 and 320
channels) averaged over the whole picture: 1,536 numbers beside Lite0's 1,280. Of the variants measured (a grid on
every group: 3,072; means only: 768), the grid everywhere was at most half a point better, the means alone up to 4
points worse on hand signs. Only the EfficientNet-Lite family is tapped; torchvision backbones give their final
features alone.
"""

from __future__ import annotations

# (block group, pooling): groups numbered as FeatureNet.stage_names (0 the stem, 1-7 the block groups, 8 the head)
LITE_TAPS: tuple[tuple[int, str], ...] = ((2, "grid"), (3, "grid"), (4, "grid"), (5, "grid"), (6, "mean"), (7, "mean"))
VERSION = 1  # what the taps are: a cache or a graph made for other taps is never mixed with these


def supports(net) -> bool:
    """Whether this backbone's intermediate stages can be tapped (the EfficientNet-Lite family)."""
    return getattr(net, "kind", "") == "lite"


def tap_widths(net) -> list[int]:
    """The number of features each tap adds (channels x cells), in order."""
    out = []
    for group, pool in LITE_TAPS:
        last = net.body.get_submodule(net.stage_names[group][-1])
        channels = last._block_args.output_filters
        out.append(channels * (4 if pool == "grid" else 1))
    return out


def describe(widths: list[int]) -> list[dict]:
    """The taps as model.json records them (``widths``: :func:`tap_widths`, or as a cache file kept them)."""
    return [
        {"stage": group, "pool": "2x2" if pool == "grid" else "mean", "dims": int(w)}
        for (group, pool), w in zip(LITE_TAPS, widths)
    ]


def _grid(x):
    """The mean of each quarter of (N, C, H, W) -> (N, 4C), cells as adaptive pooling places them (overlapping by
    a row when H is odd), written with slices so that every exporter traces it."""
    import torch

    h, w = int(x.shape[2]), int(x.shape[3])
    rows = [(0, -(-h // 2)), (h // 2, h)]
    cols = [(0, -(-w // 2)), (w // 2, w)]
    cells = [x[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, 2).flatten(1)


def lite_forward(body, x, taps: bool):
    """EfficientNet-Lite's ``extract_features``, returning the final pooled features and (``taps``) the pooled
    outputs of ``LITE_TAPS`` concatenated after them."""
    import torch

    x = body._swish(body._bn0(body._conv_stem(x)))
    ends = {}
    if taps:
        groups = [[], *lite_block_groups(body)]  # as FeatureNet numbers the stages: [stem], groups 1-7
        ends = {groups[g][-1]: pool for g, pool in LITE_TAPS}
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
