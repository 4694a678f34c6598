"""Entry point: ``transfer-studio`` / ``python -m gui``."""

from __future__ import annotations

import multiprocessing
import os
import sys


def main(argv: list[str] | None = None) -> int:
    multiprocessing.freeze_support()  # first thing: DataLoader workers in a frozen app re-enter here
    argv = list(sys.argv if argv is None else argv)
    if sys.stdout is None:  # windowed frozen app: give print() somewhere harmless to go
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    if "--self-test" in argv:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        from gui.selftest import run_self_test

        return run_self_test()
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QIcon
    from PySide6.QtWidgets import QApplication

    QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
    app = QApplication(argv)
    app.setApplicationName("Transfer Studio")
    app.setOrganizationName("TransferStudio")
    from gui.main_window import MainWindow
    from gui.resources import resource_path

    icon = resource_path("icon.png")
    if os.path.exists(icon):
        app.setWindowIcon(QIcon(icon))
    win = MainWindow()
    win.show()
    folder = next((a for a in argv[1:] if os.path.isdir(a)), None)
    if folder:
        win.scan_folder(folder)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
