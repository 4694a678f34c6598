"""Transfer Studio engine: transfer learning on a local image folder, with no Qt dependency.

Public API: one function per job, each taking its config (engine/config.py), a :class:`Callbacks` and a
:class:`CancelToken`, and returning a result that says whether it was cancelled: ``scan_folder(ScanConfig)``,
``fit(TrainConfig)``, ``predict_folder(PredictConfig)``, ``evaluate(EvaluateConfig)``, ``export_model(ExportConfig)``.
Importing this package is cheap: torch is imported only when a job runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from engine.events import (
    BatchMetrics,
    Callbacks,
    Cancelled,
    CancelToken,
    EngineError,
    EpochMetrics,
    Phase,
    PredictionRow,
    Progress,
)

__all__ = [  # the face the GUI, the CLI and the tests import; the jobs load lazily (see __getattr__)
    "BatchMetrics",
    "Callbacks",
    "Cancelled",
    "CancelToken",
    "EngineError",
    "EpochMetrics",
    "Phase",
    "PredictionRow",
    "Progress",
    "fit",
    "TrainConfig",
    "FitResult",
    "ScanConfig",
    "PredictConfig",
    "EvaluateConfig",
    "ExportConfig",
    "predict_folder",
    "evaluate",
    "export_model",
    "scan_folder",
    "list_backbones",
    "load_model",
]


def __getattr__(name: str):
    # Lazy re-exports keep `import engine` fast (torch loads only when a job needs it).
    lazy = {
        "fit": ("train.fit", "fit"),
        "TrainConfig": ("config", "TrainConfig"),
        "FitResult": ("train.fit", "FitResult"),
        "ScanConfig": ("config", "ScanConfig"),
        "PredictConfig": ("config", "PredictConfig"),
        "EvaluateConfig": ("config", "EvaluateConfig"),
        "ExportConfig": ("config", "ExportConfig"),
        "predict_folder": ("predict.predictions", "predict_folder"),
        "evaluate": ("predict.evaluate", "evaluate"),
        "export_model": ("predict.export", "export_model"),
        "scan_folder": ("data.folder", "scan_folder"),
        "list_backbones": ("network.backbones", "list_backbones"),
        "load_model": ("network.model", "load_model"),
    }
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(name)
