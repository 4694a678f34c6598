"""``fit``: feature extraction (frozen backbone, head trained on cached embeddings) and fine-tuning.

One function, one config, callbacks for progress, a cancel token checked between batches. A cancelled run with
at least one finished epoch still evaluates and saves its best epoch, marked ``"status": "cancelled"``.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .backbones import DEFAULT_BACKBONE, load_backbone
from .data import Dataset, scan_folder
from .evaluate import classification_metrics
from .events import (BatchMetrics, Callbacks, Cancelled, CancelToken, EngineError, EpochMetrics, Phase, Progress,
                     Throttle)

MODES = ("feature-extraction", "fine-tuning")
DEFAULTS = {
    # Head on cached features: an epoch costs milliseconds, so many epochs with early stopping.
    "feature-extraction": {"epochs": 100, "batch_size": 64, "lr": 3e-3, "patience": 15},
    "fine-tuning": {"epochs": 5, "batch_size": 32, "lr": 1e-3, "patience": 3},
}


@dataclass
class TrainConfig:
    """Everything a training job needs; the CLI flags and the GUI controls map one-to-one onto these fields."""

    data: str
    out: str | None = None
    mode: str = "feature-extraction"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # local weights file instead of the default source
    download: bool = False  # allow fetching torchvision weights (off: works offline, fails with a clear message)
    unfreeze: int | str = 2  # fine-tuning: last N stages, or "all"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    augment: bool = True
    patience: int | None = None  # early stopping on validation loss; 0 = off
    val_split: float = 0.2
    test_split: float = 0.0
    seed: int = 0
    device: str = "auto"
    cache: bool = True
    cache_dir: str | None = None
    overwrite: bool = False
    linear_probe_init: bool = True  # fine-tuning: start the head from a linear probe (LP-FT)

    def resolved(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise EngineError(f"Unknown mode '{self.mode}': use one of {', '.join(MODES)}.")
        d = DEFAULTS[self.mode]
        c = copy.copy(self)
        c.epochs = self.epochs if self.epochs is not None else d["epochs"]
        c.batch_size = self.batch_size if self.batch_size is not None else d["batch_size"]
        c.lr = self.lr if self.lr is not None else d["lr"]
        c.patience = self.patience if self.patience is not None else d["patience"]
        if c.epochs < 1 or c.batch_size < 1 or not c.lr > 0:
            raise EngineError("Epochs and batch size must be at least 1 and the learning rate above 0.")
        if isinstance(c.unfreeze, str) and c.unfreeze != "all":
            try:
                c.unfreeze = int(c.unfreeze)
            except ValueError as exc:
                raise EngineError("--unfreeze takes a number of stages or 'all'.") from exc
        return c


@dataclass
class FitResult:
    run_dir: str | None
    cancelled: bool
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""


def resolve_device(name: str = "auto"):
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("CUDA was requested but no CUDA GPU is available here. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EngineError("MPS was requested but is not available here. Use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise EngineError(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.") from exc


def device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _warm_optimizer_imports() -> None:
    """torch.optim's first step imports torch._dynamo (~2 s here); do that in the background while we scan/embed."""
    import sys
    import threading

    if "torch._dynamo" not in sys.modules:
        threading.Thread(target=lambda: __import__("torch._dynamo"), name="warm-imports", daemon=True).start()


# ---------------------------------------------------------------------------------------------------------- head

def _train_head(Xtr, ytr, Xva, yva, num_classes: int, cfg: TrainConfig, cb: Callbacks, cancel: CancelToken,
                emit: bool = True):
    """A linear head on fixed features (NumPy; see engine/head.py). Returns a :class:`HeadResult`."""
    from .head import train_linear_head

    return train_linear_head(Xtr, ytr, Xva, yva, num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                             lr=cfg.lr, weight_decay=cfg.weight_decay, patience=cfg.patience, seed=cfg.seed,
                             cancel=cancel, on_batch=cb.on_train_batch_end if emit else None,
                             on_epoch=cb.on_train_epoch_end if emit else None, on_log=cb.on_log if emit else None)


