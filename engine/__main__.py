"""Command line: ``python -m engine {train,predict,evaluate,export,backbones,scan,bench}``.

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

from .events import BatchMetrics, Callbacks, CancelToken, EngineError, EpochMetrics, Progress


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
        self._line(f"{p.phase} {p.done}/{p.total}{rate}{eta}")

    def on_train_batch_end(self, m: BatchMetrics) -> None:
        now = time.perf_counter()
        if now - self.last < 5.0 or m.step == m.steps:
            return
        self.last = now
        self._line(f"epoch {m.epoch} step {m.step}/{m.steps}  loss {m.loss:.4f}  acc {m.accuracy:.3f}"
                   f"  {m.images_per_s:.1f} img/s  ETA {m.eta_s:.0f}s")

    def on_train_epoch_end(self, m: EpochMetrics) -> None:
        if m.epochs > 20 and m.epoch % 10 and not m.epoch == 1:
            return  # feature-extraction heads run many cheap epochs: print every 10th
        rate = f"  {m.images_per_s:.1f} img/s" if m.images_per_s and m.epochs <= 20 else ""
        self._line(f"epoch {m.epoch}/{m.epochs}  train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}  "
                   f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.3f}{rate}{'  *' if m.is_best else ''}")


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


def _unfreeze(v: str):
    return v if v == "all" else int(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="Transfer Studio engine: transfer learning on "
                                "a local image folder (no GUI needed).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a classifier on DATA and save a run folder")
    t.add_argument("data", help="folder of class subfolders, or with train/ val/ [test/] subfolders")
    t.add_argument("--out", help="run folder to create (default: a new folder in the runs folder)")
    t.add_argument("--mode", choices=["feature-extraction", "fine-tuning"], default="feature-extraction")
    t.add_argument("--backbone", default="efficientnet_lite0", help="see `python -m engine backbones`")
    t.add_argument("--weights", help="load backbone weights from this local file (.safetensors/.pth)")
    t.add_argument("--download", action="store_true", help="allow downloading torchvision weights (needs internet)")
    t.add_argument("--unfreeze", type=_unfreeze, default=2, help="fine-tuning: last N stages, or 'all' (default 2)")
    t.add_argument("--epochs", type=int, help="default 100 (feature extraction, early-stopped) / 5 (fine-tuning)")
    t.add_argument("--batch-size", type=int, help="default 64 / 32")
    t.add_argument("--lr", type=float, help="head learning rate (default 3e-3 / 1e-3)")
    t.add_argument("--backbone-lr-mult", type=float, default=0.1, help="backbone lr = lr x this (fine-tuning)")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--no-augment", dest="augment", action="store_false", help="fine-tuning: no random crop/flip")
    t.add_argument("--patience", type=int, help="early-stopping patience in epochs (0 = off)")
    t.add_argument("--no-lp-init", dest="linear_probe_init", action="store_false",
                   help="fine-tuning: start from a random head instead of a linear probe")
    t.add_argument("--val-split", type=float, default=0.2)
    t.add_argument("--test-split", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (prefers CUDA), cpu, cuda, cuda:N, mps")
    t.add_argument("--cache-dir", help="embedding cache folder (default: the user cache folder)")
    t.add_argument("--no-cache", dest="cache", action="store_false", help="do not read or write embeddings cache")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--quiet", action="store_true")

    pr = sub.add_parser("predict", help="predict every image under a folder (or given files) and write a CSV")
    pr.add_argument("run")
    pr.add_argument("images", nargs="+", help="folder(s), searched recursively, and/or image files")
    pr.add_argument("--csv", required=True, help="CSV file to write")
    pr.add_argument("--top-k", type=int, default=1)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--batch-size", type=int)
    pr.add_argument("--quiet", action="store_true")

    ev = sub.add_parser("evaluate", help="score a labelled folder with a saved run")
    ev.add_argument("run")
    ev.add_argument("data")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", help="also write the metrics to this file")
    ev.add_argument("--quiet", action="store_true")

    ex = sub.add_parser("export", help="export a run's network to ONNX or TorchScript")
    ex.add_argument("run")
    ex.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    ex.add_argument("--out", required=True)

    b = sub.add_parser("backbones", help="list backbones and whether their weights are available offline")
    b.add_argument("--all", action="store_true", help="every torchvision classification model")
    b.add_argument("--json", action="store_true")

    s = sub.add_parser("scan", help="scan a folder and report classes, split and unreadable files")
    s.add_argument("data")
    s.add_argument("--val-split", type=float, default=0.2)
    s.add_argument("--test-split", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("cache", help="show (or --clear) the embedding cache that makes feature-extraction reruns fast")
    c.add_argument("--cache-dir", help="default: ~/.cache/transfer-studio/embeddings (or $TRANSFER_STUDIO_CACHE)")
    c.add_argument("--clear", action="store_true", help="delete it; later runs embed their images again")

    bench = sub.add_parser("bench", help="benchmark the engine against a tutorial-style loop (see docs/benchmarks.md)")
    bench.add_argument("data", nargs="?", help="image folder (default: ../shared/datasets/hymenoptera)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--epochs", type=int, default=10, help="epochs of the reference fixed-feature loop")
    bench.add_argument("--ft-epochs", type=int, default=2)
    bench.add_argument("--json", help="also write the table as JSON here")
    return p


def cmd_train(a) -> int:
    from .train import TrainConfig, fit

    cancel = CancelToken()
    _install_sigint(cancel)
    cfg = TrainConfig(data=a.data, out=a.out, mode=a.mode, backbone=a.backbone, weights=a.weights,
                      download=a.download, unfreeze=a.unfreeze, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                      backbone_lr_mult=a.backbone_lr_mult, weight_decay=a.weight_decay, augment=a.augment,
                      patience=a.patience, val_split=a.val_split, test_split=a.test_split, seed=a.seed,
                      device=a.device, cache=a.cache, cache_dir=a.cache_dir, overwrite=a.overwrite,
                      linear_probe_init=a.linear_probe_init)
    res = fit(cfg, TerminalProgress(a.quiet), cancel)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports and saves
    if res.run_dir is None:
        _err(res.message)
        return 130
    m = res.metrics
    print(json.dumps({"run": res.run_dir, "status": m["status"], "val_accuracy": m.get("val_accuracy"),
                      "val_accuracy_ci95": m.get("val_accuracy_ci95"), "test_accuracy": m.get("test_accuracy"),
                      "best_epoch": m.get("best_epoch"), "train_seconds": m.get("train_seconds"),
                      "skipped": len(res.skipped)}, indent=2))
    return 0


def cmd_predict(a) -> int:
    from .predict import predict_folder

    cancel = CancelToken()
    _install_sigint(cancel)
    res = predict_folder(a.run, a.images, a.csv, a.top_k, a.device, a.batch_size, TerminalProgress(a.quiet), cancel)
    if res.cancelled:
        return 130
    print(json.dumps({"csv": res.csv_path, "rows": len(res.rows), "errors": res.n_errors,
                      "seconds": round(res.seconds, 2)}, indent=2))
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate
    from .runs import atomic_write_json

    cancel = CancelToken()
    _install_sigint(cancel)
    res = evaluate(a.run, a.data, a.device, callbacks=TerminalProgress(a.quiet), cancel=cancel)
    if res.cancelled:
        return 130
    m = dict(res.metrics)
    m["skipped"] = [{"path": p, "reason": r} for p, r in res.skipped]
    if a.json:
        atomic_write_json(a.json, m)
    print(json.dumps(m, indent=2, ensure_ascii=False))
    return 0


def cmd_export(a) -> int:
    from .export import export_model

    print(json.dumps(export_model(a.run, a.format, a.out), indent=2))
    return 0


def cmd_backbones(a) -> int:
    from .backbones import list_backbones

    rows = list_backbones(include_all=a.all)
    if a.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(f"{'name':22} {'params':>8} {'input':>6}  offline  weights")
    for r in rows:
        print(f"{r.name:22} {r.params_m:7.1f}M {r.input_size:6d}  {'yes' if r.weights_available else 'no ':7}  "
              f"{r.weights_where}")
    print("\nBackbones marked 'no' need --weights FILE, or --download when online.")
    return 0


def cmd_scan(a) -> int:
    from .data import scan_folder

    ds = scan_folder(a.data, a.val_split, a.test_split, a.seed)
    print(json.dumps({"root": ds.root, "layout": ds.layout, "classes": ds.classes, "counts": ds.counts(),
                      "warnings": ds.warnings, "skipped": [{"path": p, "reason": r} for p, r in ds.skipped]},
                     indent=2, ensure_ascii=False))
    return 0


def cmd_cache(a) -> int:
    from .features import cache_contents, clear_cache, default_cache_dir

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
        images = "damaged" if e["images"] is None else str(e["images"])
        print(f"{e['backbone']:22} {e['key']:16} {images:>8} {e['bytes'] / 1e6:9.1f}")
    print(f"{'total':22} {'':16} {'':>8} {sum(e['bytes'] for e in entries) / 1e6:9.1f}")
    print("\nA key is one backbone + weights + preprocessing. `python -m engine cache --clear` deletes it all.")
    return 0


def cmd_bench(a) -> int:
    from .bench import run_bench

    return run_bench(a)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "export": cmd_export,
                "backbones": cmd_backbones, "scan": cmd_scan, "cache": cmd_cache, "bench": cmd_bench}
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
