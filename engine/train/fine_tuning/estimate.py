"""How long fine-tuning will take here: measured rates of earlier runs on this machine, kept in the app's data folder.

Every saved run records its wall time per image-epoch (``speeds.json``, keyed by mode, backbone, device and, for
fine-tuning, the stages unfrozen). :func:`estimate_fine_tuning` uses the last fine-tuning run with the same key;
without one, feature extraction's measured embedding rate (a fine-tuning step costs about
``STEP_COST`` forward passes: forward, backward and the evaluation passes); without that either, a stated guess.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from engine.paths import app_data_dir
from engine.runs import atomic_write_json

STEP_COST = 4.0  # seconds per fine-tuning image-epoch ~ STEP_COST / embedding images/s (measured 3.1-4.4 here)
GUESS_SECONDS_PER_IMAGE_EPOCH = {"cpu": 0.1, "cuda": 0.004, "mps": 0.02}


@dataclass(frozen=True)
class Estimate:
    seconds: float
    text: str  # "about 12 min for 5 epochs of 3,453 images (measured on this machine)"


def _path() -> str:
    return os.path.join(app_data_dir(), "speeds.json")


def _key(mode: str, backbone: str, device: str, unfreeze) -> str:
    kind = device.split(":")[0].split(" ")[0].lower()
    return f"{mode}|{backbone}|{kind}" + (f"|{unfreeze}" if mode == "fine-tuning" else "")


def _read() -> dict:
    try:
        with open(_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(mode: str, backbone: str, device: str, unfreeze, metrics: dict) -> None:
    """Remember this run's seconds per image-epoch (fine-tuning) or embedding rate (feature extraction). Never
    fails a run: a read-only data folder only loses the estimate."""
    data = _read()
    if mode == "fine-tuning":
        work = (metrics.get("n_train") or 0) * (metrics.get("epochs_run") or 0)
        if not work or not metrics.get("train_seconds"):
            return
        data[_key(mode, backbone, device, unfreeze)] = {"seconds_per_image_epoch": metrics["train_seconds"] / work}
    elif metrics.get("embed_images_per_s"):
        data[_key(mode, backbone, device, unfreeze)] = {"embed_images_per_s": metrics["embed_images_per_s"]}
    else:
        return
    try:
        os.makedirs(app_data_dir(), exist_ok=True)
        atomic_write_json(_path(), data)
    except OSError:
        pass


def estimate_fine_tuning(
    backbone: str, device: str, unfreeze, n_train: int, epochs: int, embed_images_per_s: float | None = None
) -> Estimate:
    """Wall time of fine-tuning ``n_train`` images for ``epochs`` epochs, and where the figure comes from."""
    data = _read()
    kind = _device_kind(device, data)
    ft = data.get(_key("fine-tuning", backbone, kind, unfreeze), {}).get("seconds_per_image_epoch")
    fe = embed_images_per_s or data.get(_key("feature-extraction", backbone, kind, None), {}).get("embed_images_per_s")
    if ft:
        per, source = ft, "measured by an earlier fine-tuning run on this machine"
    elif fe:
        per, source = STEP_COST / fe, f"from the embedding rate measured here ({fe:.0f} images/s)"
    else:
        per, source = GUESS_SECONDS_PER_IMAGE_EPOCH.get(kind, 0.1), "a rough guess: nothing measured here yet"
    seconds = per * n_train * epochs
    return Estimate(seconds, f"about {_minutes(seconds)} for {epochs} epochs of {n_train:,} images ({source})")


def _device_kind(device: str, data: dict) -> str:
    """cpu/cuda/mps without importing torch on the caller's thread (the window's): "auto" is resolved only when
    torch is already loaded; otherwise a GPU measured here before, else the CPU."""
    device = (device or "auto").lower()
    if device != "auto":
        return device.split(":")[0]
    if "torch" in sys.modules:
        from engine.network.device import resolve_device

        return resolve_device("auto").type
    return "cuda" if any(k.split("|")[2] == "cuda" for k in data if k.count("|") >= 2) else "cpu"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