# --------------------------------------------------------------------------------------------------- fine-tuning

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


def _forward_backward(model, x, y, scaler, amp_dtype, device):
    """One optimiser step's forward and backward (a seam the tests use to simulate running out of GPU memory)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    return logits.detach(), loss.detach()


def _set_train_mode(model, frozen_modules) -> None:
    model.train()
    for m in frozen_modules:
        m.eval()  # frozen stages keep their ImageNet BatchNorm statistics


def _predict_u8(model, data_u8, pre, device, bs: int, amp_dtype, cancel: CancelToken | None = None,
                features: bool = False):
    """Logits (or backbone features) for a uint8 (N,3,S,S) tensor at the model's input size."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    outs = []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(data_u8), bs):
            if cancel is not None and cancel.cancelled:
                raise Cancelled()
            x = data_u8[s:s + bs].to(device, non_blocking=True).float()
            if x.shape[-1] != pre.size:
                x = F.interpolate(x, size=(pre.size, pre.size), mode="bilinear", antialias=True, align_corners=False)
            x = x.sub_(mean).div_(std)
            if device.type != "mps":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model.backbone(x) if features else model(x)
            outs.append(out.float())
    return torch.cat(outs) if outs else torch.zeros(0)


def _amp_setup(device):
    import torch

    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")
    return None, None


# --------------------------------------------------------------------------------------------------------- fit

def fit(config: TrainConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None) -> FitResult:
    """Train a classifier on ``config.data`` and save a run folder. See the module docstring for cancel rules."""
    from .distributed import setup

    cfg = config.resolved()
    dist = setup(cfg.device)
    try:
        return _fit(cfg, dist, callbacks, cancel)
    finally:
        dist.close()


@dataclass
class _BackboneFacts:
    """What the run folder records about the backbone (from a loaded backbone, or from the cache without torch)."""

    preprocessing: object  # Preprocessing
    feature_dim: int
    weights_source: str
    weights_id: str
    device: str  # label for metrics.json

    @classmethod
    def of(cls, backbone, device) -> "_BackboneFacts":
        return cls(backbone.preprocessing, int(backbone.net.feature_dim), backbone.weights_source,
                   backbone.weights_id, device_label(device))


def _fit(cfg: TrainConfig, dist, callbacks: Callbacks | None, cancel: CancelToken | None) -> FitResult:
    # Under torchrun only rank 0 reports and writes; the other ranks compute.
    cb = (callbacks or Callbacks()) if dist.is_main else Callbacks()
    cancel = cancel or CancelToken()
    t_start = time.perf_counter()
    if cfg.mode == "fine-tuning":
        _warm_optimizer_imports()
    np.random.seed(cfg.seed % (2**32))

    try:
        cb.on_log(f"Scanning {cfg.data}")
        ds = scan_folder(cfg.data, cfg.val_split, cfg.test_split, cfg.seed, cancel, cb.on_progress)
    except Cancelled:
        return FitResult(None, True, message="Cancelled while scanning; nothing was saved.")
    counts = {c: sum(v.values()) for c, v in ds.counts().items()}
    cb.on_log(f"Found {len(ds.samples)} images in {len(ds.classes)} classes ({ds.layout} layout): "
              + ", ".join(f"{c} {n}" for c, n in counts.items()))
    for w in ds.warnings:
        cb.on_log(f"Warning: {w}")
    if ds.skipped:
        cb.on_log(f"Skipped {len(ds.skipped)} unreadable file(s); see skipped.csv in the run folder")

    if cfg.mode == "feature-extraction" and not dist.enabled:
        try:
            done = _fit_from_cached_features(cfg, ds, cb, cancel, t_start)
        except Cancelled:
            return FitResult(None, True, skipped=ds.skipped, message="Cancelled; nothing was saved.")
        if done is not None:
            return done

    import torch

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    cb.on_log(f"Device: {device_label(device)}"
              + (f"; {dist.world} processes ({dist.backend}) under torchrun" if dist.enabled else ""))
    backbone = load_backbone(cfg.backbone, cfg.weights, cfg.download)
    cb.on_log(f"Backbone: {cfg.backbone} ({sum(p.numel() for p in backbone.net.parameters()) / 1e6:.2f} M "
              f"parameters, {backbone.net.feature_dim}"
              f"-d features), weights from {backbone.weights_source}")
    try:
        if cfg.mode == "feature-extraction":
            state = _fit_feature_extraction(cfg, ds, backbone, device, cb, cancel, dist)
        else:
            state = _fit_fine_tuning(cfg, ds, backbone, device, cb, cancel, dist)
    except Cancelled:
        return FitResult(None, True, skipped=ds.skipped,
                         message="Cancelled before the first epoch finished; nothing was saved.")
    if state is None:
        return FitResult(None, True, skipped=ds.skipped, message="Cancelled; nothing was saved.")
    if not dist.is_main:
        return FitResult(None, state.get("cancelled", False), message=f"rank {dist.rank}: done (rank 0 saves)")
    return _finish(cfg, ds, _BackboneFacts.of(backbone, device), state, cb, t_start)


