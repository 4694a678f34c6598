"""The trained classifier (backbone + linear head), saved as safetensors and loaded back with validation."""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.events import EngineError
from engine.network.backbones import Preprocessing, build_architecture
from engine.runs import read_json, validate_model_json


def make_classifier(net, num_classes: int, dropout: float = 0.2, final_power: float = 1.0):
    """Backbone + linear head; ``final_power`` below 1: the head reads the final features raised to it, sign kept (a
    feature-extraction head since 2026-12-06: engine/train/probe.py ``mapped``), 1: as they are (fine-tuning; older
    runs)."""
    import torch
    from torch import nn

    class FinalMap(nn.Module):
        """The features as the head reads them: the first ``final`` raised to ``power``, sign kept, the rest as they
        are. The same numbers as engine/train/probe.py's ``mapped``; the gradient at 0 is 0 (no NaN in a heatmap)."""

        def __init__(self, final: int, power: float) -> None:
            super().__init__()
            self.final, self.power = int(final), float(power)

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            if self.power == 1:
                return f
            head = f[:, : self.final]
            head = head.sign() * head.abs().clamp_min(1e-12).pow(self.power)
            return torch.cat([head, f[:, self.final :]], 1) if f.shape[1] > self.final else head

    class Classifier(nn.Module):
        """Images (already normalised) -> class logits."""

        def __init__(self, backbone: nn.Module, num_classes: int, dropout: float) -> None:
            super().__init__()
            self.backbone = backbone
            self.dropout = nn.Dropout(dropout)
            self.final_map = FinalMap(getattr(backbone, "final_dim", backbone.feature_dim), final_power)
            self.head = nn.Linear(backbone.feature_dim, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.dropout(self.final_map(self.backbone(x))))

        def classify(self, f: torch.Tensor) -> torch.Tensor:
            """Logits from the backbone's features (with the earlier layers' when the network computes them and
            the head does not read them: they come after the final ones)."""
            return self.head(self.final_map(f[:, : self.head.in_features]))

    return Classifier(net, num_classes, dropout)


@dataclass
class LoadedModel:
    model: object  # Classifier, in eval mode, on the CPU
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict
    run_dir: str

    @property
    def calibrated(self) -> bool:
        """Runs saved before calibration existed have no temperature: their probabilities are raw (T = 1)."""
        return "calibration" in self.meta

    @property
    def temperature(self) -> float:
        t = (self.meta.get("calibration") or {}).get("temperature", 1.0)
        return float(t) if isinstance(t, (int, float)) and t > 0 else 1.0

    @property
    def min_confidence(self) -> float:
        """Below this calibrated confidence a prediction is marked ``unsure`` (0: never)."""
        v = (self.meta.get("unsure") or {}).get("min_confidence", 0.0)
        return float(v) if isinstance(v, (int, float)) else 0.0

    @property
    def unfamiliar_threshold(self) -> float | None:
        v = (self.meta.get("unfamiliar") or {}).get("threshold")
        return float(v) if isinstance(v, (int, float)) else None

    def train_embeddings(self):
        """The training images' normalised embeddings ("unfamiliar" compares with them), or None for older runs or
        a missing/damaged file."""
        name = (self.meta.get("unfamiliar") or {}).get("embeddings")
        if not name or self.unfamiliar_threshold is None:
            return None
        try:
            from safetensors.numpy import load_file

            emb = load_file(os.path.join(self.run_dir, os.path.basename(name)))["embeddings"]
        except Exception:  # missing or damaged: predictions simply carry no "unfamiliar"
            return None
        dim = (self.meta.get("unfamiliar") or {}).get("dim", self.meta.get("feature_dim"))
        return emb.astype("float32") if emb.ndim == 2 and emb.shape[1] == dim else None

    @property
    def final_dim(self) -> int:
        """How many of the network's features are the final ones (the rest, if any, are earlier layers')."""
        return int((self.meta.get("depths") or {}).get("final_dim") or self.model.backbone.final_dim)

    @property
    def familiar_frozen_stages(self) -> int | None:
        """Set when "unfamiliar" compares the frozen stages' pooled output (fine-tuning), not the embedding."""
        v = (self.meta.get("unfamiliar") or {}).get("frozen_stages")
        return int(v) if isinstance(v, int) and v > 0 else None

    @property
    def familiar_pretrained(self) -> bool:
        """Set when "unfamiliar" compares the pretrained backbone's embeddings (fine-tuning runs since 2026-11-29)."""
        return (self.meta.get("unfamiliar") or {}).get("space") == "pretrained"


def load_model(run_dir: str) -> LoadedModel:
    """Load a run folder's model. Never unpickles; checks model.json and the weights' shapes before use."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(run_dir):
        raise EngineError(f"Run folder not found: {run_dir}")
    meta = read_json(os.path.join(run_dir, "model.json"))
    validate_model_json(meta, os.path.join(run_dir, "model.json"))
    weights = os.path.join(run_dir, "model.safetensors")
    if not os.path.isfile(weights):
        raise EngineError(f"{weights} is missing: this run folder is incomplete.")
    try:
        sd = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise EngineError(f"{weights} is damaged or not a safetensors file ({exc}).") from exc
    classes = list(meta["classes"])
    pre = Preprocessing.from_dict(meta["preprocessing"])
    net = build_architecture(meta["backbone"], pre)
    _depths(net, meta, weights)
    power = (meta.get("depths") or {}).get("final_power", 1.0)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power <= 1:
        raise EngineError(
            f"{weights} has a head that reads its final features raised to {power!r}, which this version of Transfer "
            "Studio does not know; update it or train the model again."
        )
    model = make_classifier(net, len(classes), final_power=power)
    head = sd.get("head.weight")
    if head is None or tuple(head.shape) != (len(classes), net.feature_dim):
        raise EngineError(
            f"{weights} does not match model.json: the head has shape "
            f"{None if head is None else tuple(head.shape)}, expected {(len(classes), net.feature_dim)}."
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise EngineError(
            f"{weights} does not match the '{meta['backbone']}' architecture: {str(exc).splitlines()[0][:300]}"
        ) from exc
    model.eval()
    return LoadedModel(model, classes, pre, meta, run_dir)


def _depths(net, meta: dict, where: str) -> None:
    """A head that reads the intermediate stages' features too: the network computes them (the same taps)."""
    from engine.network import depths

    d = meta.get("depths") or {}
    if not d.get("kept"):
        return
    version = depths.version_of(d.get("taps"))  # (runs saved with version 1's taps read those)
    net.with_taps(True, version)
    if version is None or not net.taps or depths.describe(depths.tap_widths(net), version) != d.get("taps"):
        raise EngineError(
            f"{where} reads features of the network's earlier layers that this version of Transfer Studio does not "
            "compute the same way; train the model again."
        )
