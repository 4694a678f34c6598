"""The Label tab's keys: number keys label the selected pictures (0: not a class), S skips, Ctrl+Z undoes,
anywhere in the tab, except while a class name is being typed."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence, QShortcut


def install_shortcuts(tab) -> list[QShortcut]:
    """The tab's shortcuts (kept by the tab: a shortcut without a reference is collected)."""
    out = []

    def typing() -> bool:
        return tab.new_class.hasFocus()  # (the name field keeps the focus after Enter, for the next name)

    def number(n: int):
        def pressed() -> None:
            if typing():
                return
            if n == 0:
                tab.mark_not_a_class()
            elif n <= len(tab.classes):
                tab.assign(tab.classes[n - 1])

        return pressed

    def skip() -> None:
        if not typing():
            tab.skip()

    for n in range(10):
        sc = QShortcut(QKeySequence(str(n)), tab, context=Qt.WidgetWithChildrenShortcut)
        sc.activated.connect(number(n))
        out.append(sc)
    for key, slot in (("S", skip), (QKeySequence.Undo, tab.undo)):
        sc = QShortcut(QKeySequence(key), tab, context=Qt.WidgetWithChildrenShortcut)
        sc.activated.connect(slot)
        out.append(sc)
    return out
