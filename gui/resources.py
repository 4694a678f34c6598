"""Find files in ``resources/`` both from a source checkout and inside a PyInstaller bundle."""

from __future__ import annotations

import os
import sys


def resource_dir() -> str:
    base = getattr(sys, "_MEIPASS", None)  # set by PyInstaller in a frozen app
    if base:
        return os.path.join(base, "resources")
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources")


def resource_path(name: str) -> str:
    return os.path.join(resource_dir(), name)
