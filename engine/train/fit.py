"""``fit``: scan (or take the dataset already scanned), choose the path, train, save a run folder.

The two strategies live in engine/train/feature_extraction.py and engine/train/fine_tuning/loop.py; the run folder's
format in
engine/runs.py. A cancelled run with at least one finished epoch still evaluates and saves its best epoch, marked
``"status": "cancelled"``; a cancel before that saves nothing. Either way the result says ``cancelled``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from engine.config import TrainConfig
from engine.data.folder import NO_VAL_FOLDER, Dataset, scan
from engine.data.known_files import KnownFiles
from engine.data.labels import checks_summary, random_checks, read_labels, scan_labelled
from engine.data.splits import untrained_classes
from engine.embed.spaces import SpaceStore, space_key
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, Progress
from engine.meters import TrainOutcome
from engine.network.backbones import load_backbone
from engine.network.device import device_label, resolve_device, warm_optimizer_imports
from engine.network.distributed import setup
from engine.paths import default_cache_dir, default_runs_dir
from engine.runs import BackboneFacts, model_json, new_run_name, save_run
from engine.train import auto, feature_extraction
from engine.train.crossfit import K_FOLDS
from engine.train.fine_tuning import loop as fine_tuning
from engine.trust.calibration import calibrate, probabilities
from engine.trust.familiarity import K, familiarity_block, leave_one_out, normalise
from engine.trust.scores import split_report, wilson_interval

__all__ = ["TrainConfig", "FitResult", "fit"]


@dataclass
class HeldOut:
    """One held-out split as the saved run scores it: paths, true class indices, calibrated probabilities."""

    paths: list[str]
    labels: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, C) float32, the run's temperature applied

    def only(self, paths: list[str]) -> HeldOut:
        """These images' rows, in this order."""
        at = {p: i for i, p in enumerate(self.paths)}
        rows = [at[p] for p in paths]
        return HeldOut([self.paths[i] for i in rows], self.labels[rows], self.probs[rows])


@dataclass
class FitResult:
    """What a finished job hands on in memory (the run folder is for the user and for reopening old runs)."""

    run_dir: str | None  # None: nothing was saved
    cancelled: bool
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""
    held_out: dict[str, HeldOut] = field(default_factory=dict)  # "val" / "test", where the split has images
    meta: dict = field(default_factory=dict)  # model.json as saved
    predictions: list[dict] = field(default_factory=list)  # val_predictions.csv's rows, as runs.read_predictions gives


def fit(
    config: TrainConfig,
    callbacks: Callbacks | None = None,
    cancel: CancelToken | None = None,
    dataset: Dataset | None = None,
) -> FitResult:
    """Train a classifier on ``config.data`` and save a run folder.

    ``dataset``: that folder as already scanned (the window's Dataset tab); used when its split settings match the
    config's, instead of scanning again. Under torchrun only rank 0 reports and writes; the other ranks compute.
    ``mode="auto"``: both strategies, see engine/train/auto.py; the result is the winning run.
    """
    if config.mode == "auto":
        return auto.fit_auto(config, callbacks or Callbacks(), cancel or CancelToken(), dataset, fit)
    cfg = config.resolved()
    dist = setup(cfg.device)
    cb = (callbacks or Callbacks()) if dist.is_main else Callbacks()
    cancel = cancel or CancelToken()
    ds: Dataset | None = None
    t_start = time.perf_counter()
    try:
        ds = _dataset(cfg, dataset, cb, cancel)
        outcome, facts = _train(cfg, ds, dist, cb, cancel)
        if outcome is None:  # another rank under torchrun: rank 0 saves
            return FitResult(None, False, message=f"rank {dist.rank}: done (rank 0 saves)")
        stopped = cancel.early_stop_reason()  # automatic mode's budget or race, never the user
        return _save(cfg, ds, facts, outcome, cb, time.perf_counter() - t_start, stopped)
    except Cancelled:
        return FitResult(
            None,
            True,
            skipped=ds.skipped if ds else [],
            message="Cancelled before the first epoch finished; nothing was saved.",
        )
    finally:
        dist.close()


