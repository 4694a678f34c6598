"""Transfer Studio engine: transfer learning on a local image folder, with no Qt dependency.

Public API (one function per job, each taking a config/arguments, a :class:`Callbacks` and a :class:`CancelToken`):
``fit``, ``predict_folder``, ``evaluate``, ``export_model``, ``scan_folder``, ``list_backbones``.
Importing this package is cheap: torch is imported only when a job runs.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .events import (BatchMetrics, Callbacks, Cancelled, CancelToken, EngineError, EpochMetrics, Phase,  # noqa: F401
                     PredictionRow, Progress)


def __getattr__(name: str):
    # Lazy re-exports keep `import engine` fast (torch loads only when a job needs it).
    lazy = {
        "fit": ("train", "fit"), "TrainConfig": ("train", "TrainConfig"), "FitResult": ("train", "FitResult"),
        "predict_folder": ("predict", "predict_folder"), "evaluate": ("evaluate", "evaluate"),
        "export_model": ("export", "export_model"), "scan_folder": ("data", "scan_folder"),
        "list_backbones": ("backbones", "list_backbones"), "load_model": ("model", "load_model"),
    }
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(name)
