"""The head's feature spaces kept between runs (engine/embed/spaces.py): a rerun on the same features reads the kept
space and gets the very same heads; other features miss; a damaged file is computed again; clearing the cache
removes them. The heads a path solved are kept the same way, by the problem they solve."""

import numpy as np

from engine.embed import spaces
from engine.embed.cache import cache_contents, clear_cache
from engine.embed.spaces import SpaceStore
from engine.train.probe import Blocks, fit_probe


def _features(seed: int):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), 100)
    X = rng.standard_normal((300, 500)).astype(np.float32)
    X[:, :20] += y[:, None]  # the classes differ in a few final features
    return X, y


def _fit(X, y, store):
    folds = np.arange(len(y)) % 5
    store.paths = True  # (as a training run keeps them)
    p = fit_probe(X, y, folds, 3, Blocks([450, 50]), k=5, extra={"final": np.ones(len(y), bool)}, spaces=store)
    return p.heads["final"]


def test_a_rerun_reads_the_kept_space_and_gets_the_same_heads(tmp_path, monkeypatch):
    X, y = _features(0)
    first = _fit(X, y, SpaceStore(str(tmp_path)))
    files = spaces.kept_files(str(tmp_path))
    assert len(files) == 4  # the final features' space and the one with the earlier layers, and each one's path
    spaces._MEMORY.clear()  # a new process: only the files are left
    computed = []
    real = spaces.SpaceStore.put
    monkeypatch.setattr(spaces.SpaceStore, "put", lambda self, *a: computed.append(a) or real(self, *a))
    again = _fit(X, y, SpaceStore(str(tmp_path)))
    assert not computed  # both spaces read from the files
    assert np.array_equal(first["weight"], again["weight"]) and np.array_equal(first["bias"], again["bias"])
    X2 = X.copy()
    X2[0, 0] += 1.0  # one feature of one image changed: a new space, computed
    _fit(X2, y, SpaceStore(str(tmp_path)))
    assert len(computed) == 2
    spaces._MEMORY.clear()
    for f in spaces.kept_files(str(tmp_path)):
        with open(f, "wb") as fh:
            fh.write(b"damaged")
    computed.clear()
    assert np.allclose(_fit(X, y, SpaceStore(str(tmp_path)))["weight"], first["weight"], atol=1e-5)
    assert len(computed) == 2  # computed again, never read from a damaged file
    assert any(e["backbone"] == "(head spaces)" for e in cache_contents(str(tmp_path)))
    clear_cache(str(tmp_path))
    assert not spaces.kept_files(str(tmp_path))


def test_a_rerun_keeps_the_training_images_neighbour_distances_and_marks_the_same_images_unfamiliar(
    tmp_path, monkeypatch
):
    """ "Unfamiliar"'s threshold reads each training image's distance to its nearest other one, which depends on the
    features alone: a rerun on the same cached images reads it from the cache folder and saves the same block."""
    from engine import TrainConfig, fit
    from engine.train import fit as fit_module
    from tests.imagegen import make_flat_dataset

    data = make_flat_dataset(tmp_path / "flat", n_per_class=10)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), overwrite=True)
    first = fit(cfg).metrics["unfamiliar"]
    # the two feature sets' spaces, the final features' as they are (checked against raised to the power: the final
    # features alone were kept), each one's path, and the neighbour distances
    assert len(spaces.kept_files(str(tmp_path / "c"))) == 7
    spaces._MEMORY.clear()  # a new process: only the files are left
    calls = []
    real = fit_module.leave_one_out
    monkeypatch.setattr(fit_module, "leave_one_out", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = fit(cfg).metrics["unfamiliar"]
    assert not calls and again == first  # read, not searched again: the same threshold and flag rate
    for f in spaces.kept_files(str(tmp_path / "c")):  # damaged files are searched again, not read
        with open(f, "wb") as fh:
            fh.write(b"damaged")
    spaces._MEMORY.clear()
    assert fit(cfg).metrics["unfamiliar"] == first and calls == [1]


def test_a_rerun_of_the_same_problem_reads_each_strengths_heads_and_a_changed_label_solves_them_again(
    tmp_path, monkeypatch
):
    """The heads each strength solved are kept by a hash of everything the solve reads: the same features, labels
    and weights read them (no solve, the very same heads and choice); one label changed solves them all again, as a
    first run would."""
    from engine.train import probe

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 120)
    X = rng.standard_normal((360, 300)).astype(np.float32)
    X[:, :20] += y[:, None]
    X[:, 250:260] += 0.5 * y[:, None]
    folds = np.arange(len(y)) % 5
    solves = []
    real = probe.solve
    monkeypatch.setattr(probe, "solve", lambda *a, **k: solves.append(1) or real(*a, **k))

    def fit(labels, folder):
        return fit_probe(X, labels, folds, 3, Blocks([250, 50]), k=5, extra={"final": np.ones(len(y), bool)},
                         spaces=SpaceStore(str(folder), paths=True))  # fmt: skip

    first = fit(y, tmp_path / "c")
    assert len(solves) >= 4  # (both feature sets, two strengths or more each)
    spaces._MEMORY.clear()  # a new process: only the files are left
    solves.clear()
    again = fit(y, tmp_path / "c")
    assert not solves
    assert again.tried == first.tried and again.C == first.C and again.share == first.share
    assert np.array_equal(again.heads["final"]["weight"], first.heads["final"]["weight"])
    assert np.array_equal(again.oof_logits, first.oof_logits)
    moved = y.copy()
    moved[7] = (moved[7] + 1) % 3  # one image moved to another class
    changed = fit(moved, tmp_path / "c")
    assert len(solves) >= 4
    spaces._MEMORY.clear()
    fresh = fit(moved, tmp_path / "fresh")  # the same problem in an empty cache folder
    assert np.array_equal(changed.heads["final"]["weight"], fresh.heads["final"]["weight"])