def _labels(ds: Dataset, split: str) -> tuple[list[str], np.ndarray]:
    items = ds.split(split)
    return [s.path for s in items], np.array([s.label for s in items], dtype=np.int64)


def _cache_dir(cfg: TrainConfig) -> str | None:
    if not cfg.cache:
        return None
    if cfg.cache_dir:
        return cfg.cache_dir
    from .features import default_cache_dir

    return default_cache_dir()


def _fit_from_cached_features(cfg, ds, cb, cancel, t_start) -> FitResult | None:
    """Feature extraction without PyTorch when every image's embedding and the backbone's weights are cached.

    Returns None (and the caller takes the full path) when anything is missing. Only backbones whose identity is
    known without torch qualify: the bundled default (see ``backbones.describe_without_torch``).
    """
    from .backbones import describe_without_torch
    from .features import BackboneSnapshot, EmbeddingCache
    from .pixels import content_hash, read_bytes

    cache_dir = _cache_dir(cfg)
    if not cache_dir:  # (any --device: the head trains on the CPU in every mode; the backbone is not run)
        return None
    facts = describe_without_torch(cfg.backbone, cfg.weights)
    if facts is None:
        return None
    pre, source, wid = facts
    snap = BackboneSnapshot(cache_dir, cfg.backbone, wid, pre)
    if not snap.exists():
        return None
    t0 = time.perf_counter()
    cache = EmbeddingCache(cache_dir, cfg.backbone, wid, pre)
    if cache.rebuilt_reason:
        cb.on_log(cache.rebuilt_reason)
    by_path = {}
    for i, s in enumerate(ds.samples):
        if i % 256 == 0:
            cancel.raise_if_cancelled()
        try:
            vec = cache.get(content_hash(read_bytes(s.path)))
        except OSError:
            return None
        if vec is None:
            return None
        by_path[s.path] = vec
    backbone_sd = snap.load()
    if backbone_sd is None:
        return None
    dim = int(next(iter(by_path.values())).shape[0]) if by_path else 0
    embed_s = time.perf_counter() - t0
    cb.on_log(f"Features ready in {embed_s:.1f} s (all {len(by_path)} from cache; the backbone is not run)")
    state = _head_on_features(cfg, ds, by_path, dim, cb, cancel)
    if state is None:
        return FitResult(None, True, skipped=ds.skipped, message="Cancelled; nothing was saved.")
    state.update(embed_seconds=embed_s, embed_stats={"cached": len(by_path), "embedded": 0},
                 weights={**backbone_sd, **{f"head.{k}": v for k, v in state["head"].items()}})
    device = "cpu (head trained on cached features; backbone not run)"
    return _finish(cfg, ds, _BackboneFacts(pre, dim, source, wid, device), state, cb, t_start)


