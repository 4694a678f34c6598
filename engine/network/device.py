"""Where a job runs and how: the device, its label, the mixed-precision policy, and out-of-memory detection.

torch is imported inside the functions: ``import engine`` must stay cheap, and a feature-extraction rerun from
cached embeddings never imports torch at all (engine/train/head.py).
"""

from __future__ import annotations

import platform
import sys
import threading

from engine.events import EngineError


def resolve_device(name: str = "auto"):
    """A ``torch.device`` for auto/cpu/cuda/cuda:N/mps; a clear error when the asked-for one is not here."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("CUDA was requested but no CUDA GPU is available here. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EngineError("MPS was requested but is not available here. Use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise EngineError(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.") from exc


def device_label(device) -> str:
    """What metrics.json and the log say about the device (the GPU's name, or the CPU and its threads)."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def amp_dtype(device):
    """The one mixed-precision policy: bfloat16 on CUDA GPUs that have it, float16 on older ones, none elsewhere
    (CPU autocast is slower than fp32 for these convolutions; MPS support varies)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def grad_scaler(device):
    """A gradient scaler where the policy trains in float16 (bfloat16 and fp32 need none)."""
    import torch

    return torch.amp.GradScaler("cuda") if amp_dtype(device) is torch.float16 else None


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def warm_optimizer_imports() -> None:
    """torch.optim's first step imports torch._dynamo (~2 s here); do that in the background while we scan/embed."""
    if "torch._dynamo" not in sys.modules:
        threading.Thread(target=lambda: __import__("torch._dynamo"), name="warm-imports", daemon=True).start()
