"""Run folders: written atomically, validated on load, never unpickled.

A run folder holds ``model.safetensors``, ``model.json``, ``metrics.json``, ``history.csv``, ``split.csv``,
``skipped.csv`` and ``val_predictions.csv``, each written once. It is assembled in a hidden temporary sibling and
renamed into place in one step, so a crash leaves either no run or a complete one; leftovers (``.tmp-*``) are
ignored and cleaned.
Automatic mode adds ``auto.json`` to both of its runs once both exist (who won needs both); :func:`read_metrics`
hands it back inside the metrics as ``auto``, as runs saved before 2026-12-02 held it in metrics.json itself.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.events import EngineError
from engine.meters import BackboneFacts

FORMAT_VERSION = 1
RUN_FILES = ("model.safetensors", "model.json", "metrics.json")
AUTO_FILE = "auto.json"


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
            raise EngineError(
                f"Cannot create the runs folder {parent}: {exc.strerror or exc}. Choose another output folder."
            ) from exc
        if os.path.exists(self.target) and os.listdir(self.target) and not self.overwrite:
            raise EngineError(
                f"{self.target} already exists and is not empty. Choose another --out, or pass "
                "--overwrite to replace it."
            )
        try:
            self.tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.target)}-", dir=parent)
        except OSError as exc:
            raise EngineError(
                f"Cannot write to {parent}: {exc.strerror or exc}. Choose another output folder "
                "or free some disk space."
            ) from exc

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
        out.append(
            {
                "path": path,
                "name": name,
                "created": meta.get("created", ""),
                "backbone": meta.get("backbone", ""),
                "mode": meta.get("mode", ""),
                "val_accuracy": metrics.get("val_accuracy"),
                "test_accuracy": metrics.get("test_accuracy"),
                "train_seconds": metrics.get("train_seconds"),
                "status": metrics.get("status", ""),
                "classes": meta.get("classes", []),
            }
        )
    out.sort(key=lambda r: r["created"], reverse=True)
    return out


def read_metrics(run_dir: str) -> dict:
    """A run's metrics.json, with automatic mode's comparison (``auto.json``, when the run has one) as ``auto``."""
    metrics = read_json(os.path.join(run_dir, "metrics.json"))
    auto = os.path.join(run_dir, AUTO_FILE)
    if os.path.isfile(auto):
        metrics["auto"] = read_json(auto)
    return metrics


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


# ------------------------------------------------------------------------------------------------ writing a run


def json_safe(obj):
    """NaN and infinities become null; NumPy scalars become Python numbers (metrics.json is strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from engine import __version__

    def installed(name: str) -> str:
        # Metadata, not an import: `import torchvision` alone took 1.9 s here, and a run from cached features
        # never imports torch at all.
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    torch = sys.modules.get("torch")  # its __version__ also names the CUDA build (e.g. 2.11.0+cu128)
    return {
        "transfer_studio": __version__,
        "torch": torch.__version__ if torch else installed("torch"),
        "torchvision": installed("torchvision"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def save_weights(path: str, weights: dict) -> None:
    """model.safetensors from torch tensors, or from NumPy arrays when the run never imported torch."""
    meta = {"format": "transfer-studio"}
    if all(isinstance(v, np.ndarray) for v in weights.values()):
        from safetensors.numpy import save_file

        # (not np.ascontiguousarray: it turns 0-d arrays such as BatchNorm's num_batches_tracked into shape (1,))
        save_file({k: np.require(v, requirements="C") for k, v in weights.items()}, path, metadata=meta)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in weights.items()}, path, metadata=meta)


TRAIN_EMBEDDINGS = "train_embeddings.safetensors"


def model_json(
    cfg,
    ds,
    facts: BackboneFacts,
    calibration: dict | None = None,
    unfamiliar: dict | None = None,
    features_path: dict | None = None,
    recipe: dict | None = None,
    depths: dict | None = None,
) -> dict:
    """model.json: what ``validate_model_json`` checks and ``model.load_model`` needs, plus the run's config and
    what reproduces every prediction's status: the temperature, the "not sure" threshold, the "unfamiliar" one.
    ``depths`` (feature extraction): whether the head reads the intermediate stages' features too (``kept``, with
    their ``taps``), the final features' width and why (the out-of-fold comparison); runs saved before it read the
    final features alone."""
    conf = asdict(cfg)
    trust = {}
    if calibration:
        trust["calibration"] = {"temperature": calibration["temperature"]}
        trust["unsure"] = {
            k: calibration[k]
            for k in ("min_confidence", "target_accuracy", "expected_coverage", "expected_accuracy", "target_reached")
        }
    if features_path:  # feature extraction: the path that made the features (predict uses the same one)
        trust["features"] = features_path
    if recipe:  # fine-tuning: the input size it trained at (also in preprocessing) and the stages it trained
        trust["fine_tuning"] = recipe
    if depths:
        trust["depths"] = {k: v for k, v in depths.items() if k != "tried"}
    if unfamiliar:
        trust["unfamiliar"] = {
            "k": unfamiliar["k"],
            "threshold": unfamiliar["threshold"],
            "embeddings": TRAIN_EMBEDDINGS,
            **{k: unfamiliar[k] for k in ("dim", "frozen_stages", "space") if k in unfamiliar},
        }
    return json_safe(
        {
            "format_version": FORMAT_VERSION,
            "app": "transfer-studio",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "classes": ds.classes,
            "backbone": cfg.backbone,
            "mode": cfg.mode,
            "preprocessing": facts.preprocessing.to_dict(),
            "feature_dim": facts.feature_dim,
            "head": {
                "type": "linear",
                "in_features": facts.feature_dim,
                "out_features": len(ds.classes),
                "dropout": 0.2,
            },
            "weights_source": facts.weights_source,
            "weights_id": facts.weights_id,
            "data": os.path.abspath(cfg.data),
            "layout": ds.layout,
            "config": json_safe(conf),
            "versions": versions(),
            **trust,
        }
    )


def save_run(
    out: str,
    overwrite: bool,
    *,
    weights: dict,
    history: list[dict],
    ds,
    metrics: dict,
    predictions: list[list],
    meta: dict,
    train_embeddings: np.ndarray | None = None,
) -> str:
    """Write a whole run folder atomically (see the module docstring); returns its path. A failure leaves no
    partial folder and says what to do."""
    writer = RunWriter(out, overwrite=overwrite)
    classes = ds.classes
    try:
        save_weights(writer.path("model.safetensors"), weights)
        if train_embeddings is not None:  # unit length (the caller's), float16: half the size, cosines to ~1e-3
            from safetensors.numpy import save_file

            save_file({"embeddings": np.asarray(train_embeddings, np.float16)}, writer.path(TRAIN_EMBEDDINGS))
        writer.write_csv(
            "history.csv", list(history[0].keys()) if history else ["epoch"], [list(h.values()) for h in history]
        )
        writer.write_csv(
            "split.csv", ["path", "split", "class"], ([x.path, x.split, classes[x.label]] for x in ds.samples)
        )
        writer.write_csv("skipped.csv", ["path", "reason"], ds.skipped)
        writer.write_csv("excluded.csv", ["path"], ([p] for p in ds.excluded))
        writer.write_csv(
            "val_predictions.csv",
            ["path", "split", "label", "prediction", "confidence"] + [f"p_{c}" for c in classes],
            predictions,
        )
        writer.write_json("metrics.json", json_safe(metrics))
        writer.write_json("model.json", meta)  # last: a folder is a run only when whole
        return writer.commit()
    except OSError as exc:
        writer.abort()
        raise EngineError(
            f"Could not save the run to {out}: {exc.strerror or exc}. Free some disk space or "
            "choose another output folder; earlier runs are untouched."
        ) from exc
    except BaseException:
        writer.abort()
        raise
