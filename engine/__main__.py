"""Command line: ``python -m engine {train,predict,evaluate,export,backbones,scan,cache,doctor,label}`` (benchmarks:
``python -m benchmarks``, beside the package).

Progress goes to stderr; results (paths, metrics) to stdout. Ctrl-C stops cleanly (the best epoch so far is kept);
a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from engine.config import EvaluateConfig, ExportConfig, PredictConfig, ScanConfig, TrainConfig, add_arguments, from_args
from engine.doctor.findings import DoctorConfig
from engine.events import BatchMetrics, Callbacks, CancelToken, EngineError, EpochMetrics, Progress
from engine.labelling.session import LabelConfig


def _err(msg: str) -> None:
    if sys.stderr is not None:
        print(msg, file=sys.stderr, flush=True)


class TerminalProgress(Callbacks):
    """Prints one line per epoch and a throttled line for long phases (safe when stderr is None)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.last = 0.0
        self.t0 = time.perf_counter()

    def _line(self, text: str) -> None:
        if not self.quiet:
            _err(f"[{time.perf_counter() - self.t0:6.1f}s] {text}")

    def on_log(self, message: str) -> None:
        self._line(message)

    def on_progress(self, p: Progress) -> None:
        now = time.perf_counter()
        if p.total and p.done < p.total and now - self.last < 2.0:
            return
        if p.total and p.done == 0:
            return
        self.last = now
        rate = f"  {p.images_per_s:.1f} img/s" if p.images_per_s else ""
        eta = f"  ETA {p.eta_s:.0f}s" if p.eta_s and p.done < p.total else ""
        what = f" ({p.message})" if p.message else ""
        self._line(f"{p.phase}{what} {p.done}/{p.total}{rate}{eta}")

    def on_train_batch_end(self, m: BatchMetrics) -> None:
        now = time.perf_counter()
        if now - self.last < 5.0 or m.step == m.steps:
            return
        self.last = now
        self._line(
            f"epoch {m.epoch} step {m.step}/{m.steps}  loss {m.loss:.4f}  acc {m.accuracy:.3f}"
            f"  {m.images_per_s:.1f} img/s  ETA {m.eta_s:.0f}s"
        )

    def on_train_epoch_end(self, m: EpochMetrics) -> None:
        if not m.worth_logging:
            return
        if m.label:
            self._line(
                f"head, {m.label}: train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}  out-of-fold loss "
                f"{m.val_loss:.4f} acc {m.val_accuracy:.3f}{'  *' if m.is_best else ''}"
            )
            return
        rate = f"  {m.images_per_s:.1f} img/s" if m.images_per_s and not m.many_cheap_epochs else ""
        self._line(
            f"epoch {m.epoch}/{m.epochs}  train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}  "
            f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.3f}{rate}{'  *' if m.is_best else ''}"
        )


def _install_sigint(cancel: CancelToken) -> None:
    def handler(signum, frame):
        if cancel.cancelled:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _err("\nStopping after this batch (the best epoch so far is kept); Ctrl-C again to abort.")
        cancel.cancel()

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not in the main thread
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine",
        description="Transfer Studio engine: transfer learning on a local image folder (no GUI needed).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    # Each job's options come from its config dataclass (engine/config.py): one declaration, no copies here.
    for name, cls, text in (
        ("train", TrainConfig, "train a classifier on DATA and save a run folder"),
        ("predict", PredictConfig, "predict every image under a folder (or given files) and write a CSV"),
        ("evaluate", EvaluateConfig, "score a labelled folder with a saved run"),
        ("export", ExportConfig, "export a run's network to ONNX or TorchScript"),
        ("scan", ScanConfig, "scan a folder and report classes, split and unreadable files"),
        ("doctor", DoctorConfig, "find duplicates, leaks between splits, likely wrong labels and outliers in a folder"),
        ("label", LabelConfig, "label an unsorted folder: suggestions for every image and which to label next"),
    ):
        sp = sub.add_parser(name, help=text)
        add_arguments(sp, cls)
        if name in ("train", "predict", "evaluate", "doctor", "label"):
            sp.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    sub.choices["evaluate"].add_argument("--json", help="also write the metrics to this file")

    b = sub.add_parser("backbones", help="list backbones and whether their weights are available offline")
    b.add_argument("--all", action="store_true", help="every torchvision classification model")
    b.add_argument("--json", action="store_true")

    c = sub.add_parser("cache", help="show (or --clear) the embedding cache that makes feature-extraction reruns fast")
    c.add_argument("--cache-dir", help="default: ~/.cache/transfer-studio/embeddings (or $TRANSFER_STUDIO_CACHE)")
    c.add_argument("--clear", action="store_true", help="delete it; later runs embed their images again")

    return p


