"""Running engine jobs from the window: the controller (one job per slot, cancel, results on the GUI thread),
the QThread worker, start-up discovery, and waiting on the real event loop (self-test and tools)."""
