"""Tab settings in QSettings, by config field: each tab stores the TrainConfig fields it owns under ``train/``.

INI files give strings back; ``engine.config.value_from_text`` turns each into its field's type, so what a tab saves
is exactly what its ``values()`` gave (a round-trip test checks every field).

Settings carry a format version. Before version 2 the window had no "auto" for the stages to unfreeze and the
backbone's learning rate, so every window saved its defaults then (3 stages, 0.1x) as if the user had chosen them;
read back as such they would keep small pictures from the recipe that fine-tunes them at their own size
(engine/train/fine_tuning/recipe.py). Those two old defaults are read as "auto"; any other stored value is the user's
and kept.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings

from engine.config import TrainConfig, value_from_text

GROUP = "train"
VERSION = 2
# values that a window of an older settings version saved as its defaults, read as the field's new default
OLD_DEFAULTS = {1: {"unfreeze": "3", "backbone_lr_mult": "0.1"}}


def stored_version(settings: QSettings) -> int:
    """The settings' format version: 1 for settings saved before versions existed."""
    try:
        return int(settings.value(f"{GROUP}/settings_version", 1))
    except (TypeError, ValueError):
        return 1


def save_values(settings: QSettings, values: dict) -> None:
    settings.setValue(f"{GROUP}/settings_version", VERSION)
    for name, value in values.items():
        settings.setValue(f"{GROUP}/{name}", "" if value is None else str(value))


def load_values(settings: QSettings, names: list[str], cls=TrainConfig) -> dict:
    """The stored values of ``names`` (fields of ``cls``) that the settings hold."""
    out = {}
    old = {
        k: v for version, olds in OLD_DEFAULTS.items() if stored_version(settings) <= version for k, v in olds.items()
    }
    for name in names:
        key = f"{GROUP}/{name}"
        if settings.contains(key) and not (name in old and str(settings.value(key)) == old[name]):
            out[name] = value_from_text(cls, name, settings.value(key))
    return out
