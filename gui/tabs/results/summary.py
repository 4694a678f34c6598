"""The Results tab's summary: what a run scored, how it was judged and what it chose, in words."""

from __future__ import annotations

import os

from engine.data.labels import MIN_CHECKS
from engine.train.probe import loss_words


def duration(s: float) -> str:
    """0.3 s, 12 s, 2 min 5 s: a rerun from cached features takes well under a second and should not read "0 s"."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def summary_lines(run_dir: str, meta: dict, metrics: dict) -> list[str]:
    """The lines of a run's summary (rich text), headline first."""
    acc, ci, n = metrics.get("val_accuracy"), metrics.get("val_accuracy_ci95"), metrics.get("val_n", 0)
    parts = [
        f"<b>{os.path.basename(run_dir)}</b> — {meta.get('backbone')}, {meta.get('mode')}"
        + (" (stopped early by the user)" if metrics.get("status") == "cancelled" else "")
    ]
    cv = metrics.get("validation") or {}
    judged = f"Cross-validated ({cv.get('folds')}-fold) accuracy" if cv else "Validation accuracy"
    parts += _checks_line(metrics.get("random_checks") or {}, acc)
    if acc is not None and ci:
        parts.append(
            f"<span style='font-size:16px'>{judged} <b>{100 * acc:.1f}%</b></span> "
            f"(95% interval {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%, {n} images: "
            f"± about {50 * (ci[1] - ci[0]):.0f} points)"
        )
    if cv:
        parts.append(
            f"Every one of the {n} labelled images trained the saved model and was judged by one of "
            f"{cv.get('folds')} heads that never saw it: the figures, the matrix and the mistakes are all out of "
            "sample"
            + (" (the features and the regularisation were chosen on these same judgements)" if "C" in cv else "")
        )
    if metrics.get("depths"):
        parts.append(head_line(metrics["depths"]))
    bal, f1 = metrics.get("val_balanced_accuracy"), metrics.get("val_macro_f1")
    if bal is not None:
        parts.append(
            f"Balanced accuracy {100 * bal:.1f}% (each class counts the same)"
            + (f", macro-F1 {f1:.3f}" if f1 is not None else "")
        )
    if metrics.get("test_accuracy") is not None:
        tci = metrics.get("test_accuracy_ci95") or [0, 0]
        parts.append(
            f"Test accuracy <b>{100 * metrics['test_accuracy']:.1f}%</b> "
            f"(95% interval {100 * tci[0]:.1f}–{100 * tci[1]:.1f}%, {metrics.get('test_n')} images)"
        )
    auto = metrics.get("auto") or {}
    if auto.get("summary"):
        kept = auto.get("this_run") == auto.get("winner")
        parts.append("Automatic mode: " + auto["summary"] + ("" if kept else " (This is the run it did not keep.)"))
    parts.append(
        (
            f"Best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}, "
            if not metrics.get("depths")
            else ""
        )
        + f"{duration(metrics.get('train_seconds', 0))} on {metrics.get('device', '?')}"
    )
    return parts


def _checks_line(checks: dict, acc: float | None) -> list[str]:
    """A run trained from labels the labelling view asked for: its accuracy on the random checks, the fair figure,
    first ([] under MIN_CHECKS of them or without)."""
    if checks.get("n", 0) < MIN_CHECKS:
        return []
    lo, hi = checks["ci95"]
    return [
        f"<span style='font-size:16px'>Accuracy on the random checks <b>{100 * checks['accuracy']:.1f}%"
        f"</b></span> (95% interval {100 * lo:.1f}–{100 * hi:.1f}%, the {checks['n']} images among your "
        "labels that the labelling view drew at random: a fair sample of the folder. The figures below are "
        "over every label, mostly the images it asked about for being the ones it was least sure of"
        + (", hence lower)" if acc is not None and acc < checks["accuracy"] else ")")
    ]


def head_line(d: dict) -> str:
    """What a feature-extraction head reads and why, in words (metrics.json's ``depths``)."""
    check = d.get("power_check")
    if check and check.get("kept") == 1:
        p = check["power"]
        loss = loss_words(check, "")
        figures = (
            f"{loss} {check['loss']['1']:.3f} as they are, {check['loss'][str(p)]:.3f} raised, difference "
            f"{check['difference']:+.3f} ± {check['se']:.3f}"
        )
        if check["difference"] > check["se"]:
            return _head_line(d) + (
                f" The final features are read as they are, not raised to the power {p:g}: out of fold they do "
                f"clearly better as they are ({figures})."
            )
        return _head_line(d) + (
            f" The final features are read as they are: raised to the power {p:g} they did not do clearly better "
            f"out of fold ({figures}), and a tie goes to the simpler."
        )
    return _head_line(d)


def _head_line(d: dict) -> str:
    c = d.get("comparison")
    tried = len({row.get("C") for row in d.get("tried") or []})
    reg = f"regularisation C {d.get('C', 0):g}, chosen out of fold" + (f" of {tried} tried" if tried > 1 else "")
    if not c:
        return f"The head reads the network's final features ({reg})."
    gain = 100 * (c["accuracy"]["final+depths"] - c["accuracy"]["final"])
    mix = c.get("share", 1)  # the best mix tried (runs saved before the heads were mixed: 1, a head on them alone)
    words = "with them" if mix >= 1 else f"with a head on them as {100 * mix:.0f}% of the logits"
    loss = loss_words(c, "")
    evidence = (
        f"out of fold {gain:+.1f} points of accuracy {words}, {loss} {c['loss']['final']:.3f} without and "
        f"{c['loss']['final+depths']:.3f} with (difference {c['difference']:+.3f} ± {c['se']:.3f}, "
        f"{c['images']} images)"
    )
    if d.get("kept") and "C_depths" in d:  # a mix of two heads
        loss = f"{loss} {c['loss']['final']:.3f} -> {c['loss']['final+depths']:.3f}"
        return (
            f"The head reads the network's final features and its earlier layers, as two heads mixed: one on the "
            f"final features (C {d['C']:g}) and one on the earlier layers as well (C {d['C_depths']:g}), the second "
            f"giving {100 * d.get('share', 1):.0f}% of the logits. Out of fold {gain:+.1f} points of accuracy over "
            f"the final features alone, {loss} (difference {c['difference']:+.3f} ± {c['se']:.3f}, "
            f"{c['images']} images); each C and the mix chosen out of fold."
        )
    if d.get("kept"):
        return f"The head reads the network's earlier layers as well as its final features: {evidence}; {reg}."
    return (
        "The head reads the network's final features alone: its earlier layers did not do clearly better "
        f"({evidence}); {reg}."
    )