def _job(fn, cfg, quiet: bool):
    """Run one engine job with terminal progress and Ctrl-C as its cancel token."""
    cancel = CancelToken()
    _install_sigint(cancel)
    return fn(cfg, TerminalProgress(quiet), cancel)


def cmd_train(a) -> int:
    from engine.train.fit import fit

    res = _job(fit, from_args(TrainConfig, a), a.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports and saves
    if res.run_dir is None:
        _err(res.message)
        return 130
    m = res.metrics
    print(
        json.dumps(
            {
                "run": res.run_dir,
                "status": m["status"],
                "val_accuracy": m.get("val_accuracy"),
                "val_accuracy_ci95": m.get("val_accuracy_ci95"),
                "test_accuracy": m.get("test_accuracy"),
                "best_epoch": m.get("best_epoch"),
                "train_seconds": m.get("train_seconds"),
                "skipped": len(res.skipped),
            },
            indent=2,
        )
    )
    return 0


def cmd_predict(a) -> int:
    from engine.predict.predictions import predict_folder

    res = _job(predict_folder, from_args(PredictConfig, a), a.quiet)
    if res.cancelled:
        return 130
    print(
        json.dumps(
            {
                "csv": res.csv_path,
                "rows": len(res.rows),
                "errors": res.n_errors,
                "seconds": round(res.seconds, 2),
                **({"sorted": res.sorted_summary} if res.sorted_summary else {}),
            },
            indent=2,
        )
    )
    return 0


def cmd_evaluate(a) -> int:
    from engine.predict.evaluate import evaluate
    from engine.runs import atomic_write_json

    res = _job(evaluate, from_args(EvaluateConfig, a), a.quiet)
    if res.cancelled:
        return 130
    m = dict(res.metrics)
    m["skipped"] = [{"path": p, "reason": r} for p, r in res.skipped]
    if a.json:
        atomic_write_json(a.json, m)
    print(json.dumps(m, indent=2, ensure_ascii=False))
    return 0


def cmd_export(a) -> int:
    from engine.predict.export import export_model

    res = _job(export_model, from_args(ExportConfig, a), True)
    if res.cancelled:
        return 130
    print(json.dumps({"model": res.model, "sidecar": res.sidecar}, indent=2))
    return 0


def cmd_backbones(a) -> int:
    from engine.network.backbones import list_backbones

    rows = list_backbones(include_all=a.all)
    if a.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(f"{'name':22} {'params':>8} {'input':>6}  offline  weights")
    for r in rows:
        print(
            f"{r.name:22} {r.params_m:7.1f}M {r.input_size:6d}  {'yes' if r.weights_available else 'no ':7}  "
            f"{r.weights_where}"
        )
    print("\nBackbones marked 'no' need --weights FILE, or --download when online.")
    return 0


def cmd_scan(a) -> int:
    from engine.data.labels import open_dataset

    ds = _job(open_dataset, from_args(ScanConfig, a), True).dataset
    if ds is None:
        return 130
    print(
        json.dumps(
            {
                "root": ds.root,
                "layout": ds.layout,
                "classes": ds.classes,
                "counts": ds.counts(),
                "warnings": ds.warnings,
                "skipped": [{"path": p, "reason": r} for p, r in ds.skipped],
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


def cmd_doctor(a) -> int:
    from engine.doctor.findings import CSV_HEADER, ISSUES, doctor

    res = _job(doctor, from_args(DoctorConfig, a), a.quiet)
    if res.cancelled:
        return 130
    counts = res.counts()
    n = len(res.dataset.samples)
    print(f"Checked {n} images of {res.dataset.root} in {res.seconds:.1f} s")
    words = {
        "duplicate": "byte-identical copies in the same split",
        "near-duplicate": "near copies in the same split",
        "leak": "copies across splits (inflate the reported accuracy)",
        "label": "probably wrong class",
        "outlier": "unlike every other image",
    }
    for k in ISSUES:
        print(f"  {k:15} {counts[k]:6}  {words[k]}")
    if not res.findings:
        print("No problems found.")
    if res.label_note:
        print(res.label_note)
    elif counts["label"]:
        print(
            f"About {100 * res.label_precision:.0f}% of the {counts['label']} wrong-label findings are estimated "
            f"true on this folder (about {res.label_expected:.1f} would be listed even if every label were right)."
        )
    if res.leaked_eval:
        print(f"{res.leaked_eval} validation/test image(s) have a copy in train.")
    if res.rescored and res.rescored["accuracy_without_leaks"] is not None:
        r = res.rescored
        print(
            f"Run {a.run}: validation accuracy {r['accuracy']:.3f}; without the {r['removed']} leaked image(s) "
            f"{r['accuracy_without_leaks']:.3f}"
        )
    if a.csv:
        print(f"Findings written to {a.csv} (one row each: {', '.join(CSV_HEADER)})")
    return 0


def cmd_label(a) -> int:
    from engine.labelling.session import CSV_HEADER, MIN_CHECKS, label

    res = _job(label, from_args(LabelConfig, a), a.quiet)
    if res.cancelled:
        return 130
    print(
        f"{res.n_images} images, {res.n_labelled} labelled"
        + (f" in {len(res.classes)} classes ({', '.join(res.classes)})" if res.classes else "")
        + f"; {res.seconds:.1f} s"
    )
    if res.skipped:
        print(f"Skipped {len(res.skipped)} unreadable file(s): " + "; ".join(f"{p}: {r}" for p, r in res.skipped[:5]))
    acc = res.accept
    if not acc:
        print("No suggestions yet: label images of at least two classes (the first to ask are the most typical of")
        print("each kind of picture in the folder).")
    else:
        right = acc["right_so_far"]
        print(
            f"Accept suggestions at {acc['level']:.0%} confidence: {acc['would_label']} image(s); such suggestions "
            + (f"were right {right:.0%} of the time on {acc['judged']} labelled images judged out of sample "
               f"(at least {acc['right_at_least']:.0%} allowing for chance)"
               if right is not None else "have not been judged yet (no labelled image reached that confidence)")
        )  # fmt: skip
    if acc:
        print(
            f"Estimated accuracy: {res.estimate[0]:.0%} (95% range {res.estimate[1]:.0%}-{res.estimate[2]:.0%}) on "
            f"{res.estimate[3]} random checks"
            if res.estimate
            else f"Estimated accuracy: once {MIN_CHECKS} random checks are labelled ({res.checks} so far)"
        )
        print("  (one image in ten asked is drawn at random: a fair sample of the folder, unlike the others)")
    asked = sorted((r for r in res.rows if r[4] != ""), key=lambda r: r[4])
    for r in asked:
        print(f"  ask {r[4]:>3}: {r[0]}" + (f"  (looks like {r[1]}, {float(r[2]):.0%})" if r[1] else ""))
    if a.csv:
        print(f"Written to {a.csv} (one row per unlabelled image: {', '.join(CSV_HEADER)})")
    return 0


def cmd_cache(a) -> int:
    from engine.embed.cache import cache_contents, clear_cache
    from engine.paths import default_cache_dir

    folder = a.cache_dir or default_cache_dir()
    if a.clear:
        print(f"Deleted {clear_cache(folder) / 1e6:.1f} MB of cached embeddings from {folder}")
        return 0
    entries = cache_contents(folder)
    print(f"Embedding cache: {folder}")
    if not entries:
        print("(empty)")
        return 0
    print(f"{'backbone':22} {'key':16} {'images':>8} {'MB':>9}")
    for e in entries:
        images = ("-" if e["key"] == "-" else "damaged") if e["images"] is None else str(e["images"])
        print(f"{e['backbone']:22} {e['key']:16} {images:>8} {e['bytes'] / 1e6:9.1f}")
    print(f"{'total':22} {'':16} {'':>8} {sum(e['bytes'] for e in entries) / 1e6:9.1f}")
    print("\nA key is one backbone + weights + preprocessing. `python -m engine cache --clear` deletes it all.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "train": cmd_train,
        "predict": cmd_predict,
        "evaluate": cmd_evaluate,
        "export": cmd_export,
        "backbones": cmd_backbones,
        "scan": cmd_scan,
        "cache": cmd_cache,
        "doctor": cmd_doctor,
        "label": cmd_label,
    }
    try:
        return handlers[args.command](args)
    except EngineError as exc:
        _err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("aborted")
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