def _dataset(cfg: TrainConfig, given: Dataset | None, cb: Callbacks, cancel: CancelToken) -> Dataset:
    if given is not None and given.matches(cfg.data, cfg.val_split, cfg.test_split, cfg.seed, cfg.exclude, cfg.labels):
        cb.on_log(f"Using the scan of {cfg.data} already made")
        ds = given.copy()  # fit drops files it cannot decode: never from the caller's object
    else:
        cb.on_log(f"Scanning {cfg.data}" + (f" for the images {cfg.labels} labels" if cfg.labels else ""))
        read = partial(scan_labelled, labels_file=cfg.labels) if cfg.labels else scan
        cache_dir = _cache_dir(cfg)
        known = KnownFiles(cache_dir).knows if cache_dir else None  # files whose header was checked before
        ds = read(cfg.data, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, cancel=cancel,
                  progress=cb.on_progress, exclude=cfg.exclude, known=known)  # fmt: skip
    counts = {c: sum(v.values()) for c, v in ds.counts().items()}
    cb.on_log(
        f"Found {len(ds.samples)} images in {len(ds.classes)} classes ({ds.layout} layout): "
        + ", ".join(f"{c} {n}" for c, n in counts.items())
    )
    for w in ds.warnings:
        cb.on_log(f"Warning: {_as_run(cfg, ds, w)}")
    untrained = untrained_classes(ds.counts())
    if untrained:  # its validation and test images would count as errors the model cannot avoid
        raise EngineError(" ".join(untrained))
    if ds.skipped:
        cb.on_log(f"Skipped {len(ds.skipped)} unreadable file(s); see skipped.csv in the run folder")
    if ds.excluded:
        cb.on_log(f"Left out {len(ds.excluded)} image(s) on the exclude list; see excluded.csv in the run folder")
    return ds


def _as_run(cfg: TrainConfig, ds: Dataset, warning: str) -> str:
    """The scan's warning about a carved validation split, said as this run uses it: feature extraction that
    cross-fits judges every image of train/ out of fold and holds none out."""
    if not warning.startswith(NO_VAL_FOLDER) or cfg.mode == "fine-tuning" or not feature_extraction.cross_fits(cfg, ds):
        return warning
    n = len(ds.split("train")) + len(ds.split("val"))
    said = (
        f"{NO_VAL_FOLDER}: feature extraction trains on all {n} images of train/ and judges each one out of fold "
        "(5-fold cross-fitting)"
    )
    if cfg.mode == "auto":
        said += f"; fine-tuning holds out {len(ds.split('val'))} of them ({cfg.val_split:.0%}) for validation"
    return said + "."


def _cache_dir(cfg: TrainConfig) -> str | None:
    return (cfg.cache_dir or default_cache_dir()) if cfg.cache else None


def _train(
    cfg: TrainConfig,
    ds: Dataset,
    dist,
    cb: Callbacks,
    cancel: CancelToken,
) -> tuple[TrainOutcome | None, BackboneFacts | None]:
    """The chosen strategy's outcome and what the run folder records about the backbone."""
    if cfg.mode == "fine-tuning":
        warm_optimizer_imports()
    np.random.seed(cfg.seed % (2**32))
    cache_dir = _cache_dir(cfg)
    if cfg.mode == "feature-extraction" and not dist.enabled:
        outcome = feature_extraction.from_cache(cfg, ds, cache_dir, cb, cancel)
        if outcome is not None:
            return outcome, outcome.facts
    import torch

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    cb.on_log(
        f"Device: {device_label(device)}"
        + (f"; {dist.world} processes ({dist.backend}) under torchrun" if dist.enabled else "")
    )
    backbone = load_backbone(cfg.backbone, cfg.weights, cfg.download)
    cb.on_log(
        f"Backbone: {cfg.backbone} ({sum(p.numel() for p in backbone.net.parameters()) / 1e6:.2f} M "
        f"parameters, {backbone.net.feature_dim}-d features), weights from {backbone.weights_source}"
    )
    if cfg.mode == "feature-extraction":
        outcome = feature_extraction.run(cfg, ds, backbone, device, cache_dir, cb, cancel, dist)
    else:
        backbone, ft_cfg, rcp = _recipe(cfg, ds, backbone, dist, cb)
        outcome = fine_tuning.run(ft_cfg, ds, backbone, device, cache_dir, cb, cancel, dist)
        outcome.recipe = rcp.to_dict()
        if not dist.enabled:
            _pretrained_familiarity(cfg, ds, outcome, device, cache_dir, cb)
    if not dist.is_main:
        return None, None
    return outcome, BackboneFacts.of(backbone, device_label(device))


