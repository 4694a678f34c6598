"""The one batched forward pass: uint8 images in, features or logits out.

Embedding (feature extraction), fine-tuning's validation and linear-probe start, predict and evaluate all run the
network through :class:`Forward`, so normalisation, memory format, the mixed-precision policy and batching are
written once. It is the seam for another backend (only PyTorch today); logits become probabilities in
``head.probabilities``.
"""

from __future__ import annotations

import copy

from engine.events import CancelToken
from engine.network.backbones import Preprocessing, fold_batchnorm
from engine.network.device import amp_dtype
from engine.network.model import make_classifier


def pick_batch_size(device) -> int:
    # Small batches keep a 2-core CPU's caches warm (measured on 2 cores: batch 4 ~42 img/s, 16 ~32 img/s); GPUs
    # want big ones.
    return 4 if device.type == "cpu" else 128


class Forward:
    """Runs ``net`` on uint8 (N,3,S,S) batches from any device: to ``device``, float, resized to the network's
    input size if needed, normalised, channels_last, under the device's autocast policy; float32 out."""

    backend = "torch"

    def __init__(self, net, pre: Preprocessing, device, batch_size: int | None = None) -> None:
        import torch

        self.net, self.pre, self.device = net, pre, device
        self.amp = amp_dtype(device)
        self.batch_size = batch_size or pick_batch_size(device)
        self.mean, self.std = (torch.from_numpy(v).to(device) for v in pre.scale_255())

    @classmethod
    def frozen(cls, net, pre: Preprocessing, device, batch_size: int | None = None) -> Forward:
        """For a network that only infers (a backbone, or a classifier: backbone + head): a copy with BatchNorm
        folded into its convolutions (about 20% faster on a 2-core CPU, same outputs to 1e-6), on ``device``,
        channels_last. ``net`` itself is left as it was."""
        import torch

        if hasattr(net, "head"):
            folded = make_classifier(fold_batchnorm(net.backbone), net.head.out_features)
            folded.head, folded.final_map = copy.deepcopy(net.head), copy.deepcopy(net.final_map)
        else:
            folded = fold_batchnorm(net)
        net = folded.eval().to(device)
        if device.type != "mps":
            net = net.to(memory_format=torch.channels_last)
        return cls(net, pre, device, batch_size)

    def normalise(self, x):
        """A float batch on the device at the input size (values 0-255) -> the network's input."""
        import torch

        x = x.sub_(self.mean).div_(self.std)
        if self.device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, u8):
        import torch.nn.functional as F

        x = u8.to(self.device, non_blocking=True).float()
        if x.shape[-1] != self.pre.size:
            x = F.interpolate(
                x, size=(self.pre.size, self.pre.size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.normalise(x)

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def __call__(self, u8, module=None):
        """Outputs of ``module`` (default: the whole net) for one batch, float32 on the device. The caller
        holds ``torch.inference_mode()`` (thread-local: entered in the job's own thread)."""
        with self.autocast():
            return (module or self.net)(self.prepare(u8)).float()

    def map(self, u8_all, cancel: CancelToken | None = None, module=None):
        """Outputs for a whole uint8 tensor, in batches; checks ``cancel`` between batches."""
        import torch

        self.net.eval()  # (a training loop sets its own modes again at the start of each epoch)
        outs = []
        with torch.inference_mode():
            for s in range(0, len(u8_all), self.batch_size):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                outs.append(self(u8_all[s : s + self.batch_size], module))
        return torch.cat(outs) if outs else torch.zeros(0, device=self.device)
