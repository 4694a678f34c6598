"""Train > Embedding cache…: what the cache holds, and deleting it after asking."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox

from engine.embed.cache import cache_contents, clear_cache
from engine.paths import default_cache_dir


def manage_embedding_cache(window, busy: bool) -> int | None:
    """Say what the embedding cache holds and offer to delete it; returns the bytes freed (None: kept).
    ``window`` gives ``confirm``, ``show_error`` and ``status_label``; nothing is deleted while a job runs."""
    folder = default_cache_dir()
    entries = cache_contents(folder)
    if not entries:
        QMessageBox.information(window, "Embedding cache", f"The embedding cache in {folder} is empty.")
        return None
    images = sum(e["images"] or 0 for e in entries if e["key"] != "-")  # (not the thumbnails, graphs, index)
    mb = sum(e["bytes"] for e in entries) / 1e6
    if busy:
        window.show_error("A job is running: stop it before deleting the embedding cache.")
        return None
    if not window.confirm(
        "Embedding cache",
        f"{folder} holds the features of {images} image(s) for {len(entries)} backbone "
        f"setting(s): {mb:.1f} MB. Feature extraction reuses them to skip the backbone on "
        "images it has seen. Delete them? (Runs are not touched; the next run embeds its "
        "images again.)",
    ):
        return None
    freed = clear_cache(folder)
    window.status_label.setText(f"Deleted {freed / 1e6:.1f} MB of cached embeddings")
    return freed
