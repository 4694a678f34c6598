"""Feature extraction: each image through the frozen backbone once (or straight from the embedding cache), then a
linear head trained on those features (engine/train/head.py, NumPy).

Two ways in: :func:`from_cache` needs no PyTorch at all (every embedding and the backbone's weights are cached) and
returns None when anything is missing; :func:`run` embeds what is not cached. Both return a :class:`TrainOutcome`
and raise :class:`Cancelled` when stopped (the head trains in milliseconds per epoch: nothing worth keeping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.config import TrainConfig
from engine.data.decode import content_hash, read_bytes
from engine.data.folder import Dataset
from engine.data.known_files import KnownFiles
from engine.data.splits import _key
from engine.embed.embeddings import BackboneSnapshot, EmbeddingCache, embed_files, hash_files
from engine.events import Callbacks, CancelToken, EngineError, Phase, Progress
from engine.meters import TrainOutcome
from engine.network.backbones import LoadedBackbone, describe_without_torch
from engine.network.onnx_runtime import cache_variants, describe_variant
from engine.paths import default_cache_dir
from engine.runs import BackboneFacts
from engine.train.crossfit import K_FOLDS, cross_fit, fold_ids
from engine.train.head import balanced_class_weights, train_linear_head


def labels(ds: Dataset, split: str) -> tuple[list[str], np.ndarray]:
    """Paths and class indices of one split."""
    items = ds.split(split)
    return [s.path for s in items], np.array([s.label for s in items], dtype=np.int64)


@dataclass
class HeadOutcome:
    head: dict[str, np.ndarray]  # the head to save
    history: list[dict]
    best_epoch: int
    logits: dict  # "val" / "test": raw logits of the images in ``held_items`` (None where empty)
    features: dict  # "train" / "val": what "unfamiliar" compares (None where empty)
    held_items: dict | None = None  # the samples behind ``logits`` per split; None: the dataset's own splits
    cross_fit: dict | None = None  # how the figures were judged, when cross-fitted
    probe: dict | None = None  # automatic mode: a head on the training split alone (fine-tuning starts from it)


def cross_fits(cfg: TrainConfig, ds: Dataset) -> bool:
    """Whether this run cross-fits: validation was carved out of the labelled images (not a val/ folder the user
    made, which stays as given) and there are enough of them for every fold to hold a few."""
    pool = len(ds.split("train")) + len(ds.split("val"))
    return cfg.cross_fit == "auto" and bool(ds.split("val")) and not ds.validation_given() and pool >= 4 * K_FOLDS


def train_head(
    cfg: TrainConfig,
    ds: Dataset,
    features: dict[str, np.ndarray],
    dim: int,
    cb: Callbacks,
    cancel: CancelToken,
    probe: bool = False,
) -> HeadOutcome:
    """The head on each split's features (cross-fitted on train + val when :func:`cross_fits`)."""
    split_X = {}
    for split in ("train", "val", "test"):
        p, y = labels(ds, split)
        X = np.stack([features[q] for q in p]).astype(np.float32) if p else np.zeros((0, dim), np.float32)
        split_X[split] = (X, y)
    if len(split_X["train"][0]) == 0:
        raise EngineError("No training images left after skipping unreadable files.")
    cb.on_progress(Progress(Phase.TRAINING, 0, cfg.epochs))
    cross = cross_fits(cfg, ds)
    pool_y = np.concatenate([split_X["train"][1], split_X["val"][1]]) if cross else split_X["train"][1]
    weights = balanced_class_weights(pool_y, len(ds.classes), mode=cfg.balance)
    if weights is not None:
        cb.on_log(
            "Classes are unbalanced: the loss weights each class by the inverse of its share ("
            + ", ".join(f"{c} {w:.2f}" for c, w in zip(ds.classes, weights))
            + ")"
        )
    train = dict(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        patience=cfg.patience, seed=cfg.seed, cancel=cancel, on_batch=cb.on_train_batch_end,
        on_epoch=cb.on_train_epoch_end, on_log=cb.on_log, class_weight=weights,
    )  # fmt: skip
    feats = {split: split_X[split][0] if len(split_X[split][0]) else None for split in ("train", "val")}
    if cross:
        return _cross_fitted(cfg, ds, split_X, pool_y, train, cb, probe)
    cb.on_log(f"Training the head: {len(split_X['train'][0])} train / {len(split_X['val'][0])} val images")
    res = train_linear_head(*split_X["train"], *split_X["val"], len(ds.classes), **train)
    # Predictions come straight from the features (identical to running the saved model on the images).
    logits = {
        split: split_X[split][0] @ res.head["weight"].T + res.head["bias"] if len(split_X[split][0]) else None
        for split in ("val", "test")
    }
    return HeadOutcome(res.head, res.history, res.best_epoch, logits, feats)


