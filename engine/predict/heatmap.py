"""Where the model looked: a Grad-CAM heatmap (Selvaraju et al. 2017) of one image for one class.

A few lines of hooks on the backbone's last stage rather than a library (grad-cam, torchcam): the backbone's stages
are already named (``FeatureNet.stages``), both training modes save the same classifier, and the method is the
gradient of the class score, averaged per channel, weighting that stage's feature maps (a head that reads the
earlier layers' features too is explained at every stage it reads: :func:`explained_layers`). It runs as an
engine job (the window runs it in the background); the fine-tuned or feature-extraction model is explained as saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import option
from engine.data.decode import decode_one
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, Progress
from engine.network.device import resolve_device
from engine.network.model import load_model
from engine.trust.calibration import probabilities


@dataclass
class HeatmapConfig:
    """One image of a run, explained for ``target`` (default: the predicted class)."""

    run: str = option("", "run folder", positional=True)
    image: str = option("", "image file", positional=True)
    target: str | None = option(None, "class to explain (default: the predicted one)", parse=str)
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")


@dataclass
class HeatmapResult:
    path: str
    target: str  # the class explained
    prediction: str
    confidence: float  # calibrated, of the prediction
    image: np.ndarray | None  # (S, S, 3) uint8: the image as the network saw it
    heat: np.ndarray | None  # (S, S) float32 in [0, 1]
    cancelled: bool = False


def grad_cam(model, x, target: int, layers: list, method: str = "grad-cam") -> list[np.ndarray]:
    """Class-activation maps of ``model`` (images -> logits) for class ``target`` at each of ``layers``: (h, w)
    float32 each, not normalised. ``grad-cam`` weighs each channel by its mean gradient (Selvaraju et al. 2017);
    ``layer-cam`` weighs each position by its own positive gradient (Jiang et al. 2021), which stays on the object
    at the early, high-resolution stages where Grad-CAM's channel means do not."""
    import torch

    store: dict = {}

    def keeper(i):
        def keep(module, inputs, output):
            store[("act", i)] = output
            output.register_hook(lambda g: store.__setitem__(("grad", i), g))

        return keep

    handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(True)
            logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        for handle in handles:
            handle.remove()
    cams = []
    for i in range(len(layers)):
        act, grad = store.get(("act", i)), store.get(("grad", i))
        if act is None or grad is None or act.dim() != 4:
            raise EngineError(
                "Heatmaps need a backbone whose last stage makes a spatial feature map (a convolutional "
                "network); this one does not."
            )
        weights = grad.mean(dim=(2, 3), keepdim=True) if method == "grad-cam" else torch.relu(grad)
        cams.append(torch.relu((weights * act).sum(1))[0].detach().float().cpu().numpy())
    return cams


def explained_layers(net) -> tuple[list, str]:
    """The layers whose maps the heatmap weighs, and how. A head on the final features: the last stage's, by
    Grad-CAM. A head that also reads earlier layers' features: every tapped stage's and the last one's, by Layer-CAM,
    averaged (each path to the class score is seen where it leaves the network; Grad-CAM at the earliest tapped stage
    put a plain square's heat in a corner of the picture)."""
    stages = net.stages()
    if getattr(net, "taps", False):
        from engine.network.depths import LAYOUTS

        return [stages[group][-1] for group, _ in LAYOUTS[net.tap_version]] + [stages[-1][-1]], "layer-cam"
    return [stages[-1][-1]], "grad-cam"


def _fused(cams: list[np.ndarray], size: int) -> np.ndarray:
    """The maps upsampled to ``size``, each scaled to a maximum of 1, averaged, and scaled to a maximum of 1."""
    import torch
    import torch.nn.functional as F

    total = np.zeros((size, size), np.float32)
    for cam in cams:
        heat = F.interpolate(torch.from_numpy(cam)[None, None], size=(size, size), mode="bilinear", align_corners=False)
        heat = heat[0, 0].numpy()
        total += heat / heat.max() if heat.max() > 0 else heat
    return total / total.max() if total.max() > 0 else total


def heatmap(
    config: HeatmapConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None
) -> HeatmapResult:
    import torch

    cb = callbacks or Callbacks()
    cancel = cancel or CancelToken()
    try:
        loaded = load_model(config.run)
        cancel.raise_if_cancelled()
        pre = loaded.preprocessing
        arr, err = decode_one(config.image, pre, pre.size)
        if arr is None:
            raise EngineError(f"Cannot read {config.image}: {err}")
        cb.on_progress(Progress(Phase.PREDICTING, 0, 1))
        device = resolve_device(config.device)
        model = loaded.model.to(device).eval()
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float().to(device)
        mean, std = (torch.from_numpy(v).to(device) for v in pre.scale_255())
        x = (x - mean) / std
        with torch.inference_mode():
            probs = probabilities(model(x).float().cpu().numpy(), loaded.temperature)[0]
        pred = int(probs.argmax())
        if config.target is not None and config.target not in loaded.classes:
            raise EngineError(f"'{config.target}' is not one of this model's classes: {', '.join(loaded.classes)}.")
        target = loaded.classes.index(config.target) if config.target else pred
        cancel.raise_if_cancelled()
        layers, method = explained_layers(model.backbone)
        heat = _fused(grad_cam(model, x, target, layers, method), pre.size)
    except Cancelled:
        return HeatmapResult(config.image, "", "", 0.0, None, None, cancelled=True)
    finally:
        if "loaded" in locals():
            loaded.model.to("cpu")
    cb.on_progress(Progress(Phase.PREDICTING, 1, 1))
    return HeatmapResult(
        config.image, loaded.classes[target], loaded.classes[pred], float(probs[pred]), arr, heat.astype(np.float32)
    )
