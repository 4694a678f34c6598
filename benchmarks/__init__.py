"""Benchmarks of the engine (``python -m benchmarks --help``); not part of the shipped package."""