def _recipe(cfg: TrainConfig, ds: Dataset, backbone, dist, cb: Callbacks):
    """Small pictures fine-tune at their own size with more stages trained (engine/train/fine_tuning/recipe.py): the
    backbone at that
    input size, the config with those stages, and the recipe."""
    from dataclasses import replace

    from engine.train.fine_tuning import inputs, recipe

    rcp = recipe.choose(
        backbone,
        cfg.unfreeze,
        cfg.small_images,
        [s.path for s in ds.split("train")],
        lambda n: inputs.applies(backbone.net, n, dist),
        cfg.backbone_lr_mult,
    )
    if rcp.small:
        cb.on_log(f"Small pictures: {rcp.reason}")
    ft_cfg = replace(cfg, unfreeze=rcp.unfreeze, backbone_lr_mult=rcp.lr_mult)
    return recipe.at_size(backbone, rcp.size), ft_cfg, rcp


def _pretrained_familiarity(
    cfg: TrainConfig, ds: Dataset, outcome: TrainOutcome, device, cache_dir: str | None, cb: Callbacks
) -> None:
    """What "unfamiliar" compares for a fine-tuning run: the *pretrained* backbone's embeddings of the training and
    validation images (fp32, through the embedding cache: free when feature extraction embedded them in fp32, as
    --mode auto does below 4,000 images), the space feature extraction compares in. The tuned network pulls every
    image towards some class (it flagged none of 400 photos of another folder); the frozen stages' pooled output,
    used before, flagged only 9-43% of plain synthetic pictures that feature extraction flags 100% of
    (docs/benchmarks.md, calibration)."""
    from engine.embed.embeddings import embed_files

    t0 = time.perf_counter()
    pretrained = load_backbone(cfg.backbone, cfg.weights, cfg.download)  # fine-tuning tuned the other in place
    features = {}
    for split in ("train", "val"):
        paths = [s.path for s in ds.split(split)]
        # not cancellable: a cancel (or auto's budget) has already stopped training, and the run keeps its best
        # epoch; this one pass (from the cache after feature extraction) finishes it
        f = (
            embed_files(
                paths,
                pretrained,
                device,
                cache_dir=cache_dir,
                backbone_name=cfg.backbone,
                log=cb.on_log,
                engine=cfg.engine,
                precision="fp32",
            )[0]
            if paths
            else None
        )
        features[split] = f if f is not None and len(f) else None
    outcome.features, outcome.familiar_pretrained = features, True
    outcome.features_seconds = time.perf_counter() - t0
    cb.on_log(
        f"'Unfamiliar' compares new images with the training images as the pretrained network sees them "
        f"({outcome.features_seconds:.1f} s)"
    )


def _held(ds: Dataset, outcome: TrainOutcome) -> dict:
    """The samples behind each held-out split's logits: the dataset's splits, or a cross-fitted run's own."""
    return {split: (outcome.held_items or {}).get(split, ds.split(split)) for split in ("val", "test")}


