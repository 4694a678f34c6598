"""Shared fixtures: synthetic image folders made in tmp_path, isolated caches, no leftover threads."""

from __future__ import annotations

import os
import threading

# Set before anything imports Qt or the engine: headless Qt, and caches/runs inside the test session only.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest

from tests.imagegen import make_flat_dataset


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(base / "embedding-cache"))
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(base / "runs-default"))
    monkeypatch.setenv("TORCH_HOME", str(base / "torch-home"))
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(base / "app-data"))  # never the user's hub cache, never the network
    yield


@pytest.fixture(autouse=True)
def _no_dangling_threads():
    """A test that leaves a worker thread running fails (such leftovers crash later tests, as napari found)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    import time

    deadline = time.time() + 5
    while time.time() < deadline:
        extra = [
            t
            for t in threading.enumerate()
            if t.ident not in before
            and t.is_alive()
            and not t.daemon
            and not t.name.startswith(("decode", "ThreadPoolExecutor"))
        ]
        if not extra:
            break
        time.sleep(0.05)
    assert not extra, f"threads left running: {[t.name for t in extra]}"


@pytest.fixture(scope="session")
def flat_data(tmp_path_factory):
    """3 visually distinct classes x 14 images, unsplit."""
    return make_flat_dataset(tmp_path_factory.mktemp("flat"), n_per_class=14)


@pytest.fixture(scope="session")
def fe_run(flat_data, tmp_path_factory):
    """A feature-extraction run trained once per session (several tests read it)."""
    from engine import TrainConfig, fit

    out = tmp_path_factory.mktemp("runs") / "fe"
    res = fit(
        TrainConfig(
            data=str(flat_data), out=str(out), epochs=30, seed=1, cache_dir=str(tmp_path_factory.mktemp("cache"))
        )
    )
    assert res.run_dir
    return res


@pytest.fixture
def power_kept(monkeypatch):
    """Feature extraction's head keeps the final features raised to the power wherever it is given one: on the small
    synthetic folders the power check ties (a tie reads them as they are: engine/train/probe.py ``_as_they_are``),
    and the tests that use this check what a run whose head reads the power does downstream."""
    from engine.train import probe

    check = probe._as_they_are

    def raised(r, chosen, X, stats, rows, y, folds, k, weights, fair, blocks, num_classes, power, *rest):
        got = check(r, chosen, X, stats, rows, y, folds, k, weights, fair, blocks, num_classes, power, *rest)
        return (r, power, {**got[2], "kept": power}) if got[2] is not None and got[1] != power else got

    monkeypatch.setattr(probe, "_as_they_are", raised)
