"""The trained classifier (backbone + linear head), saved as safetensors and loaded back with validation."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .backbones import Preprocessing, build_architecture
from .events import EngineError
from .runs import read_json, validate_model_json


def make_classifier(net, num_classes: int, dropout: float = 0.2):
    import torch
    from torch import nn

    class Classifier(nn.Module):
        """Images (already normalised) -> class logits."""

        def __init__(self, backbone: nn.Module, num_classes: int, dropout: float) -> None:
            super().__init__()
            self.backbone = backbone
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(backbone.feature_dim, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.dropout(self.backbone(x)))

    return Classifier(net, num_classes, dropout)


@dataclass
class LoadedModel:
    model: object  # Classifier, in eval mode, on the CPU
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict
    run_dir: str


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
    model = make_classifier(net, len(classes))
    head = sd.get("head.weight")
    if head is None or tuple(head.shape) != (len(classes), net.feature_dim):
        raise EngineError(f"{weights} does not match model.json: the head has shape "
                          f"{None if head is None else tuple(head.shape)}, expected {(len(classes), net.feature_dim)}.")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise EngineError(f"{weights} does not match the '{meta['backbone']}' architecture: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    model.eval()
    return LoadedModel(model, classes, pre, meta, run_dir)
