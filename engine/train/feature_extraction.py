"""Feature extraction: each image through the frozen backbone once (or straight from the embedding cache), then a
linear head on those features, chosen and solved by engine/train/probe.py (NumPy).

Two ways in: :func:`from_cache` needs no PyTorch at all (every embedding and the backbone's weights are cached) and
returns None when anything is missing; :func:`run` embeds what is not cached. Both return a :class:`TrainOutcome`
and raise :class:`Cancelled` when stopped (the head takes seconds: nothing worth keeping).

The features are the final ones and, on the EfficientNet-Lite family, the intermediate stages' after them
(engine/network/depths.py); the head reads the final ones alone unless the earlier layers' do clearly better out of
fold (``--features auto``), and the saved model computes exactly what the head reads.
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
from engine.embed.cache import BackboneSnapshot, FeatureCache
from engine.embed.embeddings import embed_files, hash_files
from engine.embed.spaces import SpaceStore
from engine.events import Callbacks, CancelToken, EngineError, Phase, Progress
from engine.meters import TrainOutcome
from engine.network import depths
from engine.network.backbones import LoadedBackbone, describe_without_torch
from engine.network.onnx_runtime import cache_variants, describe_variant
from engine.paths import default_cache_dir
from engine.runs import BackboneFacts
from engine.train.crossfit import K_FOLDS, fold_ids
from engine.train.head import balanced_class_weights
from engine.train.probe import DEPTHS, FINAL_POWER, Blocks, Probe, fit_probe, mapped


def labels(ds: Dataset, split: str) -> tuple[list[str], np.ndarray]:
    """Paths and class indices of one split."""
    items = ds.split(split)
    return [s.path for s in items], np.array([s.label for s in items], dtype=np.int64)


@dataclass
class HeadOutcome:
    head: dict[str, np.ndarray]  # the head to save (on the first ``choice.columns`` features)
    history: list[dict]
    best_epoch: int
    logits: dict  # "val" / "test": raw logits of the images in ``held_items`` (None where empty)
    features: dict  # "train" / "val": what "unfamiliar" compares (the final features; None where empty)
    choice: Probe  # which features, which regularisation, and the out-of-fold evidence
    held_items: dict | None = None  # the samples behind ``logits`` per split; None: the dataset's own splits
    cross_fit: dict | None = None  # how the figures were judged, when cross-fitted


def cross_fits(cfg: TrainConfig, ds: Dataset) -> bool:
    """Whether this run cross-fits: validation was carved out of the labelled images (not a val/ folder the user
    made, which stays as given) and there are at least two for every fold (12 labels: each judged by a head trained on
    the other 9-10, rather than 3 held out and 9 trained on)."""
    pool = len(ds.split("train")) + len(ds.split("val"))
    return cfg.cross_fit == "auto" and bool(ds.split("val")) and not ds.validation_given() and pool >= 2 * K_FOLDS


def wants_depths(cfg: TrainConfig) -> bool:
    """Whether the run embeds the intermediate stages too (the head may then choose them)."""
    return cfg.features != "final"


def depths_record(choice: Probe, blocks: Blocks, taps: list[dict] | None) -> dict:
    """model.json's and metrics.json's ``depths``: what the head reads and why."""
    out = {
        "kept": choice.features == DEPTHS,
        "final_dim": blocks.final,
        "final_power": choice.power,  # the head reads the final features raised to it (engine/train/probe.py)
        "C": choice.C,
        "share": choice.share,  # the earlier layers' head's share of the logits (engine/train/probe.py SHARES)
        "why": choice.summary(),
        "tried": choice.tried,
    }
    if choice.C_depths is not None:
        out["C_depths"] = choice.C_depths
    if choice.comparison:
        out["comparison"] = choice.comparison
    if choice.power_check:
        out["power_check"] = choice.power_check
    if choice.features == DEPTHS and taps:
        out["taps"] = taps
    return out


def train_head(
    cfg: TrainConfig,
    ds: Dataset,
    features: dict[str, np.ndarray],
    blocks: Blocks,
    cb: Callbacks,
    cancel: CancelToken,
) -> HeadOutcome:
    """The head on each split's features: chosen out of fold on train + val cross-fitted when :func:`cross_fits`,
    else on the training split's own folds (a val/ folder the user made is then only scored)."""
    split_X = {}
    for split in ("train", "val", "test"):
        p, y = labels(ds, split)
        X = np.stack([features[q] for q in p]) if p else np.zeros((0, blocks.total), np.float32)
        X = X.astype(np.float32, copy=False)  # (the cache's rows are float32 already: no second copy)
        split_X[split] = (X, y)
    if len(split_X["train"][0]) == 0:
        raise EngineError("No training images left after skipping unreadable files.")
    cb.on_progress(Progress(Phase.TRAINING, 0, 1))
    cross = cross_fits(cfg, ds)
    parts = ("train", "val") if cross else ("train",)
    pool = [s for split in parts for s in ds.split(split)]
    X = np.concatenate([split_X[split][0] for split in parts])
    y = np.concatenate([split_X[split][1] for split in parts])
    weights = balanced_class_weights(y, len(ds.classes), mode=cfg.balance)
    if weights is not None:
        cb.on_log(
            "Classes are unbalanced: the loss weights each class by the inverse of its share ("
            + ", ".join(f"{c} {w:.2f}" for c, w in zip(ds.classes, weights))
            + ")"
        )
    folds = fold_ids(y, [_key(s.path, ds.root) for s in pool], cfg.seed)
    extra = {"final": np.ones(len(pool), bool)}
    depth_words = " and whether the earlier layers' features help" if blocks.total > blocks.final else ""
    cb.on_log(
        (
            f"Training the head on all {len(pool)} labelled images, cross-fitted: {K_FOLDS} more heads, each trained "
            f"on {K_FOLDS - 1} of {K_FOLDS} folds, judge every image out of sample (the figures, "
        )
        if cross
        else (
            f"Training the head on {len(pool)} train images ({len(split_X['val'][0])} validation images only "
            f"scored); {K_FOLDS} fold heads within them choose "
        )
        + f"the regularisation{depth_words}"
        + (" and the calibration come from those judgements)" if cross else "")
    )
    mapped(X, blocks.final, copy=False)  # (a new array: split_X keeps the features as they are)
    # every image's features fix the scaling (no labels): the labelled ones, then any others (without them, X itself:
    # no second copy, nor a second mapping, of 4,317 x 4,352 numbers on flowers)
    others = [split_X[s][0] for s in split_X if s not in parts and len(split_X[s][0])]
    allx = np.concatenate([X, *(mapped(o, blocks.final) for o in others)]) if others else X
    cache_dir = (cfg.cache_dir or default_cache_dir()) if cfg.cache else None
    choice = fit_probe(
        X, y, folds, len(ds.classes), blocks, k=K_FOLDS, extra=extra, class_weight=weights, stats=allx,
        features=cfg.features, seed=cfg.seed, cancel=cancel, on_epoch=cb.on_train_epoch_end, on_log=cb.on_log,
        spaces=SpaceStore(cache_dir, paths=True), power=FINAL_POWER,
    )  # fmt: skip
    head = choice.heads["final"]
    cols = choice.columns

    def scored(split):
        Xs = split_X[split][0]
        return mapped(Xs[:, :cols], blocks.final, choice.power) @ head["weight"].T + head["bias"] if len(Xs) else None

    final = {split: split_X[split][0][:, : blocks.final] if len(split_X[split][0]) else None for split in parts}
    history, best = choice.history, len(choice.history)
    if cross:
        info = {"method": "cross-validated", "folds": K_FOLDS, "images": len(pool),
                "fold_sizes": [int((folds == f).sum()) for f in range(K_FOLDS)], "C": choice.C,
                "features": choice.features}  # fmt: skip
        return HeadOutcome(
            head, history, best, {"val": choice.oof_logits, "test": scored("test")},
            {"train": final["train"] if not cross else np.concatenate([final[p] for p in parts]), "val": None},
            choice, held_items={"val": pool, "test": ds.split("test")}, cross_fit=info,
        )  # fmt: skip
    feats = {"train": final["train"], "val": split_X["val"][0][:, : blocks.final] if len(split_X["val"][0]) else None}
    return HeadOutcome(head, history, best, {"val": scored("val"), "test": scored("test")}, feats, choice)


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
    cfg: TrainConfig, ds: Dataset, cache_dir: str | None, cb: Callbacks, cancel: CancelToken
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
    taps = wants_depths(cfg)
    for variant in cache_variants(cfg.engine, cfg.precision):  # any complete cache these settings allow
        cache = FeatureCache(cache_dir, cfg.backbone, wid, pre, variant, taps)
        if cache.rebuilt_reason:
            cb.on_log(cache.rebuilt_reason)
        if cache.has_all(hashes) and (not taps or cache.widths):
            break
    else:
        return None
    by_path = dict(zip((s.path for s in ds.samples), cache.stack(hashes)))
    backbone_sd = snap.load()
    if backbone_sd is None:
        return None
    _remember(known, ds, hashes)
    final_dim = int(cache.final.get(hashes[0]).shape[0]) if hashes else 0
    blocks = Blocks([final_dim, *(cache.widths or [])])
    embed_s = time.perf_counter() - t0
    cb.on_log(f"Features ready in {embed_s:.1f} s (all {len(by_path)} from cache; the backbone is not run)")
    h = train_head(cfg, ds, by_path, blocks, cb, cancel)
    return _outcome(
        h, blocks, {**backbone_sd, **{f"head.{k}": v for k, v in h.head.items()}},
        taps=depths.describe(cache.widths) if cache.widths else None, embed_seconds=embed_s,
        from_cache=len(by_path), features_path={**describe_variant(variant), "reason": "all from the cache"},
        facts=BackboneFacts(pre, h.choice.columns, source, wid, "cpu (head on cached features; backbone not run)"),
    )  # fmt: skip


