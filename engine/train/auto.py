"""``--mode auto``: feature extraction first, then fine-tuning within a time budget; the run with the lower
validation loss becomes the result.

1. Feature extraction runs as an ordinary run (seconds from cached embeddings) and is saved at once.
2. Fine-tuning starts from its own linear probe on the training split (feature extraction's head reads the final
   features raised to a power, and maybe the earlier layers', which fine-tuning's network does not pass on) and stops at
   the budget, or as soon as its validation loss cannot reach feature extraction's: after each epoch (from the second
   on) its best loss so far is extrapolated in a straight line over the epochs the remaining budget allows, falling
   each epoch by the largest change, up or down, that one of its epochs has made so far (:func:`projected_loss`).
   Fine-tuning is stopped only when even that optimistic projection stays above feature extraction's loss.
3. The run with the lower calibrated validation loss (:func:`calibrated_val_loss`; the race compares the same
   quantity per epoch) takes the ``out`` name; the other is renamed beside it
   (``RUN-feature-extraction`` / ``RUN-fine-tuning``). Both run folders get an ``auto.json`` (``runs.read_metrics``
   shows it as the metrics' ``auto`` block): which won, both runs' scores, the accuracy difference on the same
   validation images with its 95% interval, and one sentence saying why. Each metrics.json is written once.

The whole mode is :func:`fit_auto`; its halves hand each other their ``train.FitResult`` (held-out probabilities,
the head, metrics) in memory, and the run folders are only written, never read back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time

import numpy as np

from engine.data.labels import checks_summary
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, EpochMetrics
from engine.paths import default_runs_dir
from engine.runs import AUTO_FILE, atomic_write_json, json_safe, new_run_name, unique_dir
from engine.train.fine_tuning import estimate
from engine.trust.scores import paired_accuracy_difference, paired_mean_difference

FE, FT = "feature-extraction", "fine-tuning"
MIN_EPOCHS_BEFORE_EXTRAPOLATING = 2
# Fine-tuning holds out validation images to be judged on (20% of an unsplit folder). Under this many, no comparison
# with feature extraction could show a difference: 12 labels left it 3 images, and automatic mode "kept fine-tuning"
# on a loss difference those 3 images cannot support. Then fine-tuning is not started at all.
MIN_COMPARED = 20


class BudgetToken(CancelToken):
    """Cancelled when the user cancels, when the deadline passes, or when :meth:`stop` is called; ``reason`` says
    which of the last two it was (empty for the user's cancel)."""

    def __init__(self, user: CancelToken, deadline: float | None) -> None:
        super().__init__()
        self.user, self.deadline, self.reason = user, deadline, ""

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.cancel()

    def early_stop_reason(self) -> str:
        return "" if self.user.cancelled else self.reason

    @property
    def cancelled(self) -> bool:
        if self.user.cancelled:
            return True
        if self.deadline is not None and time.perf_counter() >= self.deadline and not self._event.is_set():
            self.stop("the time budget ran out")
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled()


def projected_loss(losses: list[float], epochs_left: int) -> float:
    """The lowest validation loss fine-tuning could still reach in ``epochs_left`` more epochs: its best so far,
    falling every epoch by the largest change (up or down) between two of its consecutive epochs. ``losses``: the
    starting loss (feature extraction's head), then each epoch's; the jump from the start is left out (it measures
    the switch to training more layers, not progress).

    Why not the latest improvement: fine-tuning's validation loss does not fall smoothly. On the "pairs" folder
    (bench-strategy) epoch 2 was worse than epoch 1 (0.389 -> 0.478) while the learning rate was high, then epochs
    3-4 fell to 0.275, far below feature extraction's 0.355; a line through the latest improvement stopped it after
    epoch 2. An epoch that moved the loss by 0.1 either way says the next ones may move it that much too."""
    if len(losses) < 2:
        return losses[-1] if losses else math.inf
    own = losses[1:]
    step = max((abs(b - a) for a, b in zip(own, own[1:])), default=0.0)
    return min(own) - step * max(0, epochs_left)


class Tagged(Callbacks):
    """Passes a half's events on, each epoch tagged with its ``strategy`` and the seconds since ``t0``."""

    def __init__(self, inner: Callbacks, strategy: str, t0: float) -> None:
        self.inner, self.strategy, self.t0 = inner, strategy, t0

    def on_log(self, message):
        self.inner.on_log(message)

    def on_progress(self, progress):
        self.inner.on_progress(progress)

    def on_train_batch_end(self, metrics):
        self.inner.on_train_batch_end(metrics)

    def on_predictions(self, rows):
        self.inner.on_predictions(rows)

    def on_train_epoch_end(self, m: EpochMetrics) -> None:
        self.inner.on_train_epoch_end(
            dataclasses.replace(m, strategy=self.strategy, elapsed=time.perf_counter() - self.t0)
        )


class Race(Tagged):
    """Fine-tuning's events; stops it when its projected validation loss cannot get below feature extraction's
    within the epochs and the time left."""

    def __init__(self, inner: Callbacks, token: BudgetToken, fe_loss: float, epochs: int, t0: float) -> None:
        super().__init__(inner, FT, t0)
        self.token, self.fe_loss, self.epochs = token, fe_loss, epochs
        self.losses = [fe_loss]  # the head starts as feature extraction's

    def on_train_epoch_end(self, m: EpochMetrics) -> None:
        super().on_train_epoch_end(m)
        loss = m.val_loss_calibrated if m.val_loss_calibrated == m.val_loss_calibrated else m.val_loss
        if loss != loss:  # no validation loss: nothing to race against
            return
        self.losses.append(loss)
        left = self.epochs - m.epoch
        if self.token.deadline is not None:
            left = min(left, int(max(0.0, self.token.deadline - time.perf_counter()) // max(m.seconds, 1e-9)))
        if m.epoch < MIN_EPOCHS_BEFORE_EXTRAPOLATING or m.epoch >= self.epochs or min(self.losses[1:]) < self.fe_loss:
            return  # (after its last epoch it ends by itself: nothing to stop)
        if projected_loss(self.losses, left) >= self.fe_loss:
            over = (
                f"extrapolated over the {left} epoch(s) left"
                if left
                else "with no time left in the budget for another epoch"
            )
            self.token.stop(
                f"its calibrated validation loss ({min(self.losses[1:]):.4f}), {over}, would stay above "
                f"feature extraction's ({self.fe_loss:.4f})"
            )


def compared(fe):
    """Feature extraction's held-out predictions on the images fine-tuning validates on: a cross-fitted run judged
    every labelled image out of fold; the race and the verdict use only its validation split, and fine-tuning
    trains (its linear probe included) without those images, so both are out of sample there."""
    return fe.held_out.get("val_split") or fe.held_out.get("val")


def calibrated_val_loss(held) -> float:
    """Validation log-loss with the run's temperature applied (a ``train.HeldOut``; None: no validation images,
    inf). The temperature was fitted on these images: one number, as optimistic for either strategy. Raw losses are
    not comparable: fine-tuning trains with label smoothing (under-confident), the feature-extraction head without;
    on digits fine-tuning was 0.9 points more accurate with a raw loss of 0.208 against 0.152."""
    if held is None or not len(held.labels):
        return math.inf
    p = held.probs[np.arange(len(held.labels)), held.labels]
    return float(np.mean(-np.log(np.maximum(p, 1e-12))))


def per_image_losses(held) -> dict[str, float]:
    """Each validation image's calibrated log-loss, by path (a ``train.HeldOut``)."""
    p = held.probs[np.arange(len(held.labels)), held.labels]
    return dict(zip(held.paths, (-np.log(np.maximum(p, 1e-12))).tolist()))


def paired_difference(a, b) -> tuple[float, tuple[float, float], int]:
    """Accuracy of b minus a (``train.HeldOut``) on the validation images both runs predicted, with Newcombe's 95%
    interval for paired proportions (engine/trust/scores.py: right on a handful of images, never of zero width), and
    how many images that is."""
    right_a, right_b = ({p: bool(ok) for p, ok in zip(h.paths, h.probs.argmax(1) == h.labels)} for h in (a, b))
    common = sorted(set(right_a) & set(right_b))
    if not common:
        return 0.0, (0.0, 0.0), 0
    d = paired_accuracy_difference([right_a[p] for p in common], [right_b[p] for p in common])
    return d["difference"], tuple(d["ci95"]), d["n"]


def loss_difference(a, b) -> tuple[float, tuple[float, float], int]:
    """Calibrated log-loss of b minus a per image, on the validation images both predicted: its mean, the mean's
    95% interval (Student's t with n - 1 degrees of freedom) and n. b is better only where the whole interval is
    below zero."""
    la, lb = per_image_losses(a), per_image_losses(b)
    common = sorted(set(la) & set(lb))
    if not common:
        return 0.0, (-math.inf, math.inf), 0
    mean, ci = paired_mean_difference(np.array([lb[p] - la[p] for p in common]))
    return mean, ci, len(common)


def too_few_to_compare(n: int) -> bool:
    """Whether ``n`` held-out images are too few for fine-tuning to be judged against feature extraction: on so few
    a real difference hides in chance, and automatic mode does not start fine-tuning at all."""
    return n < MIN_COMPARED


def too_few_sentence(n_val: int, n_labelled: int, cross_fitted: bool) -> str:
    """What automatic mode says when it does not start fine-tuning: the numbers and what was kept."""
    judged = f"judged on all {n_labelled} labelled images (cross-validated)" if cross_fitted else "judged on them"
    return (
        f"{n_val} validation images: too few to compare fine-tuning with feature extraction (at least {MIN_COMPARED} "
        f"are needed); kept feature extraction, {judged}."
    )


def why(
    winner: str,
    gain_points: float,
    ci: tuple[float, float],
    stopped: str,
    raced: bool = True,
    small_side: int | None = None,
    loss: tuple[float, tuple[float, float]] | None = None,
    n: int = 0,
) -> str:
    """One sentence a non-specialist understands. ``raced``: fine-tuning finished at least one epoch;
    ``small_side``: fine-tuning trained small pictures (of this median shorter side) at their own size; ``loss``:
    fine-tuning's calibrated loss minus feature extraction's per image (mean, 95% interval) on ``n`` images."""
    lo, hi = ci[0] * 100, ci[1] * 100
    if not raced:
        return "Feature extraction was kept: fine-tuning " + (
            f"was stopped before its first epoch ended because {stopped}; a larger time budget gives it a chance."
            if stopped
            else "had no validation images to be compared on."
        )
    if winner == FT:
        if lo > 0 and small_side:
            return (
                f"Fine-tuning gained {gain_points:.1f} points: your pictures are small (about {small_side} px) "
                "and unlike the everyday photos the network learned from, so retraining most of it at their "
                "own size paid off."
            )
        if lo > 0:
            return (
                f"Fine-tuning gained {gain_points:.1f} points: your images differ from the everyday photos the "
                "network learned from, so retraining its last layers paid off."
            )
        return (
            f"Fine-tuning's answers were more reliable (a clearly lower calibrated loss); its accuracy differs "
            f"by {gain_points:+.1f} points (between {lo:+.1f} and {hi:+.1f}), which is within what chance can do."
        )
    if stopped:
        return (
            "Feature extraction was kept: the pretrained features already separate your classes, and "
            f"fine-tuning was stopped because {stopped}."
        )
    if loss is not None and loss[0] < 0:
        return (
            f"Feature extraction was kept: fine-tuning's answers were not clearly better on these {n} images (its "
            f"calibrated loss was {-loss[0]:.3f} lower on average, but anywhere from {-loss[1][0]:.3f} lower to "
            f"{loss[1][1]:.3f} higher is within what chance can do); feature extraction is the faster model."
        )
    return (
        "Feature extraction was kept: the pretrained features already separate your classes well, so "
        "retraining layers did not make the answers more reliable"
        + (f" ({-gain_points:.1f} points more accurate)." if gain_points < 0 else ".")
    )


def finish(target: str, overwrite: bool, fe, ft, ft_stop: str, cb: Callbacks) -> dict:
    """Name the winner ``target`` and the other run beside it; write the ``auto`` block beside both (``fe``/``ft``:
    the two jobs' ``FitResult``s, ``ft`` None when fine-tuning saved nothing); returns the block. Fine-tuning wins
    only when its calibrated loss is lower on the same validation images by more than chance allows (the 95%
    interval of the per-image difference below zero): a tie keeps feature extraction, the faster model."""
    fe_val = compared(fe)
    runs = {
        FE: {
            "val_loss": calibrated_val_loss(fe_val),
            "val_accuracy": (float(np.mean(fe_val.probs.argmax(1) == fe_val.labels)) if fe_val else None),
            "seconds": fe.metrics.get("train_seconds"),
        }
    }
    winner, small_side, ft_val = FE, None, None
    if ft is not None:
        ft_val = ft.held_out.get("val")
        runs[FT] = {
            "val_loss": calibrated_val_loss(ft_val),
            "val_accuracy": ft.metrics.get("val_accuracy"),
            "seconds": ft.metrics.get("train_seconds"),
            "epochs_run": ft.metrics.get("epochs_run"),
        }
        recipe = ft.metrics.get("fine_tuning_recipe") or {}
        small_side = recipe.get("median_shorter_side") if recipe.get("small_pictures") else None
    both = ft is not None and fe_val is not None and ft_val is not None
    diff, ci, n = paired_difference(fe_val, ft_val) if both else (0.0, (0.0, 0.0), 0)
    loss = loss_difference(fe_val, ft_val) if both else None
    if loss is not None and loss[1][1] < 0:
        winner = FT
    final = {}
    for mode, res in ((FE, fe), (FT, ft)):
        if res is None:
            continue
        d = res.run_dir
        want = target if mode == winner else f"{target}-{mode}"
        if os.path.abspath(want) != os.path.abspath(d):
            if os.path.exists(want):
                if not overwrite:
                    want = unique_dir(want)
                else:
                    shutil.rmtree(want)
            os.replace(d, want)
        final[mode] = want
    block = {
        "winner": winner,
        "stopped": ft_stop or None,
        "runs": {m: {**runs[m], "run": final[m]} for m in runs},
        "fine_tuning_minus_feature_extraction": {
            "val_accuracy": round(diff, 6),
            "ci95": [round(ci[0], 6), round(ci[1], 6)],
            "n": n,
            **(
                {"val_loss": round(loss[0], 6), "val_loss_ci95": [round(v, 6) for v in loss[1]]}
                if loss is not None and np.isfinite(loss[1]).all()
                else {}
            ),
        },
        "why": why(
            winner,
            diff * 100,
            ci,
            ft_stop,
            raced=ft is not None,
            small_side=small_side,
            loss=(loss[0], loss[1]) if loss else None,
            n=n,
        ),  # fmt: skip
    }
    block["summary"] = summary(winner, runs, diff, ci, n) + " " + block["why"]
    if both and "validation" in fe.metrics:
        block["compared_on"] = (
            f"Both were judged on the same {n} validation images, out of sample for both: fine-tuning never trained "
            "on them, and feature extraction's predictions there come from the cross-fitting heads that did not "
            "train on them."
        )
        block["summary"] += " " + block["compared_on"]
    for mode, d in final.items():  # the one file written after the runs were saved: who won needs both runs
        atomic_write_json(os.path.join(d, AUTO_FILE), json_safe({**block, "this_run": mode}))
    cb.on_log(block["summary"])
    return block


def summary(winner: str, runs: dict, diff: float, ci: tuple[float, float], n: int) -> str:
    """ "Kept fine-tuning: validation loss 0.21 vs 0.35; accuracy 0.912 vs 0.845 (+6.7 points, 95% interval
    +4.1 to +9.3, 500 images)." """
    words = winner
    if FT not in runs:
        return f"Kept {words} (fine-tuning did not finish an epoch)."
    other = FE if winner == FT else FT
    a, b = runs[winner].get("val_accuracy"), runs[other].get("val_accuracy")
    sign = 1 if winner == FT else -1

    def points(x: float) -> str:
        return f"{round(x * 100, 1) + 0.0:+.1f}"  # (+ 0.0: "+0.0", never "-0.0")

    lo, hi = sorted((sign * ci[0], sign * ci[1]))
    acc = (
        (
            f"; accuracy {a:.3f} vs {b:.3f} ({points(sign * diff)} points, 95% interval {points(lo)} to "
            f"{points(hi)}, {n} images)"
        )
        if a is not None and b is not None
        else ""
    )
    return (
        f"Kept {words}: calibrated validation loss {runs[winner]['val_loss']:.4f} vs "
        f"{runs[other]['val_loss']:.4f}"
        f" ({other}){acc}."
    )


def fit_auto(cfg, cb: Callbacks, cancel: CancelToken, dataset, fit):
    """``--mode auto`` (``train.fit`` with ``mode="auto"``; ``fit`` is that function, handed over rather than
    imported, since it calls back into here): feature extraction, then fine-tuning from its head within the budget;
    the lower calibrated validation loss wins. The two halves hand each other their ``FitResult``s in memory."""
    cfg.resolved()  # checks the settings before anything runs
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EngineError("--mode auto runs in one process: under torchrun, choose feature-extraction or fine-tuning.")
    target = cfg.out or os.path.join(default_runs_dir(), new_run_name(cfg.backbone, "auto"))
    if os.path.exists(target) and not cfg.overwrite:
        raise EngineError(f"{target} already exists: choose another output folder or allow overwriting.")
    t0 = time.perf_counter()
    cb.on_log("Automatic mode: feature extraction first; then fine-tuning")
    fe = fit(dataclasses.replace(cfg, mode=FE, out=f"{target}-{FE}"), Tagged(cb, FE, t0), cancel, dataset)
    if fe.run_dir is None or fe.cancelled:
        return fe
    fe_loss = calibrated_val_loss(compared(fe))
    ft, stop = None, ""
    n_val = len(compared(fe).labels) if compared(fe) is not None else 0
    if fe_loss == math.inf:
        cb.on_log("No validation images: nothing to compare fine-tuning with; keeping feature extraction")
    elif too_few_to_compare(n_val):
        return _too_few(fe, target, cfg.overwrite, n_val, cb)
    else:
        ft_cfg = dataclasses.replace(cfg, mode=FT, out=f"{target}-{FT}")
        epochs = ft_cfg.resolved().epochs
        est = estimate.estimate_fine_tuning(
            cfg.backbone,
            cfg.device,
            ft_cfg.unfreeze,
            fe.metrics.get("n_train", 0),
            epochs,
            fe.metrics.get("embed_images_per_s"),
        )
        budget = cfg.budget * 60 if cfg.budget else None
        cb.on_log(
            f"Fine-tuning: {est.text}; budget " + (f"{cfg.budget:g} min" if budget else "none (its planned epochs)")
        )
        token = BudgetToken(cancel, time.perf_counter() + budget if budget else None)
        cb.on_log(
            "Fine-tuning starts from its own linear probe on the training split, not from feature extraction's head: "
            "that head reads the final features raised to a power"
            + (" and the earlier layers' features" if (fe.metrics.get("depths") or {}).get("kept") else "")
            + ", which fine-tuning's network does not pass to its head"
        )
        ft = fit(ft_cfg, Race(cb, token, fe_loss, epochs, t0), token, dataset)
        stop = token.early_stop_reason()
        if stop:
            cb.on_log(f"Fine-tuning stopped: {stop}")
        if ft.run_dir is None:
            ft = None
    block = finish(target, cfg.overwrite, fe, ft, stop, cb)
    won = fe if block["winner"] == FE else ft
    return dataclasses.replace(
        won,
        run_dir=block["runs"][block["winner"]]["run"],
        cancelled=cancel.cancelled,
        metrics={**won.metrics, "auto": {**block, "this_run": block["winner"]}},
        skipped=fe.skipped,
        # trained from labels the labelling view asked for: the fair figure first (the race's validation images are
        # mostly the hard ones it asked about)
        message=". ".join(filter(None, [checks_summary(won.metrics.get("random_checks")), block["summary"]])),
    )


def _too_few(fe, target: str, overwrite: bool, n_val: int, cb: Callbacks):
    """Automatic mode on too few validation images: feature extraction is the result, fine-tuning never starts, and
    the run says why (``auto.json`` as for a compared pair, with the one run)."""
    cv = fe.metrics.get("validation") or {}
    sentence = too_few_sentence(n_val, int(cv.get("images") or fe.metrics.get("n_val") or n_val), bool(cv))
    want = target
    if os.path.abspath(want) != os.path.abspath(fe.run_dir):
        if os.path.exists(want):
            if overwrite:
                shutil.rmtree(want)
            else:
                want = unique_dir(want)
        os.replace(fe.run_dir, want)
    block = {
        "winner": FE,
        "stopped": None,
        "too_few": {"validation_images": n_val, "needed": MIN_COMPARED},
        "runs": {
            FE: {"val_loss": calibrated_val_loss(compared(fe)), "seconds": fe.metrics.get("train_seconds"), "run": want}
        },  # fmt: skip
        "why": sentence,
        "summary": sentence,
    }
    atomic_write_json(os.path.join(want, AUTO_FILE), json_safe({**block, "this_run": FE}))
    cb.on_log(sentence)
    return dataclasses.replace(
        fe, run_dir=want, metrics={**fe.metrics, "auto": {**block, "this_run": FE}},
        message=". ".join(filter(None, [checks_summary(fe.metrics.get("random_checks")), sentence])),
    )  # fmt: skip
