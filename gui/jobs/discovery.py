"""Start-up discovery: which backbones and devices this machine has (imports torch, so it runs as a job)."""

from __future__ import annotations

import os


def discover(callbacks=None, cancel=None):
    """Backbones and devices (imports torch: runs in the background so the window appears at once).

    The imports leave ~365,000 objects that Python's cyclic garbage collector would walk on every full collection:
    225-280 ms with the GIL held, in whichever thread triggered it (measured: gen-2 collections of 72-240 ms during
    these imports and of 248 ms in the GUI thread around a feature-extraction job). So the collector is off while
    importing, and what the imports left is then frozen (``gc.freeze``: never walked again, still freed when unused).
    """
    import gc

    gc.disable()
    try:
        return _discover()
    finally:
        gc.freeze()
        gc.enable()


def _discover():
    import torch

    from engine.network.backbones import list_backbones

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append((f"GPU {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(("Apple GPU (MPS)", "mps"))
    devices.append((f"CPU ({os.cpu_count()} cores)", "cpu"))
    backbones = list_backbones()
    # torch.optim imports torch._dynamo (and sympy) on its first step: ~2 s of imports that hold the GIL in long
    # stretches and stalled the GUI by ~120 ms at the start of every first training. Pay it here, at start-up.
    import torch._dynamo

    return backbones, devices
