"""Tab settings in QSettings, by config field: each tab stores the TrainConfig fields it owns under ``train/``.

INI files give strings back; ``engine.config.value_from_text`` turns each into its field's type, so what a tab saves
is exactly what its ``values()`` gave (a round-trip test checks every field).
"""
from __future__ import annotations

from PySide6.QtCore import QSettings

from engine.config import TrainConfig, value_from_text

GROUP = "train"


def save_values(settings: QSettings, values: dict) -> None:
    for name, value in values.items():
        settings.setValue(f"{GROUP}/{name}", "" if value is None else str(value))


def load_values(settings: QSettings, names: list[str], cls=TrainConfig) -> dict:
    """The stored values of ``names`` (fields of ``cls``) that the settings hold."""
    out = {}
    for name in names:
        key = f"{GROUP}/{name}"
        if settings.contains(key):
            out[name] = value_from_text(cls, name, settings.value(key))
    return out
