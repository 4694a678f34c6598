"""Where the app keeps its files on this machine: the one place that knows each platform's folders.

Each has an environment override (the tests point them at a temporary folder): ``TRANSFER_STUDIO_CACHE`` (the
embedding cache), ``TRANSFER_STUDIO_DATA`` (exclude lists, the move journal, measured speeds) and
``TRANSFER_STUDIO_RUNS`` (runs the user did not place). The folders themselves are what earlier versions used, so
nothing a user has is left behind.
"""

from __future__ import annotations

import os


def _home(*parts: str) -> str:
    return os.path.join(os.path.expanduser("~"), *parts)


def _platform_base(kind: str) -> str:
    """The platform's folder for ``kind`` ("cache" or "data"): %LOCALAPPDATA% on Windows, else the XDG folder."""
    if os.name == "nt":
        return os.environ.get("LOCALAPPDATA", _home())
    if kind == "cache":
        return os.environ.get("XDG_CACHE_HOME", _home(".cache"))
    return os.environ.get("XDG_DATA_HOME", _home(".local", "share"))


def default_cache_dir() -> str:
    """The embedding cache (and the ONNX graphs, layout and detail thumbnails beside it)."""
    return os.environ.get("TRANSFER_STUDIO_CACHE") or os.path.join(
        _platform_base("cache"), "transfer-studio", "embeddings"
    )


def app_data_dir() -> str:
    """The app's own files: exclude lists, the move journal, measured speeds."""
    env = os.environ.get("TRANSFER_STUDIO_DATA")
    if env:
        return env
    return os.path.join(_platform_base("data"), "Transfer Studio" if os.name == "nt" else "transfer-studio")


def default_runs_dir() -> str:
    """Where runs go when the user does not say: ``~/Documents/Transfer Studio/runs``, else the data folder's
    parent on this platform (``~/.local/share``)."""
    env = os.environ.get("TRANSFER_STUDIO_RUNS")
    if env:
        return env
    docs = _home("Documents")
    return os.path.join(docs if os.path.isdir(docs) else _home(".local", "share"), "Transfer Studio", "runs")
