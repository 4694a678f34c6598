"""Export a run's network (normalised image tensor -> logits) to ONNX or TorchScript, plus a JSON sidecar."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from engine.config import EXPORT_FORMATS, ExportConfig
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, Progress
from engine.network.model import load_model
from engine.runs import atomic_write_text


@dataclass
class ExportResult:
    model: str | None  # the file written (None when cancelled)
    sidecar: str | None
    cancelled: bool = False


def export_model(
    config: ExportConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None
) -> ExportResult:
    """Write ``config.out`` and ``config.out + '.json'`` (classes and preprocessing).

    The exported network takes a float tensor (N, 3, size, size) already normalised with the run's mean/std and
    returns logits and calibrated probabilities (the run's temperature inside); they agree with ``predict`` within
    1e-4 on the same images (tested). A cancel is honoured before
    the export starts (the exporter itself cannot be interrupted) and leaves no file.
    """
    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    fmt = config.format.lower()
    if fmt not in EXPORT_FORMATS:
        raise EngineError(f"Unknown export format '{fmt}': use onnx or torchscript.")
    try:
        cancel.raise_if_cancelled()
        loaded = load_model(config.run)
        cancel.raise_if_cancelled()
        cb.on_progress(Progress(Phase.EXPORTING, 0, 1))
        _write(loaded, fmt, config.out)
    except Cancelled:
        return ExportResult(None, None, cancelled=True)
    cb.on_progress(Progress(Phase.EXPORTING, 1, 1))
    return ExportResult(config.out, config.out + ".json")


def _with_probabilities(model, temperature: float):
    """The classifier with a second output: calibrated probabilities, softmax(logits / T), T inside the graph."""
    import torch
    from torch import nn

    class Calibrated(nn.Module):
        def __init__(self, net: nn.Module, t: float) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("temperature", torch.tensor(float(t)))

        def forward(self, x: torch.Tensor):
            logits = self.net(x)
            return logits, torch.softmax(logits / self.temperature, dim=1)

    return Calibrated(model, temperature).eval()


def _write(loaded, fmt: str, out: str) -> None:
    import torch

    model = _with_probabilities(loaded.model.float().eval(), loaded.temperature)
    size = loaded.preprocessing.size
    example = torch.zeros(2, 3, size, size)
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(folder):
        raise EngineError(f"Folder not found: {folder}")
    tmp = os.path.join(folder, f".tmp-export-{os.getpid()}-{os.path.basename(out)}")
    try:
        if fmt == "onnx":
            _export_onnx(model, example, tmp)
        else:
            with torch.inference_mode(False), torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False)
            traced.save(tmp)
        os.replace(tmp, out)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"Export to {fmt} failed: {exc.__class__.__name__}: {str(exc)[:300]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    sidecar = {
        "format": fmt,
        "classes": loaded.classes,
        "preprocessing": loaded.preprocessing.to_dict(),
        "input": {
            "name": "images",
            "shape": ["N", 3, size, size],
            "dtype": "float32",
            "note": "RGB, resized per preprocessing.mode, (x/255 - mean) / std",
        },
        "outputs": [
            {"name": "logits", "shape": ["N", len(loaded.classes)]},
            {
                "name": "probabilities",
                "shape": ["N", len(loaded.classes)],
                "note": "softmax(logits / temperature): calibrated, as the app shows them",
            },
        ],
        "temperature": loaded.temperature,
        "min_confidence": loaded.min_confidence,
        "backbone": loaded.meta["backbone"],
        "mode": loaded.meta["mode"],
    }
    atomic_write_text(out + ".json", json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")


def _export_onnx(model, example, path: str) -> None:
    import torch

    kwargs = dict(
        input_names=["images"],
        output_names=["logits", "probabilities"],
        opset_version=17,
        dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}, "probabilities": {0: "N"}},
    )
    try:
        import onnx  # noqa: F401 (imported only to give a clear message when missing)
    except ImportError as exc:
        raise EngineError("ONNX export needs the onnx package: pip install onnx onnxscript") from exc
    # The TorchScript-based exporter is the one that exists on every torch we support and needs no onnxscript;
    # newer torch prefers dynamo=True, which we fall back to when the old path is gone.
    try:
        torch.onnx.export(model, (example,), path, dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(model, (example,), path, **kwargs)
