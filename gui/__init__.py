"""Transfer Studio desktop app (PySide6). Thin: widgets and one worker adapter; all training logic is in ``engine``."""

import os

# Idle OpenMP threads sleep instead of spinning: with PyTorch's threads spinning on every core, the GUI thread
# waited up to ~225 ms for a core while training on 2 cores; passive waiting brought that to ~60 ms for ~7% less
# throughput (measured on hymenoptera). Must be set before torch is first imported; the CLI keeps the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Same reason for image decoding threads: on 2 cores, two decoding threads plus PyTorch left the GUI thread
# waiting ~115 ms while predicting 1,052 images; one thread brought the worst stall to 79-98 ms (measured).
if (os.cpu_count() or 2) <= 4:
    os.environ.setdefault("TRANSFER_STUDIO_DECODE_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))

import sys

# The job thread runs Python between PyTorch calls; each PySide call from the GUI thread releases the GIL and may
# wait a whole switch interval to get it back. 1 ms (default 5) keeps repaints short. Process-wide, so it is set
# here, where the app's other process-wide policies are, not by a window.
sys.setswitchinterval(0.001)