def _outcome(h: HeadOutcome, blocks: Blocks, weights: dict, taps: list[dict] | None, **more) -> TrainOutcome:
    return TrainOutcome(
        weights=weights, history=h.history, best_epoch=h.best_epoch, logits=h.logits, features=h.features,
        held_items=h.held_items, cross_fit=h.cross_fit,
        depths=depths_record(h.choice, blocks, taps), **more,
    )  # fmt: skip


def _embed(cfg, ds, backbone, device, cache_dir, cb, cancel, dist):
    """Features of every sample: (features, kept indices, errors, cached count, embedded count); under torchrun
    each rank embeds every world-th image and rank 0 gathers them and keeps the cache (other ranks get None)."""
    paths = [s.path for s in ds.samples]
    taps = wants_depths(cfg)
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
            taps=taps,
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
        taps=taps,
    )
    parts = dist.gather(([mine[j] for j in k], f, errors, stats))
    if not dist.is_main:
        return None
    kept = [i for part in parts for i in part[0]]
    feats = np.concatenate([part[1] for part in parts]) if kept else np.zeros((0, f.shape[1]), np.float32)
    if cache_dir:
        from engine.network import depths

        tapped = taps and depths.supports(backbone.net)
        cache = FeatureCache(cache_dir, cfg.backbone, backbone.weights_id, backbone.preprocessing, "torch", tapped)
        widths = depths.tap_widths(backbone.net) if tapped else None
        for j, i in enumerate(kept):
            feats[j] = cache.put(content_hash(read_bytes(paths[i])), feats[j], backbone.net.final_dim, widths)
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
) -> TrainOutcome | None:
    """Embed (what the cache lacks), then train the head. None on ranks other than 0
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
    model = make_classifier(backbone.net, len(ds.classes), final_power=FINAL_POWER)
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
    net = backbone.net
    widths = depths.tap_widths(net) if feats.shape[1] > net.final_dim else []
    blocks = Blocks([net.final_dim, *widths])
    h = train_head(cfg, ds, by_path, blocks, cb, cancel)
    if h.choice.features == DEPTHS or h.choice.power != FINAL_POWER:  # the saved network computes what the head reads
        net.with_taps(h.choice.features == DEPTHS)
        model = make_classifier(net, len(ds.classes), final_power=h.choice.power)
    model.head.load_state_dict({k: torch.from_numpy(v) for k, v in h.head.items()})
    return _outcome(
        h, blocks, model.state_dict(), depths.describe(widths) if widths else None, features_path=features_path,
        embed_seconds=embed_s, embedded=n_embedded, from_cache=n_cached,
    )  # fmt: skip


@dataclass
class Embedded:
    """Every sample's features and content hash, aligned with the dataset's samples."""

    features: np.ndarray  # (n, blocks.total): the final features, then the intermediate stages' (with taps)
    hashes: list[str]
    blocks: Blocks

    @property
    def final(self) -> np.ndarray:
        return self.features[:, : self.blocks.final]


def embed_dataset(cfg, ds: Dataset, cb: Callbacks, cancel: CancelToken, taps: bool = False) -> Embedded:
    """Every sample's embedding and content hash, aligned with ``ds.samples`` (unreadable files are dropped from
    ``ds`` with their reason); ``taps``: the intermediate stages' features too, where the backbone has them. ``cfg``
    needs train's backbone, weights, download, device, cache and cache_dir. From the cache alone without importing
    torch when every image is there (the bundled backbone)."""
    cache_dir = (cfg.cache_dir or default_cache_dir()) if cfg.cache else None
    facts = describe_without_torch(cfg.backbone, cfg.weights) if cache_dir else None
    if facts is not None:
        known, hashes = _known_hashes(ds, cache_dir, cancel)
        for variant in cache_variants(cfg.engine, cfg.precision) if hashes else []:
            cache = FeatureCache(cache_dir, cfg.backbone, facts[2], facts[0], variant, taps)
            if cache.has_all(hashes) and (not taps or cache.widths):
                cb.on_log(f"All {len(hashes)} embeddings from the cache (the backbone is not run)")
                _remember(known, ds, hashes)
                feats = cache.stack(hashes)
                final_dim = int(cache.final.get(hashes[0]).shape[0])
                return Embedded(feats, hashes, Blocks([final_dim, *(cache.widths or [])]))
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
        taps=taps,
    )
    ds.drop(errors)
    final_dim = stats["final_dim"]
    widths = depths.tap_widths(backbone.net) if feats.shape[1] > final_dim else []
    return Embedded(feats, stats["hashes"], Blocks([final_dim, *widths]))