def _head_on_features(cfg, ds, by_path, dim: int, cb, cancel) -> dict | None:
    """Train the head on each split's features; None when cancelled (an epoch takes milliseconds)."""
    from .head import softmax

    split_X = {}
    for split in ("train", "val", "test"):
        p, y = _labels(ds, split)
        X = np.stack([by_path[q] for q in p]).astype(np.float32) if p else np.zeros((0, dim), np.float32)
        split_X[split] = (X, y)
    if len(split_X["train"][0]) == 0:
        raise EngineError("No training images left after skipping unreadable files.")
    cb.on_progress(Progress(Phase.TRAINING, 0, cfg.epochs))
    cb.on_log(f"Training the head: {len(split_X['train'][0])} train / {len(split_X['val'][0])} val images")
    try:
        res = _train_head(*split_X["train"], *split_X["val"], len(ds.classes), cfg, cb, cancel)
    except Cancelled:
        return None
    # Feature-extraction predictions come straight from the cached features (identical to running the model).
    probs = {}
    for split in ("val", "test"):
        X = split_X[split][0]
        probs[split] = softmax(X @ res.head["weight"].T + res.head["bias"]) if len(X) else None
    return {"head": res.head, "history": res.history, "best_epoch": res.best_epoch, "cancelled": False,
            "probs": probs}


def _fit_feature_extraction(cfg, ds, backbone, device, cb, cancel, dist):
    import torch

    from .features import BackboneSnapshot, embed_files

    paths = [s.path for s in ds.samples]
    cache_dir = _cache_dir(cfg)
    t0 = time.perf_counter()
    if dist.enabled:
        # Each rank embeds every world-th image; rank 0 gathers them, keeps the cache and trains the head.
        mine = list(range(dist.rank, len(paths), dist.world))
        f, k, errors, stats = embed_files([paths[i] for i in mine], backbone, device,
                                          cache_dir=cache_dir if dist.is_main else None,
                                          backbone_name=cfg.backbone, cancel=cancel, progress=cb.on_progress,
                                          log=cb.on_log)
        parts = dist.gather(([mine[j] for j in k], f, errors, stats))
        if not dist.is_main:
            return {"cancelled": False}
        kept = [i for part in parts for i in part[0]]
        feats = np.concatenate([part[1] for part in parts]) if kept else np.zeros((0, f.shape[1]), np.float32)
        errors = [e for part in parts for e in part[2]]
        stats = {"cached": sum(p[3]["cached"] for p in parts), "embedded": sum(p[3]["embedded"] for p in parts)}
        if cache_dir:
            from .features import EmbeddingCache
            from .pixels import content_hash, read_bytes

            cache = EmbeddingCache(cache_dir, cfg.backbone, backbone.weights_id, backbone.preprocessing)
            for i, vec in zip(kept, feats):
                cache.put(content_hash(read_bytes(paths[i])), vec)
            cache.save()
    else:
        feats, kept, errors, stats = embed_files(paths, backbone, device, cache_dir=cache_dir,
                                                 backbone_name=cfg.backbone, cancel=cancel,
                                                 progress=cb.on_progress, log=cb.on_log)
    embed_s = time.perf_counter() - t0
    cb.on_log(f"Features ready in {embed_s:.1f} s ({stats['cached']} from cache, {stats['embedded']} embedded)")
    ds.drop(errors)
    if errors:
        cb.on_log(f"Skipped {len(errors)} file(s) that could not be decoded")
    from .model import make_classifier

    model = make_classifier(backbone.net, len(ds.classes))
    backbone_sd = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    if cache_dir:
        # The backbone's weights next to its embeddings: the next run on these images can then save a complete
        # model without loading torch (see _fit_from_cached_features).
        snap = BackboneSnapshot(cache_dir, cfg.backbone, backbone.weights_id, backbone.preprocessing)
        if not snap.exists():
            try:
                snap.save({k: v.detach().cpu().contiguous().numpy() for k, v in backbone_sd.items()})
            except OSError as exc:
                cb.on_log(f"Could not save the backbone snapshot ({exc.strerror or exc}); continuing without it")
    state = _head_on_features(cfg, ds, {paths[i]: feats[j] for j, i in enumerate(kept)}, feats.shape[1], cb, cancel)
    if state is None:
        return None
    model.head.load_state_dict({k: torch.from_numpy(v) for k, v in state["head"].items()})
    state.update(embed_seconds=embed_s, embed_stats=stats, weights=model.state_dict())
    return state


