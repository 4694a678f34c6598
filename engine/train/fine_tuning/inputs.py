"""What fine-tuning's epochs run on: whole images (randomly cropped and mirrored) through the whole network, or the
frozen stages' outputs, computed once, through the trained stages only.

With most stages frozen (and BatchNorm statistics frozen: engine/train/fine_tuning/loop.py ``_freeze``), the frozen
stages
compute the same output for an image every epoch. So their output is computed once for each training image and for
its mirror image (the augmentation: a horizontal flip, which cannot crop away what matters), and once for each
validation and test image; each epoch then runs only the trained stages. On a 2-core CPU an epoch costs the trained
stages' forward and backward instead of the whole network's (docs/benchmarks.md).

Only for backbones whose forward pass is a plain sequence of stages that can be cut (EfficientNet-Lite0, the bundled
one), in one process; others fine-tune through the whole network with random crops (:func:`image_batches`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from engine.config import TrainConfig
from engine.events import Callbacks, CancelToken, Phase, Progress
from engine.meters import RateMeter
from engine.network.forward import Forward

MEMORY_SHARE = 0.4  # the cached outputs may take at most this share of the memory available


def applies(net, unfreeze, dist) -> bool:
    """Whether fine-tuning ``net`` with ``unfreeze`` stages trained can run its frozen stages once (one process:
    under torchrun every rank would have to compute and hold its own copy). The one answer to that question: the
    recipe, the loop's choice of augmentation and :meth:`Inputs.choose` all ask it here."""
    n = len(net.stage_names) if hasattr(net, "stage_names") else 0
    trained = n if unfreeze == "all" else int(unfreeze)
    return not dist.enabled and frozen_blocks(net, n - trained) is not None


def frozen_blocks(net, n_frozen_stages: int) -> int | None:
    """How many of a Lite backbone's blocks the first ``n_frozen_stages`` stages hold (stage 0 is the stem); None
    when the network cannot be cut there (a torchvision backbone, every stage frozen, or none)."""
    if getattr(net, "kind", None) != "lite" or not 1 <= n_frozen_stages < len(net.stage_names):
        return None
    return sum(len(names) for names in net.stage_names[1:n_frozen_stages])


def pooled_prefix_hook(net, n_frozen_stages: int, sink: list):
    """Append the frozen stages' output, averaged over space, to ``sink`` on every forward pass of ``net`` (a Lite
    backbone, or its folded copy); returns the hook's handle, or None when ``net`` cannot be cut there."""
    n_blocks = frozen_blocks(net, n_frozen_stages)
    if not n_blocks:
        return None
    return net.body._blocks[n_blocks - 1].register_forward_hook(
        lambda _m, _i, out: sink.append(out.float().mean((2, 3)))
    )


def split(model, n_frozen_stages: int):
    """(prefix, tail) modules sharing ``model``'s layers: prefix(normalised images) -> the last frozen stage's
    output; tail(that) -> logits, ``tail.features(that)`` -> embeddings. None when this backbone cannot be cut
    there (a torchvision backbone, every stage frozen, or none)."""
    from torch import nn

    net = model.backbone
    n_blocks = frozen_blocks(net, n_frozen_stages)
    if n_blocks is None:
        return None
    body = net.body
    rate = body._global_params.drop_connect_rate or 0.0

    class Prefix(nn.Module):
        kind = "lite"  # (fold_batchnorm folds its BatchNorm layers for ONNX Runtime)

        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            x = body._swish(body._bn0(body._conv_stem(x)))
            for b in body._blocks[:n_blocks]:
                x = b(x, drop_connect_rate=None)  # frozen: eval mode, no stochastic depth
            return x

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.dropout, self.final_map, self.head = body, model.dropout, model.final_map, model.head

        def features(self, x):
            # the same computation as EfficientNet.extract_features from block n_blocks on
            for idx in range(n_blocks, len(body._blocks)):
                x = body._blocks[idx](x, drop_connect_rate=rate * idx / len(body._blocks))
            return body._swish(body._bn1(body._conv_head(x))).mean((2, 3))

        def forward(self, x):
            return self.head(self.dropout(self.final_map(self.features(x))))

    return Prefix(), Tail()