def _trust(
    cfg: TrainConfig, ds: Dataset, outcome: TrainOutcome, cb: Callbacks | None = None
) -> tuple[dict, dict | None, dict | None]:
    """Calibrated probabilities per held-out split, the calibration block (None without validation images) and the
    unfamiliar block (None without training features). Each step says so (at 100,000 images they take 20 s)."""
    cb = cb or Callbacks()
    y = {split: np.array([s.label for s in items], dtype=np.int64) for split, items in _held(ds, outcome).items()}
    calibration = None
    if outcome.logits.get("val") is not None and len(outcome.logits["val"]) >= 2:
        cb.on_progress(Progress(Phase.EVALUATING, 0, 2, message="calibrating the confidence"))
        calibration = calibrate(outcome.logits["val"], y["val"], outcome.logits.get("test"), y["test"], cfg.seed)
    t = calibration["temperature"] if calibration else 1.0
    probs = {split: None if lg is None else probabilities(lg, t) for split, lg in outcome.logits.items()}
    unfamiliar = None
    if outcome.features.get("train") is not None:

        def near(done: int, total: int) -> None:
            cb.on_progress(Progress(Phase.EVALUATING, done, total, message="finding each image's nearest neighbours"))

        train = outcome.features["train"]
        loo = _kept_leave_one_out(train, _cache_dir(cfg), near)
        unfamiliar = familiarity_block(train, outcome.features.get("val"), cfg.seed, loo=loo)
        unfamiliar["dim"] = int(outcome.features["train"].shape[1])
        if outcome.familiar_pretrained:
            unfamiliar["space"] = "pretrained"
    return probs, calibration, unfamiliar


def _kept_leave_one_out(train: np.ndarray, cache_dir: str | None, progress) -> np.ndarray:
    """The training images' neighbour distances behind "unfamiliar": they depend on the features alone, so a rerun on
    the same images reads them from beside the head's spaces (0.25 s of a cached flowers rerun's 2 s); searched and
    kept otherwise (a damaged file reads as missing)."""
    store, key = SpaceStore(cache_dir), space_key("neighbours", train, K, 0)
    loo = (store.get_arrays(key) or {}).get("loo")
    if loo is None:
        loo = leave_one_out(train, progress)
        store.put_arrays(key, {"loo": loo})
    return loo


def _save(
    cfg: TrainConfig,
    ds: Dataset,
    facts: BackboneFacts,
    outcome: TrainOutcome,
    cb: Callbacks,
    seconds: float,
    stopped: str = "",
) -> FitResult:
    """Calibrate and score the held-out splits, write the run folder, say where it went. ``stopped``: why automatic
    mode stopped the run early (then it is a completed run: its best epoch), "" otherwise."""
    cb.on_progress(Progress(Phase.EVALUATING, 0, 1))
    probs, calibration, unfamiliar = _trust(cfg, ds, outcome, cb)
    held = _held(ds, outcome)
    metrics, predictions = split_report(ds.classes, held, probs)
    checks = _random_checks(ds, held["val"], probs.get("val"))
    if checks:
        metrics["random_checks"] = checks
    carved = ds  # the split the images had: a cross-fitted run trained on all of train + val
    if outcome.cross_fit:
        metrics["validation"] = outcome.cross_fit
        ds = ds.with_pool_as_train()
    cancelled = outcome.cancelled and not stopped
    metrics = {"classes": ds.classes, "status": "cancelled" if cancelled else "completed", **metrics}
    if stopped:
        metrics["stopped_early"] = stopped
    if calibration:
        metrics["calibration"] = calibration
        cb.on_log(
            f"Calibration: temperature {calibration['temperature']:.2f}; expected calibration error "
            f"{calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f} "
            f"(measured on {calibration['measured_on']})"
        )
    if unfamiliar:
        metrics["unfamiliar"] = unfamiliar
    metrics.update(
        {
            "best_epoch": outcome.best_epoch,
            "epochs_run": len(outcome.history),
            "train_seconds": round(seconds, 3),
            "n_train": len(ds.split("train")),
            "n_val": len(held["val"]),
            "n_test": len(ds.split("test")),
            "n_skipped": len(ds.skipped),
            "device": facts.device,
        }
    )
    metrics.update(_stage_figures(outcome))
    out = cfg.out or os.path.join(default_runs_dir(), new_run_name(cfg.backbone, cfg.mode))
    cb.on_progress(Progress(Phase.SAVING, 0, 1))
    meta = model_json(cfg, ds, facts, calibration, unfamiliar, outcome.features_path, outcome.recipe, outcome.depths)
    run_dir = save_run(
        out,
        cfg.overwrite,
        weights=outcome.weights,
        history=outcome.history,
        ds=ds,
        metrics=metrics,
        predictions=predictions,
        meta=meta,
        train_embeddings=normalise(outcome.features["train"]) if unfamiliar else None,
    )
    if not outcome.cancelled:  # (a run auto's race stopped mid-epoch measured no whole epoch either)
        from engine.train.fine_tuning import estimate

        estimate.record(cfg.mode, cfg.backbone, facts.device, cfg.unfreeze, metrics)
    acc, ci = metrics.get("val_accuracy"), metrics.get("val_accuracy_ci95")
    judged = f"Cross-validated ({K_FOLDS}-fold) accuracy" if outcome.cross_fit else "Validation accuracy"
    summary = (
        f"{judged} {acc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}, n={metrics['val_n']})"
        if acc is not None
        else "No validation split"
    )
    summary = _led_by_checks(summary, acc, checks)
    cb.on_log(f"{summary}; saved {run_dir} in {seconds:.1f} s")
    held_out = {
        split: HeldOut([s.path for s in held[split]], np.array([s.label for s in held[split]]), p)
        for split, p in probs.items()
        if p is not None and len(p)
    }
    if outcome.cross_fit and "val" in held_out and carved.split("val"):
        # what automatic mode compares fine-tuning with: the same validation images, judged out of fold
        held_out["val_split"] = held_out["val"].only([s.path for s in carved.split("val")])
    header = ["path", "split", "label", "prediction", "confidence"] + [f"p_{c}" for c in ds.classes]
    rows = [dict(zip(header, row)) for row in predictions]
    return FitResult(
        run_dir, cancelled, metrics, outcome.history, ds.skipped, summary, held_out, meta, rows
    )  # fmt: skip


def _led_by_checks(summary: str, acc: float | None, checks: dict | None) -> str:
    """A run's summary, led by its accuracy on the random checks among its labels when it has enough of them."""
    lead = checks_summary(checks)
    if not lead or acc is None:
        return summary
    why = (
        "is lower because the labelling view asked about the images it was least sure of"
        if acc < checks["accuracy"]
        else "is mostly on the images the labelling view asked about for being hard"
    )
    return f"{lead}; {summary[0].lower()}{summary[1:]} over every label {why}"


def _random_checks(ds: Dataset, items: list, p: np.ndarray | None) -> dict | None:
    """A run trained from a labels file: its accuracy on the random checks among the held-out images (each judged
    by a head that never saw it). The labelling view asks mostly about the images it is least sure of, so the
    labels' own accuracy is far below the model's (0.57 against 0.77 on a pile of clothing at 9 labels a class);
    one image in ten it asks is drawn at random (engine/labelling/picks.py), and those are a fair sample of the
    folder. None without a labels file or without checks among the held-out images."""
    if not ds.labels_file or p is None or not len(items):
        return None
    mask = random_checks(ds.root, [s.path for s in items], read_labels(ds.labels_file))
    n = int(mask.sum())
    if not n:
        return None
    right = int((p[mask].argmax(1) == np.array([s.label for s in items])[mask]).sum())
    return {"n": n, "accuracy": right / n, "ci95": list(wilson_interval(right, n))}


def _stage_figures(outcome: TrainOutcome) -> dict:
    """metrics.json's figures of how the stage ran (rates, engine, recipe), where the stage measured them."""
    out: dict = {}
    if outcome.train_images_per_s is not None:  # fine-tuning: images through the backbone per second
        out["train_images_per_s"] = round(outcome.train_images_per_s, 1)
        out["unfamiliar_features_seconds"] = round(outcome.features_seconds, 3)
    if outcome.features_path:
        out["features"] = outcome.features_path
    if outcome.recipe:
        out["fine_tuning_recipe"] = outcome.recipe
    if outcome.depths:  # feature extraction: which features the head reads, and the out-of-fold evidence
        out["depths"] = outcome.depths
    if outcome.embed_seconds is not None:  # feature extraction: the backbone ran once per image not yet cached
        out["embed_seconds"] = round(outcome.embed_seconds, 3)
        out["embeddings_from_cache"] = outcome.from_cache
        out["embed_images_per_s"] = (
            round(outcome.embedded / outcome.embed_seconds, 1)
            if outcome.embedded and outcome.embed_seconds > 0
            else None
        )
    return out