def _fit_fine_tuning(cfg, ds, backbone, device, cb, cancel, dist):
    from .pixels import PixelStore

    pre = backbone.preprocessing
    train_size = int(round(pre.size * 256 / 224)) if cfg.augment else pre.size
    need = 3 * (len(ds.split("train")) * train_size ** 2
                + (len(ds.split("val")) + len(ds.split("test"))) * pre.size ** 2)
    store = PixelStore(need, _cache_dir(cfg))
    if store.on_disk:
        cb.on_log(f"The decoded images ({need / 1e9:.1f} GB) would not fit in memory "
                  f"({store.avail / 1e9:.1f} GB available): kept in a file in {store.folder} instead; "
                  "epochs read them from disk, more slowly")
    try:
        return _fine_tune(cfg, ds, backbone, device, cb, cancel, dist, store, train_size)
    finally:
        store.close()  # (the arrays died with _fine_tune's frame)


def _fine_tune(cfg, ds, backbone, device, cb, cancel, dist, store, train_size):
    import torch
    import torch.nn.functional as F

    from .model import make_classifier
    from .pixels import decode_all

    pre = backbone.preprocessing
    decoded = {}
    t0 = time.perf_counter()
    for split in ("train", "val", "test"):
        items = ds.split(split)
        if not items:
            decoded[split] = None
            continue
        size = train_size if split == "train" else pre.size
        cb.on_log(f"Decoding {len(items)} {split} images once ({size}x{size} uint8 cache)")

        def prog(done, total, _s=split):
            cb.on_progress(Progress(Phase.DECODING, done, total, message=_s))

        arr, kept, bad = decode_all([s.path for s in items], pre, size, cancel, prog, device=device,
                                    out=store.array((len(items), 3, size, size)))
        ds.drop(bad)
        decoded[split] = torch.from_numpy(arr)
    cb.on_log(f"Decoded in {time.perf_counter() - t0:.1f} s")
    if decoded["train"] is None or len(decoded["train"]) == 0:
        raise EngineError("No training images left after skipping unreadable files.")
    ytr = torch.from_numpy(_labels(ds, "train")[1])
    yva = torch.from_numpy(_labels(ds, "val")[1])

    amp_dtype, scaler = _amp_setup(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning each new shape costs more than it saves on small data
        need = sum(v.numel() for v in decoded.values() if v is not None)
        free, _ = torch.cuda.mem_get_info(device)
        if need < 0.3 * free:
            decoded = {k: (v.to(device) if v is not None else None) for k, v in decoded.items()}
            cb.on_log("Images kept on the GPU as uint8; augmentation runs on the GPU")
    model = make_classifier(backbone.net, len(ds.classes)).to(device)
    if device.type != "mps":
        model = model.to(memory_format=torch.channels_last)

    # Freeze all but the last N stages.
    stages = backbone.net.stages()
    n_unfreeze = len(stages) if cfg.unfreeze == "all" else max(0, min(int(cfg.unfreeze), len(stages)))
    frozen_stage_mods = [m for group in stages[:len(stages) - n_unfreeze] for m in group]
    for p in model.backbone.parameters():
        p.requires_grad = n_unfreeze > 0
    for m in frozen_stage_mods:
        for p in m.parameters():
            p.requires_grad = False
    n_train_params = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    cb.on_log(f"Fine-tuning the last {n_unfreeze} of {len(stages)} backbone stages "
              f"({n_train_params / 1e6:.2f} M backbone parameters trainable)")

    # LP-FT: start the new head from a linear probe on frozen features, so the first fine-tuning steps do not
    # push random-head gradients into the pretrained layers (Kumar et al., 2022).
    if cfg.linear_probe_init and dist.is_main:  # other ranks receive rank 0's weights when DDP wraps the model
        cb.on_log("Initialising the head with a linear probe on frozen features")
        eval_bs = 8 if device.type == "cpu" else 256
        ftr = _predict_u8(model, decoded["train"], pre, device, eval_bs, amp_dtype, cancel, features=True).cpu()
        fva = (_predict_u8(model, decoded["val"], pre, device, eval_bs, amp_dtype, cancel, features=True).cpu()
               if decoded["val"] is not None else None)
        probe_cfg = copy.copy(cfg)
        probe_cfg.epochs, probe_cfg.lr, probe_cfg.batch_size, probe_cfg.patience = 100, 3e-3, 64, 15
        probe = _train_head(ftr.numpy(), ytr.numpy(), None if fva is None else fva.numpy(), yva.numpy(),
                            len(ds.classes), probe_cfg, cb, cancel, emit=False)
        model.head.load_state_dict({k: torch.from_numpy(v).to(device) for k, v in probe.head.items()})

    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Broadcasts rank 0's weights (head included) to every rank, then averages gradients each step.
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        cb.on_log(f"DistributedDataParallel over {dist.world} processes; global batch {cfg.batch_size} "
                  f"({cfg.batch_size // dist.world} per process)")
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": model.head.parameters(), "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    n = len(ytr)
    bs = min(cfg.batch_size, n)
    gen = torch.Generator().manual_seed(cfg.seed)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    yva_dev = yva.to(device)
    eval_bs = max(bs, 8) if device.type == "cpu" else 256

    best = {"loss": math.inf, "state": None, "epoch": 0}
    history, bad_epochs = [], 0
    throttle = Throttle(0.25)
    epoch = 0
    total_steps = None
    sched = None
    cancelled = False
    while epoch < cfg.epochs:
        steps = math.ceil(n / bs)
        if dist.enabled and n % bs and n % bs < dist.world:
            steps -= 1  # a last batch smaller than the number of processes would leave a rank with nothing
        if sched is None:
            total_steps = cfg.epochs * steps
            warm = max(1, steps // 2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
                1 + math.cos(math.pi * min(1.0, s / max(1, total_steps)))))
        t0 = time.perf_counter()
        _set_train_mode(model, frozen_stage_mods)
        perm = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        try:
            for step in range(steps):
                if dist.any(cancel.cancelled, device):  # every rank stops on the same step (no hang)
                    raise Cancelled()
                idx = perm[step * bs:(step + 1) * bs]
                if dist.enabled:
                    # Same global batch as one process: every rank draws the same permutation (same seed) and
                    # takes its share of each batch; DDP averages the gradients.
                    idx = idx[dist.rank::dist.world]
                src = decoded["train"]
                xb = src[idx.to(src.device)].to(device, non_blocking=True).float()
                yb = ytr[idx].to(device, non_blocking=True)
                if cfg.augment:
                    xb = random_resized_crop(xb, pre.size, gen)
                elif xb.shape[-1] != pre.size:
                    xb = F.interpolate(xb, size=(pre.size, pre.size), mode="bilinear", antialias=True)
                xb = xb.sub_(mean).div_(std)
                if device.type != "mps":
                    xb = xb.contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                logits, loss = _forward_backward(train_model, xb, yb, scaler, amp_dtype, device)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                loss_sum += loss * len(idx)
                correct += (logits.argmax(1) == yb).sum()
                seen += len(idx)
                if throttle.ready() or step == steps - 1:
                    el = time.perf_counter() - t0
                    rate = seen / el if el else 0.0
                    eta = (steps - step - 1) * el / (step + 1) + (cfg.epochs - epoch - 1) * el * steps / (step + 1)
                    cb.on_train_batch_end(BatchMetrics(epoch + 1, step + 1, steps, float(loss_sum) / seen,
                                                       int(correct) / seen, rate, eta))
        except Cancelled:
            cancelled = True
            break
        except Exception as exc:
            if not is_oom(exc) or bs <= 1 or dist.enabled:  # ranks must keep the same batch: no retry under DDP
                raise
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            sched = None
            cb.on_log(f"Out of memory at batch size {bs * 2}: retrying this epoch with batch size {bs}")
            continue
        train_s = time.perf_counter() - t0
        if dist.enabled:  # epoch metrics over the whole global batch, not rank 0's share
            ls, cs, ss = dist.sum([float(loss_sum), float(correct), float(seen)], device)
            loss_sum, correct, seen = torch.tensor(ls), torch.tensor(int(cs)), int(ss)
        try:
            if decoded["val"] is not None and len(decoded["val"]):
                # Under DDP a rank must not stop alone between collectives: cancel is only checked per step.
                lv = _predict_u8(model, decoded["val"], pre, device, eval_bs, amp_dtype,
                                 None if dist.enabled else cancel)
                vloss = float(F.cross_entropy(lv, yva_dev))
                vacc = float((lv.argmax(1) == yva_dev).float().mean())
            else:
                vloss, vacc = float(loss_sum) / seen, float("nan")
        except Cancelled:
            cancelled = True
            break
        epoch += 1
        improved = vloss < best["loss"] - 1e-6
        if improved:
            best = {"loss": vloss, "epoch": epoch,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        secs = time.perf_counter() - t0
        m = EpochMetrics(epoch, cfg.epochs, float(loss_sum) / seen, int(correct) / seen, vloss, vacc,
                         opt.param_groups[0]["lr"], secs, seen / train_s if train_s else 0.0, improved)
        history.append(m.as_row())
        cb.on_train_epoch_end(m)
        if cfg.patience and not math.isnan(vacc) and bad_epochs >= cfg.patience:
            cb.on_log(f"Early stopping: validation loss has not improved for {cfg.patience} epochs "
                      f"(best epoch {best['epoch']}).")
            break
    if best["state"] is None:
        return None
    if cancelled:
        cb.on_log(f"Stopped; keeping the best epoch so far ({best['epoch']})")
    model.load_state_dict(best["state"])
    model.eval()
    probs = {}
    for split in ("val", "test"):
        if decoded[split] is not None and len(decoded[split]):
            cb.on_progress(Progress(Phase.EVALUATING, 0, len(decoded[split])))
            probs[split] = torch.softmax(_predict_u8(model, decoded[split], pre, device, eval_bs, amp_dtype), 1).cpu().numpy()
        else:
            probs[split] = None
    rates = [h["images_per_s"] for h in history]
    model = model.float().to("cpu").to(memory_format=torch.contiguous_format)
    return {"weights": model.state_dict(), "history": history,
            "best_epoch": best["epoch"], "cancelled": cancelled, "probs": probs,
            "train_images_per_s": float(np.median(rates)) if rates else 0.0}


# ---------------------------------------------------------------------------------------------------------- save

def _versions() -> dict:
    import sys
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        # Metadata, not an import: `import torchvision` alone took 1.9 s here, and a run from cached features
        # never imports torch at all.
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    torch = sys.modules.get("torch")  # its __version__ also names the CUDA build (e.g. 2.11.0+cu128)
    return {"transfer_studio": __version__, "torch": torch.__version__ if torch else installed("torch"),
            "torchvision": installed("torchvision"),
            "python": sys.version.split()[0], "platform": platform.platform()}


def _save_weights(path: str, weights: dict) -> None:
    """model.safetensors from torch tensors, or from NumPy arrays when the run never imported torch."""
    meta = {"format": "transfer-studio"}
    if all(isinstance(v, np.ndarray) for v in weights.values()):
        from safetensors.numpy import save_file

        # (not np.ascontiguousarray: it turns 0-d arrays such as BatchNorm's num_batches_tracked into shape (1,))
        save_file({k: np.require(v, requirements="C") for k, v in weights.items()}, path, metadata=meta)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in weights.items()}, path, metadata=meta)


