"""Transfer Studio desktop app (PySide6). Thin: widgets and one worker adapter; all training logic is in ``engine``."""