def _cross_fitted(cfg: TrainConfig, ds: Dataset, split_X: dict, y: np.ndarray, train: dict, cb: Callbacks, probe: bool):
    """k fold heads judge every labelled image out of sample; the saved head learns from all of them."""
    pool = ds.split("train") + ds.split("val")
    X = np.concatenate([split_X["train"][0], split_X["val"][0]])
    folds = fold_ids(y, [_key(s.path, ds.root) for s in pool], cfg.seed)
    extra = {"final": np.ones(len(pool), bool)}
    if probe:
        extra["probe"] = np.arange(len(pool)) < len(split_X["train"][0])
    cb.on_log(
        f"Training the head on all {len(pool)} labelled images, cross-fitted: {K_FOLDS} more heads, each trained "
        f"on {K_FOLDS - 1} of {K_FOLDS} folds, judge every image out of sample (the figures, the epoch, "
        + ("the learning rate (of " + ", ".join(f"{r:g}" for r in cfg.lr_grid) + ") " if cfg.lr_grid else "")
        + "and the calibration come from those judgements)"
    )
    res = cross_fit(X, y, folds, len(ds.classes), extra=extra, lrs=cfg.lr_grid or None, **train)
    head = res.heads["final"]
    Xte = split_X["test"][0]
    logits = {"val": res.oof_logits, "test": Xte @ head["weight"].T + head["bias"] if len(Xte) else None}
    info = {"method": "cross-validated", "folds": K_FOLDS, "images": len(pool),
            "fold_sizes": [int((folds == f).sum()) for f in range(K_FOLDS)],
            "lr": res.lr, "lr_tried": res.tried}  # fmt: skip
    return HeadOutcome(
        head, res.history, res.best_epoch, logits, {"train": X, "val": None},
        held_items={"val": pool, "test": ds.split("test")}, cross_fit=info, probe=res.heads.get("probe"),
    )  # fmt: skip


def _known_hashes(ds: Dataset, cache_dir: str, cancel: CancelToken) -> tuple[KnownFiles, list[str] | None]:
    """Every sample's content hash (None if a file cannot be read), unchanged files' from the files-read index."""
    known = KnownFiles(cache_dir)
    hashes, errors = hash_files([s.path for s in ds.samples], cancel, known)
    return known, None if errors else hashes


def _remember(known: KnownFiles, ds: Dataset, hashes: list[str]) -> None:
    """Every sample's embedding was found: none of them needs its header checked or its bytes read next time."""
    known.remember([s.path for s in ds.samples], hashes)
    known.save()


def from_cache(
    cfg: TrainConfig, ds: Dataset, cache_dir: str | None, cb: Callbacks, cancel: CancelToken, probe: bool = False
) -> TrainOutcome | None:
    """Without PyTorch, when every image's embedding and the backbone's weights are cached; None otherwise.

    Only backbones whose identity is known without torch qualify: the bundled default
    (see ``backbones.describe_without_torch``).
    """
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
    known, hashes = _known_hashes(ds, cache_dir, cancel)
    if hashes is None:
        return None
    for variant in cache_variants(cfg.engine, cfg.precision):  # any complete cache these settings allow
        cache = EmbeddingCache(cache_dir, cfg.backbone, wid, pre, variant)
        if cache.rebuilt_reason:
            cb.on_log(cache.rebuilt_reason)
        if cache.has_all(hashes):
            break
    else:
        return None
    by_path = {s.path: cache.get(h) for s, h in zip(ds.samples, hashes)}
    backbone_sd = snap.load()
    if backbone_sd is None:
        return None
    _remember(known, ds, hashes)
    dim = int(next(iter(by_path.values())).shape[0]) if by_path else 0
    embed_s = time.perf_counter() - t0
    cb.on_log(f"Features ready in {embed_s:.1f} s (all {len(by_path)} from cache; the backbone is not run)")
    h = train_head(cfg, ds, by_path, dim, cb, cancel, probe)
    return TrainOutcome(
        weights={**backbone_sd, **{f"head.{k}": v for k, v in h.head.items()}},
        history=h.history,
        best_epoch=h.best_epoch,
        logits=h.logits,
        features=h.features,
        held_items=h.held_items,
        cross_fit=h.cross_fit,
        probe_head=h.probe,
        embed_seconds=embed_s,
        from_cache=len(by_path),
        features_path={**describe_variant(variant), "reason": "all from the cache"},
        facts=BackboneFacts(pre, dim, source, wid, "cpu (head trained on cached features; backbone not run)"),
    )