def fits(shape: tuple, n_half: int, n_float: int, avail: int | None) -> bool:
    """Whether ``n_half`` float16 and ``n_float`` float32 outputs of ``shape`` fit in the memory share allowed."""
    need = 2 * n_half + 4 * n_float
    for d in shape:
        need *= d
    return avail is None or need <= MEMORY_SHARE * avail


def prefix_runner(prefix, fwd, cfg: TrainConfig, weights_id: str, n_frozen: int, cache_dir: str | None, cb: Callbacks):
    """uint8 batch -> the frozen stages' outputs (a tensor): through ONNX Runtime fp32 on the CPU, as embedding
    does (engine/network/onnx_runtime.py: 2-3x PyTorch's speed there, outputs equal to 1e-5; the graph is made once and
    kept with the embedding cache's graphs), else PyTorch."""
    import torch

    from engine.network import onnx_runtime

    if cache_dir and fwd.device.type == "cpu" and onnx_runtime.use_onnx(cfg.engine, fwd.device):
        path = os.path.join(
            cache_dir, "graphs", f"{cfg.backbone}-{weights_id}.prefix{n_frozen}-{fwd.pre.size}px.fp32.onnx"
        )
        try:
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                onnx_runtime.export_graph(prefix, fwd.pre, path)
            ort = onnx_runtime.OrtForward(path, fwd.pre, "fp32", batch_size=fwd.batch_size)
            cb.on_log("The frozen stages run through ONNX Runtime (fp32)")
            return lambda u8: torch.from_numpy(ort(u8))
        except Exception as exc:  # an export or runtime failure only costs speed
            cb.on_log(f"ONNX Runtime could not run the frozen stages ({exc.__class__.__name__}: {exc}); using PyTorch")
    return lambda u8: fwd(u8, prefix)


def precompute(run, decoded: dict, batch_size: int, mirror: bool, cb: Callbacks, cancel: CancelToken) -> dict:
    """The prefix's outputs: ``train``, ``train_mirrored`` (None without ``mirror``) in float16 (half the memory;
    training noise dwarfs the rounding), ``val``, ``test`` in float32 (so the saved model, run on the whole images,
    gives the same validation probabilities); None for an empty split."""
    import torch

    jobs = [("train", False), ("train_mirrored", True), ("val", False), ("test", False)]
    if not mirror:
        jobs.pop(1)
    total = sum(len(decoded[s.split("_")[0]]) for s, _ in jobs if decoded[s.split("_")[0]] is not None)
    out, done, meter = {}, 0, RateMeter(total)
    with torch.inference_mode():
        for name, mirror in jobs:
            data = decoded[name.split("_")[0]]
            if data is None or not len(data):
                out[name] = None
                continue
            parts = []
            for s in range(0, len(data), batch_size):
                cancel.raise_if_cancelled()
                u8 = data[s : s + batch_size]
                y = run(u8.flip(-1) if mirror else u8)
                parts.append(y.half() if name.startswith("train") else y)
                done += len(u8)
                cb.on_progress(
                    Progress(
                        Phase.EMBEDDING, done, total, meter.rate(done), meter.eta(done), message="frozen stages, once"
                    )
                )
            out[name] = torch.cat(parts)
    out.setdefault("train_mirrored", None)
    cb.on_log(
        f"Ran the frozen stages once over {total} images"
        + (" (mirrored training images included)" if mirror else "")
        + " in "
        f"{meter.elapsed():.1f} s; each epoch now runs only the trained stages"
    )
    return out


def mirrored_batches(cached: dict, generator):
    """A batch function for training: each image, or its mirror image, at random (when mirrored ones exist)."""
    import torch

    plain, mirrored = cached["train"], cached["train_mirrored"]

    def batch(idx, device):
        if mirrored is None:
            return plain[idx.to(plain.device)].to(device, non_blocking=True).float()
        flip = (torch.rand(len(idx), generator=generator) < 0.5).view(-1, 1, 1, 1)
        src = idx.to(plain.device)
        x = torch.where(flip.to(plain.device), mirrored[src], plain[src])
        return x.to(device, non_blocking=True).float()

    return batch


