"""Run folders: written atomically, validated on load, never unpickled.

A run folder holds ``model.safetensors``, ``model.json``, ``metrics.json``, ``history.csv``, ``split.csv``,
``skipped.csv`` and ``val_predictions.csv``. It is assembled in a hidden temporary sibling and renamed into place
in one step, so a crash leaves either no run or a complete one; leftovers (``.tmp-*``) are ignored and cleaned.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from .events import EngineError

FORMAT_VERSION = 1
RUN_FILES = ("model.safetensors", "model.json", "metrics.json")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def default_runs_dir() -> str:
    """Where runs go when the user does not say: ``~/Documents/Transfer Studio/runs`` or the app-data folder."""
    env = os.environ.get("TRANSFER_STUDIO_RUNS")
    if env:
        return env
    docs = os.path.join(os.path.expanduser("~"), "Documents")
    base = docs if os.path.isdir(docs) else os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "Transfer Studio", "runs")


def new_run_name(backbone: str, mode: str) -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{backbone}-{mode}"


def unique_dir(path: str) -> str:
    if not os.path.exists(path):
        return path
    i = 2
    while os.path.exists(f"{path}-{i}"):
        i += 1
    return f"{path}-{i}"


@dataclass
class RunWriter:
    """Collects the files of a run in a temporary folder; :meth:`commit` moves it into place atomically."""

    target: str
    overwrite: bool = False
    tmp: str = field(init=False)

    def __post_init__(self) -> None:
        self.target = os.path.abspath(self.target)
        parent = os.path.dirname(self.target)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"Cannot create the runs folder {parent}: {exc.strerror or exc}. "
                              "Choose another output folder.") from exc
        if os.path.exists(self.target) and os.listdir(self.target) and not self.overwrite:
            raise EngineError(f"{self.target} already exists and is not empty. Choose another --out, or pass "
                              "--overwrite to replace it.")
        try:
            self.tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.target)}-", dir=parent)
        except OSError as exc:
            raise EngineError(f"Cannot write to {parent}: {exc.strerror or exc}. Choose another output folder "
                              "or free some disk space.") from exc

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def write_text(self, name: str, text: str) -> None:
        with open(self.path(name), "w", encoding="utf-8", newline="") as f:
            f.write(text)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def write_csv(self, name: str, header: list[str], rows) -> None:
        self.write_text(name, csv_text(header, rows))

    def commit(self) -> str:
        # model.json is written last by callers and checked on load, so a folder is usable only when whole.
        for name in os.listdir(self.tmp):
            with open(self.path(name), "rb") as f:
                os.fsync(f.fileno())
        old = None
        if os.path.exists(self.target):
            old = self.target + f".old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise EngineError(f"{path} is missing: this is not a complete run folder.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path} is damaged ({exc}).") from exc
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object.")
    return data


def validate_model_json(meta: dict, where: str) -> None:
    """Check the fields prediction relies on before any weights are touched."""
    problems = []
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        problems.append("'classes' must list at least two class names")
    elif len(set(classes)) != len(classes):
        problems.append("'classes' has duplicates")
    if not isinstance(meta.get("backbone"), str):
        problems.append("'backbone' is missing")
    if meta.get("mode") not in ("feature-extraction", "fine-tuning"):
        problems.append("'mode' must be feature-extraction or fine-tuning")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict) or not {"size", "resize", "mode", "mean", "std"} <= set(pre):
        problems.append("'preprocessing' is incomplete")
    else:
        size = pre.get("size")
        if not isinstance(size, int) or not 16 <= size <= 1024:
            problems.append("'preprocessing.size' must be an integer between 16 and 1024")
    if meta.get("format_version") != FORMAT_VERSION:
        problems.append(f"unsupported format_version {meta.get('format_version')!r}")
    if problems:
        raise EngineError(f"{where} is not a valid Transfer Studio model: " + "; ".join(problems) + ".")


def is_run_dir(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in RUN_FILES)


def list_runs(runs_dir: str) -> list[dict]:
    """Summaries of the complete runs in ``runs_dir`` (newest first); partial or damaged folders are skipped."""
    out = []
    if not os.path.isdir(runs_dir):
        return out
    for name in os.listdir(runs_dir):
        path = os.path.join(runs_dir, name)
        if name.startswith(".") or not os.path.isdir(path) or not is_run_dir(path):
            continue
        try:
            meta = read_json(os.path.join(path, "model.json"))
            metrics = read_json(os.path.join(path, "metrics.json"))
        except EngineError:
            continue
        out.append({
            "path": path, "name": name, "created": meta.get("created", ""),
            "backbone": meta.get("backbone", ""), "mode": meta.get("mode", ""),
            "val_accuracy": metrics.get("val_accuracy"), "test_accuracy": metrics.get("test_accuracy"),
            "train_seconds": metrics.get("train_seconds"), "status": metrics.get("status", ""),
            "classes": meta.get("classes", []),
        })
    out.sort(key=lambda r: r["created"], reverse=True)
    return out


def read_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "history.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({k: (float(v) if v not in ("", None) else float("nan")) for k, v in r.items()})
    return out


def read_predictions(run_dir: str, name: str = "val_predictions.csv") -> list[dict]:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