def _finish(cfg, ds, facts: _BackboneFacts, state, cb, t_start) -> FitResult:
    from .runs import RunWriter, default_runs_dir, new_run_name

    cb.on_progress(Progress(Phase.EVALUATING, 0, 1))
    classes = ds.classes
    metrics: dict = {"classes": classes, "status": "cancelled" if state["cancelled"] else "completed"}
    pred_rows = []
    for split in ("val", "test"):
        probs = state["probs"].get(split)
        paths, y = _labels(ds, split)
        if probs is None or not len(y):
            metrics[f"{split}_accuracy"] = None
            continue
        pred = probs.argmax(1)
        m = classification_metrics(y, pred, classes)
        metrics[f"{split}_accuracy"] = m["accuracy"]
        metrics[f"{split}_accuracy_ci95"] = m["accuracy_ci95"]
        metrics[f"{split}_macro_f1"] = m["macro_f1"]
        metrics[f"{split}_n"] = m["n"]
        metrics[f"{split}_per_class" if split == "test" else "per_class"] = m["per_class"]
        metrics[f"{split}_confusion_matrix" if split == "test" else "confusion_matrix"] = m["confusion_matrix"]
        for p, yy, pr in zip(paths, y, probs):
            j = int(pr.argmax())
            pred_rows.append([p, split, classes[int(yy)], classes[j], f"{pr[j]:.6f}"] + [f"{v:.6f}" for v in pr])
    total_s = time.perf_counter() - t_start
    metrics.update({
        "best_epoch": state["best_epoch"], "epochs_run": len(state["history"]),
        "train_seconds": round(total_s, 3), "n_train": len(ds.split("train")), "n_val": len(ds.split("val")),
        "n_test": len(ds.split("test")), "n_skipped": len(ds.skipped), "device": facts.device,
    })
    if "train_images_per_s" in state:  # fine-tuning: images through the backbone per second while training
        metrics["train_images_per_s"] = round(state["train_images_per_s"], 1)
    if "embed_seconds" in state:  # feature extraction: the backbone ran once per image not yet in the cache
        embedded = state["embed_stats"]["embedded"]
        metrics["embed_seconds"] = round(state["embed_seconds"], 3)
        metrics["embeddings_from_cache"] = state["embed_stats"]["cached"]
        metrics["embed_images_per_s"] = (round(embedded / state["embed_seconds"], 1)
                                         if embedded and state["embed_seconds"] > 0 else None)
    out = cfg.out or os.path.join(default_runs_dir(), new_run_name(cfg.backbone, cfg.mode))
    cb.on_progress(Progress(Phase.SAVING, 0, 1))
    writer = RunWriter(out, overwrite=cfg.overwrite)
    try:
        _save_weights(writer.path("model.safetensors"), state["weights"])
        writer.write_csv("history.csv", list(state["history"][0].keys()) if state["history"] else ["epoch"],
                         [list(h.values()) for h in state["history"]])
        writer.write_csv("split.csv", ["path", "split", "class"],
                         ([x.path, x.split, classes[x.label]] for x in ds.samples))
        writer.write_csv("skipped.csv", ["path", "reason"], ds.skipped)
        writer.write_csv("val_predictions.csv", ["path", "split", "label", "prediction", "confidence"]
                         + [f"p_{c}" for c in classes], pred_rows)
        writer.write_json("metrics.json", _json_safe(metrics))
        conf = asdict(cfg)
        writer.write_json("model.json", {
            "format_version": 1, "app": "transfer-studio", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "classes": classes, "backbone": cfg.backbone, "mode": cfg.mode,
            "preprocessing": facts.preprocessing.to_dict(), "feature_dim": facts.feature_dim,
            "head": {"type": "linear", "in_features": facts.feature_dim, "out_features": len(classes),
                     "dropout": 0.2},
            "weights_source": facts.weights_source, "weights_id": facts.weights_id,
            "data": os.path.abspath(cfg.data), "layout": ds.layout, "config": _json_safe(conf),
            "versions": _versions(),
        })
        run_dir = writer.commit()
    except OSError as exc:
        writer.abort()
        raise EngineError(f"Could not save the run to {out}: {exc.strerror or exc}. Free some disk space or "
                          "choose another output folder; earlier runs are untouched.") from exc
    except BaseException:
        writer.abort()
        raise
    acc = metrics.get("val_accuracy")
    ci = metrics.get("val_accuracy_ci95")
    summary = (f"Validation accuracy {acc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}, n={metrics['val_n']})"
               if acc is not None else "No validation split")
    cb.on_log(f"{summary}; saved {run_dir} in {total_s:.1f} s")
    return FitResult(run_dir, state["cancelled"], metrics, state["history"], ds.skipped, summary)


def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj
