"""Fine-tuning: the last stages of the backbone retrained with the new head, on images decoded once.

:func:`run` decodes every split once (uint8, kept in memory or in a file: engine/data/decode.py ``PixelStore``),
freezes all but the last stages (BatchNorm statistics too, by default), starts the head from a linear probe (LP-FT),
then repeats :func:`train_one_epoch` and :func:`validate` (the timm / torchvision references' shape) with early
stopping. Where the backbone allows, the frozen stages run once per image and the epochs only through the trained
ones (engine/train/fine_tuning/inputs.py). A cancel during training keeps the best finished epoch; before the first one,
:class:`Cancelled` goes up to ``fit``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from engine.config import TrainConfig
from engine.data.decode import PixelStore, decode_all
from engine.data.folder import Dataset
from engine.events import (
    BatchMetrics,
    Callbacks,
    Cancelled,
    CancelToken,
    EngineError,
    EpochMetrics,
    Phase,
    Progress,
    Throttle,
)
from engine.meters import EarlyStopping, RateMeter, TrainOutcome
from engine.network.backbones import LoadedBackbone
from engine.network.device import grad_scaler, is_oom
from engine.network.forward import Forward
from engine.train.feature_extraction import labels
from engine.train.fine_tuning.inputs import Inputs, applies
from engine.train.head import balanced_class_weights, train_linear_head


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    seen: int
    seconds: float


@dataclass(frozen=True)
class ValStats:
    loss: float
    accuracy: float  # NaN without a validation split
    calibrated_loss: float = float("nan")  # after the best temperature (engine/trust/calibration.py scaled_log_loss)


def forward_backward(model, x, y, scaler, fwd: Forward, class_weight=None):
    """One optimiser step's forward and backward (a seam the tests use to simulate running out of GPU memory)."""
    import torch.nn.functional as F

    with fwd.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=0.1)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    return logits.detach(), loss.detach()


def steps_per_epoch(n: int, bs: int, dist) -> int:
    steps = math.ceil(n / bs)
    if dist.enabled and n % bs and n % bs < dist.world:
        steps -= 1  # a last batch smaller than the number of processes would leave a rank with nothing
    return steps


def train_one_epoch(
    model,
    train_model,
    fwd: Forward,
    batch,
    y,
    opt,
    sched,
    *,
    bs: int,
    epoch: int,
    epochs: int,
    generator,
    scaler,
    frozen_modules,
    dist,
    cb: Callbacks,
    cancel: CancelToken,
    class_weight=None,
) -> EpochStats:
    """One pass over the training images in shuffled batches (``batch(indices, device)`` makes each one's input to
    ``train_model``); reports throttled batch metrics."""
    import torch

    n, device = len(y), fwd.device
    steps = steps_per_epoch(n, bs, dist)
    model.train()
    for m in frozen_modules:
        m.eval()  # frozen stages (and, by default, every BatchNorm layer) keep their ImageNet statistics
    perm = torch.randperm(n, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    meter, throttle = RateMeter(), Throttle(0.25)
    for step in range(steps):
        if dist.any(cancel.cancelled, device):  # every rank stops on the same step (no hang)
            raise Cancelled()
        idx = perm[step * bs : (step + 1) * bs]
        if dist.enabled:
            # Same global batch as one process: every rank draws the same permutation (same seed) and takes its
            # share of each batch; DDP averages the gradients.
            idx = idx[dist.rank :: dist.world]
        xb = batch(idx, device)
        yb = y[idx].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        logits, loss = forward_backward(train_model, xb, yb, scaler, fwd, class_weight)
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
            done_frac = (step + 1) / steps
            eta = meter.elapsed() * ((1 - done_frac) + (epochs - epoch)) / done_frac
            cb.on_train_batch_end(
                BatchMetrics(epoch, step + 1, steps, float(loss_sum) / seen, int(correct) / seen, meter.rate(seen), eta)
            )
    train_s = meter.elapsed()
    loss_total, correct_total = float(loss_sum), float(correct)
    if dist.enabled:  # epoch metrics over the whole global batch, not rank 0's share
        loss_total, correct_total, seen_total = dist.sum([loss_total, correct_total, float(seen)], device)
        seen = int(seen_total)
    return EpochStats(loss_total / seen, correct_total / seen, seen, train_s)


def validate(logits, y, class_weight=None) -> ValStats:
    """Mean (class-weighted) cross-entropy, accuracy and temperature-scaled cross-entropy of a held-out split's
    logits."""
    import torch.nn.functional as F

    from engine.trust.calibration import scaled_log_loss

    y = y.to(logits.device)
    return ValStats(
        float(F.cross_entropy(logits, y, weight=class_weight)),
        float((logits.argmax(1) == y).float().mean()),
        scaled_log_loss(logits.float().cpu().numpy(), y.cpu().numpy()),
    )


def _decode_splits(
    ds: Dataset, pre, train_size: int, store: PixelStore, device, cb: Callbacks, cancel: CancelToken
) -> dict:
    """Each split decoded once into a uint8 tensor (None for an empty split); unreadable files are dropped from
    ``ds`` with their reason."""
    import torch

    decoded = {}
    meter = RateMeter()
    for split in ("train", "val", "test"):
        items = ds.split(split)
        if not items:
            decoded[split] = None
            continue
        size = train_size if split == "train" else pre.size
        cb.on_log(f"Decoding {len(items)} {split} images once ({size}x{size} uint8 cache)")

        def prog(done, total, _s=split):
            cb.on_progress(Progress(Phase.DECODING, done, total, message=_s))

        arr, _, bad = decode_all(
            [s.path for s in items],
            pre,
            size,
            cancel,
            prog,
            device=device,
            out=store.array((len(items), 3, size, size)),
        )
        ds.drop(bad)
        decoded[split] = torch.from_numpy(arr)
    cb.on_log(f"Decoded in {meter.elapsed():.1f} s")
    if decoded["train"] is None or len(decoded["train"]) == 0:
        raise EngineError("No training images left after skipping unreadable files.")
    if device.type == "cuda":
        need = sum(v.numel() for v in decoded.values() if v is not None)
        free, _ = torch.cuda.mem_get_info(device)
        if need < 0.3 * free:
            decoded = {k: (v.to(device) if v is not None else None) for k, v in decoded.items()}
            cb.on_log("Images kept on the GPU as uint8; augmentation runs on the GPU")
    return decoded


def _freeze(model, backbone: LoadedBackbone, unfreeze, bn_stats: str, cb: Callbacks) -> tuple[list, int]:
    """Freeze all but the last ``unfreeze`` stages; returns the modules kept in eval mode while training (the frozen
    stages, and with ``bn_stats="frozen"`` every BatchNorm layer) and the number of frozen stages.

    Why BatchNorm stays frozen by default: in train mode a BatchNorm layer normalises with the batch's own
    statistics instead of ImageNet's, so on images unlike ImageNet's the first step changes what every unfrozen
    stage computes and the linear-probe head no longer fits it: on upscaled 8x8 digits the training loss jumped
    from the probe's ~0.2 to 4.4 in the first epoch and validation accuracy fell from 0.950 to 0.88; with the
    statistics frozen it rose to 0.979 (docs/benchmarks.md, fine-tuning recipe)."""
    stages = backbone.net.stages()
    n_unfreeze = len(stages) if unfreeze == "all" else max(0, min(int(unfreeze), len(stages)))
    frozen = [m for group in stages[: len(stages) - n_unfreeze] for m in group]
    for p in model.backbone.parameters():
        p.requires_grad = n_unfreeze > 0
    for m in frozen:
        for p in m.parameters():
            p.requires_grad = False
    n_params = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    cb.on_log(
        f"Fine-tuning the last {n_unfreeze} of {len(stages)} backbone stages "
        f"({n_params / 1e6:.2f} M backbone parameters trainable); BatchNorm statistics {bn_stats}"
    )
    if bn_stats == "frozen":
        from torch import nn

        frozen = frozen + [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return frozen, len(stages) - n_unfreeze


def _linear_probe(
    model, features, ytr, yva, num_classes: int, cfg: TrainConfig, cb: Callbacks, cancel: CancelToken, class_weight=None
) -> None:
    """LP-FT: start the new head from a linear probe on frozen features, so the first fine-tuning steps do not push
    random-head gradients into the pretrained layers (Kumar et al., 2022)."""
    import torch

    cb.on_log("Initialising the head with a linear probe on frozen features")
    ftr, fva = features("train", cancel), features("val", cancel)
    probe = train_linear_head(
        ftr,
        ytr.numpy(),
        fva,
        yva.numpy(),
        num_classes,
        epochs=100,
        batch_size=64,
        lr=3e-3,
        weight_decay=cfg.weight_decay,
        patience=15,
        seed=cfg.seed,
        cancel=cancel,
        class_weight=class_weight,
    )
    model.head.load_state_dict({k: torch.from_numpy(v).to(model.head.weight.device) for k, v in probe.head.items()})


def _start_head(
    model,
    inputs: Inputs,
    ytr,
    yva,
    num_classes: int,
    cfg: TrainConfig,
    dist,
    cb: Callbacks,
    cancel: CancelToken,
    class_weight=None,
) -> None:
    """The head's first weights: a linear probe (LP-FT), or the random initialisation."""
    if cfg.linear_probe_init and dist.is_main:  # other ranks receive rank 0's weights when DDP wraps the model
        _linear_probe(model, inputs.features, ytr, yva, num_classes, cfg, cb, cancel, class_weight)


def _distributed(model, device, dist, cfg: TrainConfig, cb: Callbacks):
    """The model the optimiser steps through: itself, or DDP under torchrun (which broadcasts rank 0's weights,
    head included, to every rank, then averages gradients each step)."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    cb.on_log(
        f"DistributedDataParallel over {dist.world} processes; global batch {cfg.batch_size} "
        f"({cfg.batch_size // dist.world} per process)"
    )
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _optimizer(model, cfg: TrainConfig):
    import torch

    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": model.head.parameters(), "lr": cfg.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_mult})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _schedule(opt, steps_per_epoch: int, epochs: int):
    """Linear warm-up over half an epoch, then cosine decay to 0 over the planned steps."""
    import torch

    total, warm = epochs * steps_per_epoch, max(1, steps_per_epoch // 2)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total))))
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
) -> TrainOutcome:
    """Decode, freeze, probe, train; returns the best epoch. Raises Cancelled when no
    epoch finished."""
    pre = backbone.preprocessing
    # random crops need a little more than the input size; the frozen-stages-once path only mirrors
    crops = cfg.augment and not applies(backbone.net, cfg.unfreeze, dist)
    train_size = int(round(pre.size * 256 / 224)) if crops else pre.size
    need = 3 * (len(ds.split("train")) * train_size**2 + (len(ds.split("val")) + len(ds.split("test"))) * pre.size**2)
    store = PixelStore(need, cache_dir)
    if store.on_disk:
        cb.on_log(
            f"The decoded images ({need / 1e9:.1f} GB) would not fit in memory "
            f"({store.avail / 1e9:.1f} GB available): kept in a file in {store.folder} instead; "
            "epochs read them from disk, more slowly"
        )
    try:
        decoded = _decode_splits(ds, pre, train_size, store, device, cb, cancel)
        return _train(cfg, ds, backbone, device, decoded, cb, cancel, dist, cache_dir)
    finally:
        store.close()  # (the arrays die with this frame)


def _train(
    cfg: TrainConfig,
    ds: Dataset,
    backbone: LoadedBackbone,
    device,
    decoded: dict,
    cb: Callbacks,
    cancel: CancelToken,
    dist,
    cache_dir: str | None = None,
) -> TrainOutcome:
    """The epochs: out-of-memory retry with a halved batch, validation, early stopping, best epoch kept."""
    import torch

    from engine.network.model import make_classifier

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning each new shape costs more than it saves on small data
    ytr, yva = torch.from_numpy(labels(ds, "train")[1]), torch.from_numpy(labels(ds, "val")[1])
    model = make_classifier(backbone.net, len(ds.classes)).to(device)
    if device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    frozen, n_frozen = _freeze(model, backbone, cfg.unfreeze, cfg.bn_stats, cb)
    eval_fwd = Forward(model, backbone.preprocessing, device, batch_size=8 if device.type == "cpu" else 256)
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = Inputs.choose(
        cfg, model, n_frozen, decoded, eval_fwd, dist, gen, cb, cancel, backbone.weights_id, cache_dir
    )
    weights = balanced_class_weights(ytr.numpy(), len(ds.classes), mode=cfg.balance)
    if weights is not None:
        cb.on_log("Classes are unbalanced: the loss weights each class by the inverse of its share")
    _start_head(model, inputs, ytr, yva, len(ds.classes), cfg, dist, cb, cancel, weights)
    train_model = inputs.tail if inputs.tail is not None else _distributed(model, device, dist, cfg, cb)
    opt, scaler = _optimizer(model, cfg), grad_scaler(device)
    cw = None if weights is None else torch.from_numpy(weights).to(device)
    n = len(ytr)
    bs = min(cfg.batch_size, n)
    has_val = decoded["val"] is not None and len(decoded["val"]) > 0
    eval_fwd.batch_size = max(bs, 8) if device.type == "cpu" else 256
    stopping, best_state, history, rates = EarlyStopping(cfg.patience), None, [], []
    sched, epoch, cancelled = None, 0, False
    while epoch < cfg.epochs:
        sched = sched or _schedule(opt, steps_per_epoch(n, bs, dist), cfg.epochs)
        t0 = time.perf_counter()
        try:
            st = train_one_epoch(
                model,
                train_model,
                eval_fwd,
                inputs.batch,
                ytr,
                opt,
                sched,
                bs=bs,
                epoch=epoch + 1,
                epochs=cfg.epochs,
                generator=gen,
                scaler=scaler,
                frozen_modules=frozen,
                dist=dist,
                cb=cb,
                cancel=cancel,
                class_weight=cw,
            )
            # Under DDP a rank must not stop alone between collectives: cancel is only checked per step.
            val = (
                validate(inputs.logits("val", None if dist.enabled else cancel), yva, cw)
                if has_val
                else ValStats(st.loss, float("nan"))
            )
        except Cancelled:
            cancelled = True
            break
        except Exception as exc:
            if not is_oom(exc) or bs <= 1 or dist.enabled:  # ranks must keep the same batch: no retry under DDP
                raise
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bs, sched = max(1, bs // 2), None
            cb.on_log(f"Out of memory at batch size {bs * 2}: retrying this epoch with batch size {bs}")
            continue
        epoch += 1
        # The best epoch is the one whose answers are best once calibrated (the temperature is fitted after training
        # anyway): with label smoothing the raw loss can prefer a less accurate epoch (hymenoptera: 0.915 over 0.941)
        improved = stopping.update(
            val.calibrated_loss if val.calibrated_loss == val.calibrated_loss else val.loss, epoch
        )
        if improved:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        m = EpochMetrics(
            epoch,
            cfg.epochs,
            st.loss,
            st.accuracy,
            val.loss,
            val.accuracy,
            opt.param_groups[0]["lr"],
            time.perf_counter() - t0,
            st.seen / st.seconds if st.seconds else 0.0,
            improved,
            val_loss_calibrated=val.calibrated_loss,
        )
        history.append(m.as_row())
        rates.append(m.images_per_s)
        cb.on_train_epoch_end(m)
        if stopping.stop(has_val, cb.on_log):
            break
    if best_state is None:
        raise Cancelled()
    if cancelled:
        cb.on_log(f"Stopped; keeping the best epoch so far ({stopping.best_epoch})")
    model.load_state_dict(best_state)
    logits, feats, feat_s = _held_out_outputs(inputs, cb, familiar=dist.enabled)
    model = model.float().to("cpu").to(memory_format=torch.contiguous_format)
    return TrainOutcome(
        weights=model.state_dict(),
        history=history,
        best_epoch=stopping.best_epoch,
        logits=logits,
        features=feats,
        cancelled=cancelled,
        features_seconds=feat_s,
        train_images_per_s=float(np.median(rates)) if rates else 0.0,
    )


def _held_out_outputs(inputs: Inputs, cb: Callbacks, familiar: bool) -> tuple[dict, dict, float]:
    """The best epoch's logits on val/test, and (``familiar``: under torchrun; otherwise engine/train/fit.py embeds the
    images with the pretrained backbone) the tuned network's embeddings of train and val for "unfamiliar" (one more
    pass over the training images, timed)."""
    logits, feats = {}, {}
    for split in ("val", "test"):
        cb.on_progress(Progress(Phase.EVALUATING, 0, 1, message=split))
        logits[split] = inputs.logits(split).cpu().numpy() if inputs.has(split) else None
    if not familiar:
        return logits, {}, 0.0
    meter = RateMeter()
    cb.on_progress(Progress(Phase.EMBEDDING, 0, 1, message="for 'unfamiliar'"))
    for split in ("train", "val"):
        feats[split] = inputs.features(split) if inputs.has(split) else None
    seconds = meter.elapsed()
    cb.on_log(f"Embedded the training images with the tuned network for 'unfamiliar' in {seconds:.1f} s")
    return logits, feats, seconds