def map_tail(fn, data, fwd, cancel: CancelToken | None = None):
    """``fn`` (the tail, or its ``features``) over cached outputs in batches, float32 on the device."""
    import torch

    outs = []
    with torch.inference_mode():
        for s in range(0, len(data), fwd.batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            with fwd.autocast():
                outs.append(fn(data[s : s + fwd.batch_size].to(fwd.device).float()).float())
    return torch.cat(outs) if outs else torch.zeros(0, device=fwd.device)


def random_resized_crop(x, size: int, generator, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
    """Per-sample random resized crop + horizontal flip of a float batch, in one batched op on its device."""
    import torch
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    dev = x.device
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).clamp(max=1.0) * w
    ch = torch.sqrt(area / r).clamp(max=1.0) * h
    x1 = torch.rand(n, generator=generator) * (w - cw)
    y1 = torch.rand(n, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x1, y1, x1 + cw, y1 + ch], 1).to(dev, x.dtype)
    out = roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(-1), out)
    return out


def image_batches(data, fwd: Forward, augment: bool, generator):
    """A batch function over uint8 images (N,3,S,S): each one randomly cropped and mirrored (``augment``) or
    resized, normalised, on the device."""
    import torch.nn.functional as F

    size = fwd.pre.size

    def batch(idx, device):
        xb = data[idx.to(data.device)].to(device, non_blocking=True).float()
        if augment:
            xb = random_resized_crop(xb, size, generator)
        elif xb.shape[-1] != size:
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True)
        return fwd.normalise(xb)

    return batch


@dataclass
class Inputs:
    """What the epochs run on: whole images through the whole network (randomly cropped and mirrored), or the
    frozen stages' outputs, computed once, through the trained stages only (engine/py)."""

    fwd: Forward
    model: object
    images: dict  # split -> uint8 images
    batch: object  # (indices, device) -> a training batch's input
    tail: object = None  # the trained stages (cached path) or None
    cached: dict | None = None

    @classmethod
    def choose(
        cls,
        cfg: TrainConfig,
        model,
        n_frozen: int,
        decoded: dict,
        fwd: Forward,
        dist,
        generator,
        cb: Callbacks,
        cancel: CancelToken,
        weights_id: str = "",
        cache_dir: str | None = None,
    ) -> Inputs:
        from engine.data.decode import available_memory

        parts = split(model, n_frozen) if applies(model.backbone, cfg.unfreeze, dist) else None
        if parts is not None:
            prefix, tail = parts
            prefix.eval()
            run = prefix_runner(prefix, fwd, cfg, weights_id, n_frozen, cache_dir, cb)
            shape = tuple(run(decoded["train"][:1]).shape[1:])
            n_held_out = sum(len(decoded[s]) for s in ("val", "test") if decoded[s] is not None)
            if fits(shape, len(decoded["train"]) * (2 if cfg.augment else 1), n_held_out, available_memory()):
                cached = precompute(run, decoded, fwd.batch_size, cfg.augment, cb, cancel)
                return cls(fwd, model, decoded, mirrored_batches(cached, generator), tail, cached)
            cb.on_log("The frozen stages' outputs would not fit in memory: every epoch runs the whole network")
        return cls(fwd, model, decoded, image_batches(decoded["train"], fwd, cfg.augment, generator))

    def has(self, split: str) -> bool:
        return self.images[split] is not None and len(self.images[split]) > 0

    def logits(self, split: str, cancel: CancelToken | None = None):
        if self.tail is None:
            return self.fwd.map(self.images[split], cancel)
        self.model.eval()
        return map_tail(self.tail, self.cached[split], self.fwd, cancel)

    def features(self, split: str, cancel: CancelToken | None = None):
        """Embeddings (NumPy) of a split's images; None for an empty split."""
        if not self.has(split):
            return None
        if self.tail is None:
            return self.fwd.map(self.images[split], cancel, module=self.model.backbone).cpu().numpy()
        self.model.eval()
        return map_tail(self.tail.features, self.cached[split], self.fwd, cancel).cpu().numpy()