def _embed(cfg, ds, backbone, device, cache_dir, cb, cancel, dist):
    """Features of every sample: (features, kept indices, errors, cached count, embedded count); under torchrun
    each rank embeds every world-th image and rank 0 gathers them and keeps the cache (other ranks get None)."""
    paths = [s.path for s in ds.samples]
    if not dist.enabled:
        f, kept, errors, stats = embed_files(
            paths,
            backbone,
            device,
            cache_dir=cache_dir,
            backbone_name=cfg.backbone,
            cancel=cancel,
            progress=cb.on_progress,
            log=cb.on_log,
            engine=cfg.engine,
            precision=cfg.precision,
        )
        return f, kept, errors, stats["cached"], stats["embedded"], stats["features"]
    # (under torchrun every rank uses PyTorch: the features are gathered into one cache)
    mine = list(range(dist.rank, len(paths), dist.world))
    f, k, errors, stats = embed_files(
        [paths[i] for i in mine],
        backbone,
        device,
        cache_dir=cache_dir if dist.is_main else None,
        backbone_name=cfg.backbone,
        cancel=cancel,
        progress=cb.on_progress,
        log=cb.on_log,
    )
    parts = dist.gather(([mine[j] for j in k], f, errors, stats))
    if not dist.is_main:
        return None
    kept = [i for part in parts for i in part[0]]
    feats = np.concatenate([part[1] for part in parts]) if kept else np.zeros((0, f.shape[1]), np.float32)
    if cache_dir:
        cache = EmbeddingCache(cache_dir, cfg.backbone, backbone.weights_id, backbone.preprocessing)  # torch's
        for i, vec in zip(kept, feats):
            cache.put(content_hash(read_bytes(paths[i])), vec)
        cache.save()
    return (
        feats,
        kept,
        [e for part in parts for e in part[2]],
        sum(p[3]["cached"] for p in parts),
        sum(p[3]["embedded"] for p in parts),
        {"engine": "torch", "precision": "fp32"},
    )


def run(
    cfg: TrainConfig,
    ds: Dataset,
    backbone: LoadedBackbone,
    device,
    cache_dir: str | None,
    cb: Callbacks,
    cancel: CancelToken,
    dist,
    probe: bool = False,
) -> TrainOutcome | None:
    """Embed (what the cache lacks), then train the head (``probe``: see ``train.fit``). None on ranks other than 0
    under torchrun."""
    import torch

    from engine.network.model import make_classifier

    t0 = time.perf_counter()
    embedded = _embed(cfg, ds, backbone, device, cache_dir, cb, cancel, dist)
    if embedded is None:
        return None
    feats, kept, errors, n_cached, n_embedded, features_path = embedded
    embed_s = time.perf_counter() - t0
    cb.on_log(f"Features ready in {embed_s:.1f} s ({n_cached} from cache, {n_embedded} embedded)")
    paths = [s.path for s in ds.samples]
    by_path = {paths[i]: feats[j] for j, i in enumerate(kept)}
    ds.drop(errors)
    if errors:
        cb.on_log(f"Skipped {len(errors)} file(s) that could not be decoded")
    model = make_classifier(backbone.net, len(ds.classes))
    backbone_sd = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    if cache_dir:
        # The backbone's weights next to its embeddings: the next run on these images can then save a complete
        # model without loading torch (see from_cache).
        snap = BackboneSnapshot(cache_dir, cfg.backbone, backbone.weights_id, backbone.preprocessing)
        if not snap.exists():
            try:
                snap.save({k: v.detach().cpu().contiguous().numpy() for k, v in backbone_sd.items()})
            except OSError as exc:
                cb.on_log(f"Could not save the backbone snapshot ({exc.strerror or exc}); continuing without it")
    h = train_head(cfg, ds, by_path, feats.shape[1], cb, cancel, probe)
    model.head.load_state_dict({k: torch.from_numpy(v) for k, v in h.head.items()})
    return TrainOutcome(
        weights=model.state_dict(),
        history=h.history,
        best_epoch=h.best_epoch,
        logits=h.logits,
        features=h.features,
        held_items=h.held_items,
        cross_fit=h.cross_fit,
        probe_head=h.probe,
        features_path=features_path,
        embed_seconds=embed_s,
        embedded=n_embedded,
        from_cache=n_cached,
    )


def embed_dataset(cfg, ds: Dataset, cb: Callbacks, cancel: CancelToken) -> tuple[np.ndarray, list[str]]:
    """Every sample's embedding and content hash, aligned with ``ds.samples`` (unreadable files are dropped from
    ``ds`` with their reason). ``cfg`` needs train's backbone, weights, download, device, cache and cache_dir.
    From the cache alone without importing torch when every image is there (the bundled backbone)."""
    cache_dir = (cfg.cache_dir or default_cache_dir()) if cfg.cache else None
    facts = describe_without_torch(cfg.backbone, cfg.weights) if cache_dir else None
    if facts is not None:
        known, hashes = _known_hashes(ds, cache_dir, cancel)
        for variant in cache_variants(cfg.engine, cfg.precision) if hashes else []:
            cache = EmbeddingCache(cache_dir, cfg.backbone, facts[2], facts[0], variant)
            if cache.has_all(hashes):
                cb.on_log(f"All {len(hashes)} embeddings from the cache (the backbone is not run)")
                _remember(known, ds, hashes)
                return np.stack([cache.get(h) for h in hashes]).astype(np.float32), hashes
    from engine.network.backbones import load_backbone
    from engine.network.device import resolve_device

    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.weights, cfg.download)
    feats, kept, errors, stats = embed_files(
        [s.path for s in ds.samples],
        backbone,
        device,
        cache_dir=cache_dir,
        backbone_name=cfg.backbone,
        cancel=cancel,
        progress=cb.on_progress,
        log=cb.on_log,
        engine=cfg.engine,
        precision=cfg.precision,
    )
    ds.drop(errors)
    return feats, stats["hashes"]
