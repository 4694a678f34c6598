"""Widgets bound both ways to a session field, two lines a control (napari's ``connect_setattr`` and a setter back).

The widget shows the field's value now and whenever it changes; a user's edit sets the field. Code reads the
session, never a widget. Each helper takes how the widget's value maps to the field's (``to_field``) and back
(``to_widget``), for the few fields a widget shows in other units (percent, "0 = auto").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit

from gui.session.state import Session


def _both_ways(session: Session, name: str, show: Callable[[Any], None], edited, read: Callable[[], Any]) -> None:
    """Show the field now and on change (without echoing the edit back); set the field on the widget's edits."""
    guard = {"on": False}

    def from_field(changed: str, value: Any) -> None:
        if changed == name and not guard["on"]:
            guard["on"] = True
            try:
                show(value)
            finally:
                guard["on"] = False

    def from_widget(*_args: Any) -> None:
        if not guard["on"]:
            guard["on"] = True
            try:
                session.set(name, read())
            finally:
                guard["on"] = False

    show(session.get(name))
    session.changed.connect(from_field)
    edited.connect(from_widget)


def bind_spin(
    session: Session,
    name: str,
    spin: QAbstractSpinBox,
    to_field: Callable[[float], Any] = lambda v: v,
    to_widget: Callable[[Any], float] = lambda v: v,
) -> None:
    """A spin box (``QSpinBox``/``QDoubleSpinBox``)."""
    _both_ways(session, name, lambda v: spin.setValue(to_widget(v)), spin.valueChanged, lambda: to_field(spin.value()))


def bind_check(
    session: Session,
    name: str,
    box: QAbstractButton,
    to_field: Callable[[bool], Any] = bool,
    to_widget: Callable[[Any], bool] = bool,
) -> None:
    """A check box or radio button."""
    _both_ways(session, name, lambda v: box.setChecked(to_widget(v)), box.toggled, lambda: to_field(box.isChecked()))


def bind_combo(session: Session, name: str, combo: QComboBox) -> None:
    """A combo box whose items carry the field's values as their data."""
    _both_ways(
        session, name, lambda v: combo.setCurrentIndex(max(0, combo.findData(v))), combo.currentIndexChanged,
        combo.currentData,
    )  # fmt: skip


def bind_text(session: Session, name: str, line: QLineEdit) -> None:
    """A line edit for an optional path or name ("" is None)."""
    _both_ways(session, name, lambda v: line.setText(v or ""), line.textChanged, lambda: line.text().strip() or None)


def none_if_zero(v: float) -> Any:
    """Spin boxes show "auto" at 0 for fields that are None by default."""
    return v or None


def zero_if_none(v: Any) -> float:
    return v or 0
