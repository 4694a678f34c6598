"""More from the frozen network: the head reads the earlier layers' features where they tell the classes apart, and
everything downstream (predict, evaluate, export, old runs and caches) follows what it chose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import TrainConfig, fit
from engine.train.logistic import solve
from tests.imagegen import make_flat_dataset, make_one_kind


@pytest.fixture(scope="module")
def grain(tmp_path_factory):
    """Two classes of grey noise that differ only in their grain (tests/imagegen.py, kind ``grain``)."""
    return make_one_kind(tmp_path_factory.mktemp("grain") / "data", "grain", 30, val_share=0.0)


@pytest.fixture(scope="module")
def grain_run(grain, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "grain"
    return fit(TrainConfig(data=str(grain), out=str(out), cache_dir=str(tmp_path_factory.mktemp("cache"))))


def test_the_head_keeps_the_earlier_layers_where_only_the_grain_tells_the_classes_apart(grain_run):
    d = grain_run.metrics["depths"]
    assert d["kept"] and d["comparison"]["kept"] == "final+depths"
    acc = d["comparison"]["accuracy"]
    assert acc["final+depths"] >= acc["final"] + 0.05  # out of fold: the earlier layers score clearly higher
    assert grain_run.metrics["val_accuracy"] == pytest.approx(acc["final+depths"])
    meta = json.loads((Path(grain_run.run_dir) / "model.json").read_text())
    assert meta["depths"]["kept"] and meta["head"]["in_features"] == meta["feature_dim"] == 1280 + 3072
    assert [t["stage"] for t in meta["depths"]["taps"]] == [2, 3, 4, 5, 6, 7]
    assert "earlier layers" in meta["depths"]["why"]


def test_photo_like_classes_keep_the_final_features_alone(tmp_path):
    """Shapes in colours the pretrained features separate at once: nothing to gain, the final features are kept."""
    data = make_flat_dataset(tmp_path / "flat", n_per_class=12)
    res = fit(TrainConfig(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c")))
    d = res.metrics["depths"]
    assert not d["kept"] and d["comparison"]["kept"] == "final"
    meta = json.loads((Path(res.run_dir) / "model.json").read_text())
    assert meta["head"]["in_features"] == 1280 and not meta["depths"]["kept"]
    assert res.metrics["val_accuracy"] >= 0.95


def test_a_run_that_reads_the_earlier_layers_predicts_evaluates_and_exports_the_same_probabilities(
    grain_run, grain, tmp_path
):
    import csv

    import torch

    from engine.config import EvaluateConfig, ExportConfig, PredictConfig
    from engine.network.model import load_model
    from engine.predict.evaluate import evaluate
    from engine.predict.export import export_model
    from engine.predict.predictions import predict_folder

    run = grain_run.run_dir
    pred = predict_folder(PredictConfig(run=run, images=[str(grain)], csv=str(tmp_path / "p.csv")))
    by_path = {r.path: np.array(r.probabilities) for r in pred.rows}
    with open(Path(run) / "val_predictions.csv", newline="") as f:
        saved = list(csv.DictReader(f))
    classes = grain_run.meta["classes"]
    # every labelled image was judged out of fold by a fold head; predict runs the saved head: same classes mostly,
    # and for the saved head itself (its own training images) probabilities agree with evaluate exactly
    ev = evaluate(EvaluateConfig(run=run, data=str(grain)))
    assert ev.metrics["accuracy"] == pytest.approx(
        np.mean([r.prediction == Path(r.path).parent.name for r in pred.rows])
    )
    assert len(saved) == len(by_path)
    loaded = load_model(run)
    assert loaded.model.backbone.taps and loaded.final_dim == 1280
    export_model(ExportConfig(run=run, format="onnx", out=str(tmp_path / "m.onnx")))
    ort = pytest.importorskip("onnxruntime")
    from engine.data.decode import decode_one

    paths = sorted(by_path)[:6]
    pre = loaded.preprocessing
    mean, std = pre.scale_255()
    x = np.stack([decode_one(p, pre, pre.size)[0].transpose(2, 0, 1) for p in paths]).astype(np.float32)
    x = (x - mean) / std
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    _, probs = sess.run(None, {"images": x})
    assert np.abs(probs - np.stack([by_path[p] for p in paths])).max() < 2e-3  # (the run's features: fp16 depths)
    with torch.inference_mode():
        logits = loaded.model(torch.from_numpy(x)).numpy()
    assert (logits.argmax(1) == probs.argmax(1)).all()
    assert set(classes) == {"fine", "coarse"}


def test_an_old_run_without_depths_and_an_old_cache_without_them_still_work(tmp_path):
    from engine.config import PredictConfig
    from engine.embed.cache import cache_contents
    from engine.predict.predictions import predict_folder

    data = make_flat_dataset(tmp_path / "flat", n_per_class=10)
    cache = tmp_path / "cache"
    old = fit(TrainConfig(data=str(data), out=str(tmp_path / "old"), cache_dir=str(cache), features="final"))
    # a run folder as versions before the depths wrote it: no "depths" in model.json or metrics.json
    for name in ("model.json", "metrics.json"):
        p = Path(old.run_dir) / name
        d = json.loads(p.read_text())
        d.pop("depths", None)
        p.write_text(json.dumps(d))
    rows = predict_folder(PredictConfig(run=old.run_dir, images=[str(data)], csv=str(tmp_path / "p.csv"))).rows
    assert len(rows) == 30 and all(r.status in ("ok", "unsure") for r in rows)
    # that run cached the final features only (as older versions did): the next run completes the cache once
    assert not list(cache.glob("*.depths2.safetensors"))
    new = fit(TrainConfig(data=str(data), out=str(tmp_path / "new"), cache_dir=str(cache)))
    assert new.metrics["embeddings_from_cache"] == 0 and list(cache.glob("*.depths2.safetensors"))
    again = fit(TrainConfig(data=str(data), out=str(tmp_path / "again"), cache_dir=str(cache)))
    assert again.metrics["embeddings_from_cache"] == 30 and "backbone not run" in again.metrics["device"]
    assert again.metrics["val_accuracy"] == new.metrics["val_accuracy"]
    assert 30 in [e["images"] for e in cache_contents(str(cache))]  # the cache counts its images as before


def test_a_run_saved_with_the_taps_before_grids_everywhere_still_predicts_what_it_did(grain, tmp_path, monkeypatch):
    """Runs saved with version 1's taps (groups 6-7 averaged over the whole picture) read those taps again: their
    network computes what their head was trained on, in PyTorch and through a graph made for them."""
    import shutil

    from engine.config import PredictConfig
    from engine.network import depths
    from engine.network.model import load_model
    from engine.paths import default_cache_dir
    from engine.predict.predictions import predict_folder

    with monkeypatch.context() as m:  # a program whose taps were version 1's
        m.setitem(depths.LAYOUTS, depths.VERSION, depths.LAYOUTS[1])
        old = fit(TrainConfig(data=str(grain), out=str(tmp_path / "old"), cache_dir=str(tmp_path / "c")))
        pred = predict_folder(PredictConfig(run=old.run_dir, images=[str(grain)], csv=str(tmp_path / "a.csv")))
    shutil.rmtree(tmp_path / "c")  # (and the graph it embedded with)
    taps = json.loads((Path(old.run_dir) / "model.json").read_text())["depths"]["taps"]
    assert [t["pool"] for t in taps] == ["2x2"] * 4 + ["mean"] * 2 and depths.version_of(taps) == 1
    loaded = load_model(old.run_dir)
    assert loaded.model.backbone.tap_version == 1 and loaded.model.backbone.feature_dim == 1280 + 1536
    again = predict_folder(PredictConfig(run=old.run_dir, images=[str(grain)], csv=str(tmp_path / "b.csv")))
    before = {r.path: r.probabilities for r in pred.rows}
    assert len(again.rows) == len(before) == 60
    assert max(np.abs(np.subtract(r.probabilities, before[r.path])).max() for r in again.rows) < 2e-3
    graphs = Path(default_cache_dir()) / "graphs"  # predicted through ONNX Runtime, with a graph of version 1's taps
    assert list(graphs.glob("*.taps1.fp32.onnx"))
    # this version's taps are a grid on every group
    assert depths.describe(depths.tap_widths(load_model(old.run_dir).model.backbone, 2))[-1] == {
        "stage": 7, "pool": "2x2", "dims": 1280,
    }  # fmt: skip


def test_the_exact_head_matches_scikit_learn_logistic_regression():
    """The solver reaches scikit-learn's answer for the same problem (C, unpenalised bias), several heads at once."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 20))
    y = np.repeat(np.arange(4), 40)
    X = (centres[y] + rng.normal(0, 1.5, (160, 20))).astype(np.float32)
    X -= X.mean(0)
    Cs = [0.01, 0.1, 1.0]
    s = solve(X, y, np.ones((160, 3), np.float32), np.array([1 / (c * 160) for c in Cs]), 4, tol=1e-6)
    assert s.converged.all()
    for h, c in enumerate(Cs):
        ref = sklearn.LogisticRegression(C=c, tol=1e-8, max_iter=5000).fit(X, y)
        assert np.abs(s.weight[h].T - ref.coef_).max() < 1e-3 * max(1.0, np.abs(ref.coef_).max())
        assert (((X @ s.weight[h]) + s.bias[h]).argmax(1) == ref.predict(X)).mean() == 1.0


def test_the_saved_head_reads_the_final_features_raised_to_its_power_in_predict_and_in_the_network(
    tmp_path, power_kept
):
    """The head is trained on the final features raised to a power (engine/train/probe.py ``mapped``): the saved
    model says so, and predict and the network itself give the probabilities of that head on those features (a path
    that forgot the power would still agree with the exported graph, not with this)."""
    import torch

    from engine.config import PredictConfig
    from engine.data.folder import scan
    from engine.events import Callbacks, CancelToken, EngineError
    from engine.network.model import load_model
    from engine.predict.predictions import predict_folder
    from engine.train.feature_extraction import embed_dataset
    from engine.train.probe import mapped
    from engine.trust.calibration import probabilities

    data = make_flat_dataset(tmp_path / "flat", n_per_class=10)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), features="final")
    res = fit(cfg)
    loaded = load_model(res.run_dir)
    power = loaded.meta["depths"]["final_power"]
    assert power < 1 and loaded.model.final_map.power == power
    ds = scan(str(data), val_split=0.0, test_split=0.0)
    emb = embed_dataset(cfg, ds, Callbacks(), CancelToken())
    w, b = (loaded.model.head.weight.detach().numpy(), loaded.model.head.bias.detach().numpy())

    def log_p(logits):  # (compared as log-probabilities: on these easy classes the probabilities are all near 0 or 1)
        return np.log(np.maximum(probabilities(logits, loaded.temperature), 1e-30))

    want = log_p(mapped(emb.final, 1280, power) @ w.T + b)
    assert np.abs(want - log_p(emb.final @ w.T + b)).max() > 1  # (the power matters to this head: the checks can fail)
    pred = predict_folder(PredictConfig(run=res.run_dir, images=[str(data)], csv=str(tmp_path / "p.csv")))
    got = {r.path: np.array(r.probabilities) for r in pred.rows}
    got = np.log(np.maximum(np.stack([got[s.path] for s in ds.samples]), 1e-30))
    assert np.abs(got - want).max() < 0.05
    with torch.inference_mode():
        assert np.abs(log_p(loaded.model.classify(torch.from_numpy(emb.final)).numpy()) - want).max() < 1e-3
    # a run saved by a later version whose head reads its features another way is refused, not misread
    p = Path(res.run_dir) / "model.json"
    meta = json.loads(p.read_text())
    meta["depths"]["final_power"] = "cube-root"
    p.write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="cube-root"):
        load_model(res.run_dir)


def _two_signals(n_per_class=100, seed=0):
    """Three classes, each told apart a little by the 'final' 20 columns and a little, independently, by the 'earlier'
    20: the head reading both does clearly better than the final columns alone."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    final = rng.normal(0, 1, (3, 20))[y] * 0.35 + rng.normal(0, 1, (len(y), 20))
    earlier = rng.normal(0, 1, (3, 20))[y] * 0.35 + rng.normal(0, 1, (len(y), 20))
    return np.concatenate([final, earlier], 1).astype(np.float32), y


@pytest.mark.parametrize("select_rows", [None, 120])
def test_the_saved_head_is_the_two_heads_logits_mixed_at_the_share_of_lowest_out_of_fold_loss(monkeypatch, select_rows):
    """With the earlier layers, the head mixes the final features' head and the earlier layers' head (each at its own
    C): the mix is one linear head, its out-of-fold judgements are the two heads' mixed the same way, and the share
    kept is the one of lowest mixed out-of-fold loss. Above ``SELECT_ROWS`` images (the share and the strengths
    chosen on a sample), the heads solved on every image are mixed at that share."""
    from engine.train import probe
    from engine.train.crossfit import fold_ids

    if select_rows:
        monkeypatch.setattr(probe, "SELECT_ROWS", select_rows)
    X, y = _two_signals()
    folds = fold_ids(y, [str(i) for i in range(len(y))], 0)
    kw = dict(k=5, extra={"final": np.ones(len(y), bool)}, seed=0)
    blocks = probe.Blocks([20, 20])
    p = probe.fit_probe(X, y, folds, 3, blocks, shares=(0.5,), **kw)
    assert p.features == probe.DEPTHS and p.share == 0.5 and p.columns == 40 and p.C_depths is not None
    c = p.comparison
    assert c["kept"] == probe.DEPTHS and c["difference"] > c["se"]
    a = probe.fit_probe(X, y, folds, 3, blocks, features="final", Cs=(p.C,), **kw)
    b = probe.fit_probe(X, y, folds, 3, blocks, features="depths", Cs=(p.C_depths,), **kw)

    def logits(h, cols):
        return X[:, :cols] @ h["weight"].T + h["bias"]

    # (within 5e-3: the solver stops within its tolerance, from another start on a path of strengths)
    mixed = 0.5 * logits(a.heads["final"], 20) + 0.5 * logits(b.heads["final"], 40)
    np.testing.assert_allclose(logits(p.heads["final"], 40), mixed, atol=5e-3)
    np.testing.assert_allclose(p.oof_logits, 0.5 * a.oof_logits + 0.5 * b.oof_logits, atol=5e-3)
    for fh, fa, fb in zip(p.fold_heads, a.fold_heads, b.fold_heads):
        np.testing.assert_allclose(logits(fh, 40), 0.5 * logits(fa, 20) + 0.5 * logits(fb, 40), atol=5e-3)
    full = probe.fit_probe(X, y, folds, 3, blocks, **kw)  # every share of probe.SHARES tried
    losses = {row["share"]: row["loss"] for row in full.comparison["shares"]}
    assert set(losses) == set(probe.SHARES) and full.share == min(losses, key=losses.get)


def test_the_final_features_alone_are_kept_when_no_mix_beats_them_by_a_standard_error():
    """Earlier columns of noise alone: whatever share mixes their head in, the out-of-fold loss is no clearly lower,
    and the head reads the final features alone."""
    from engine.train import probe
    from engine.train.crossfit import fold_ids

    X, y = _two_signals()
    X[:, 20:] = np.random.default_rng(1).normal(0, 1, (len(y), 20))
    folds = fold_ids(y, [str(i) for i in range(len(y))], 0)
    p = probe.fit_probe(X, y, folds, 3, probe.Blocks([20, 20]), k=5, extra={"final": np.ones(len(y), bool)})
    assert p.features == probe.FINAL and p.share == 0 and p.columns == 20 and p.C_depths is None
    assert p.heads["final"]["weight"].shape == (3, 20)


def test_the_results_tab_says_how_the_two_heads_were_mixed_and_what_it_was_worth():
    """metrics.json's ``depths`` for a mixed head carries the share and both strengths, and the Results tab's line
    says them with the out-of-fold evidence."""
    from engine.train import probe
    from engine.train.crossfit import fold_ids
    from engine.train.feature_extraction import depths_record
    from gui.tabs.results.summary import head_line

    X, y = _two_signals()
    folds = fold_ids(y, [str(i) for i in range(len(y))], 0)
    blocks = probe.Blocks([20, 20])
    p = probe.fit_probe(X, y, folds, 3, blocks, k=5, extra={"final": np.ones(len(y), bool)}, shares=(0.5,))
    d = json.loads(json.dumps(depths_record(p, blocks, None)))  # (as metrics.json keeps it)
    assert d["kept"] and d["share"] == 0.5 and d["C_depths"] == p.C_depths and d["comparison"]["share"] == 0.5
    line = head_line(d)
    assert "two heads mixed" in line and "50% of the logits" in line
    assert f"C {p.C:g}" in line and f"C {p.C_depths:g}" in line and f"{d['comparison']['images']} images" in line


@pytest.mark.parametrize("select_rows", [None, 150])
def test_the_final_features_are_raised_to_the_power_only_where_that_judges_clearly_better_out_of_fold(
    monkeypatch, select_rows
):
    """Where the classes are a straight line through the final features as they are (the sum of two features that
    span two orders of magnitude), the power bends that line: the head at the chosen C on the features as they are
    has the clearly lower out-of-fold loss, is kept, and says so (``power`` 1). Where the line runs through the
    features raised to the power, the power is kept; where they are noise (a tie), the features as they are.
    Above ``SELECT_ROWS`` images (checked on the sample) the heads on every image read them as they are."""
    from engine.train import probe
    from engine.train.crossfit import fold_ids

    if select_rows:
        monkeypatch.setattr(probe, "SELECT_ROWS", select_rows)

    rng = np.random.default_rng(0)
    X = np.exp(rng.uniform(-3, 2, (400, 20))).astype(np.float32)
    s = X[:, 0] + X[:, 1]
    y = (s > np.median(s)).astype(np.int64)
    folds = fold_ids(y, [str(i) for i in range(len(y))], 0)
    kw = dict(k=5, extra={"final": np.ones(len(y), bool)}, seed=0)
    Xm = probe.mapped(X, 20, 0.65)
    p = probe.fit_probe(Xm, y, folds, 2, probe.Blocks([20]), power=0.65, **kw)
    check = p.power_check
    assert p.power == 1 and check["kept"] == 1 and check["difference"] > (0 if select_rows else check["se"])
    assert "as they are" in p.summary()
    from engine.train.feature_extraction import depths_record
    from gui.tabs.results.summary import head_line

    d = json.loads(json.dumps(depths_record(p, probe.Blocks([20]), None)))  # (as model.json keeps it)
    assert d["final_power"] == 1 and d["power_check"]["kept"] == 1
    clearly = "read as they are, not raised to the power 0.65" in head_line(d)
    assert clearly == (check["difference"] > check["se"]) and "read as they are" in head_line(d)
    raw = probe.fit_probe(X, y, folds, 2, probe.Blocks([20]), Cs=(p.C,), **kw)  # (the same head, solved alone)
    h, r = p.heads["final"], raw.heads["final"]
    np.testing.assert_allclose(X @ h["weight"].T + h["bias"], X @ r["weight"].T + r["bias"], atol=5e-3)
    assert ((X @ h["weight"].T + h["bias"]).argmax(1) == y).mean() >= 0.95
    without = probe.fit_probe(Xm, y, folds, 2, probe.Blocks([20]), **kw)  # (no power given: nothing to check)
    assert without.power == 1 and without.power_check is None
    Xr = probe.mapped(np.exp(rng.uniform(-3, 2, (400, 20))).astype(np.float32), 20, 0.65)
    sr = Xr[:, :5].sum(1)  # (the classes a straight line through five features raised)
    yr = (sr > np.median(sr)).astype(np.int64)
    fr = fold_ids(yr, [str(i) for i in range(len(yr))], 0)
    q = probe.fit_probe(Xr, yr, fr, 2, probe.Blocks([20]), power=0.65, **kw)
    assert q.power == 0.65 and q.power_check["kept"] == 0.65 and q.power_check["difference"] < -q.power_check["se"]
    assert "raised to the power 0.65" in q.summary()
    noise = probe.mapped(np.exp(rng.uniform(-3, 2, (400, 20))).astype(np.float32), 20, 0.65)
    t = probe.fit_probe(noise, y, folds, 2, probe.Blocks([20]), power=0.65, **kw)
    tie = t.power_check
    assert t.power == 1 and tie["kept"] == 1 and abs(tie["difference"]) <= max(tie["se"], probe.MIN_LOSS_GAIN)
    d = json.loads(json.dumps(depths_record(t, probe.Blocks([20]), None)))
    assert "did not do clearly better" in head_line(d) and "loss after a temperature" in head_line(d)


def test_each_strength_is_judged_by_how_its_heads_rank_after_a_temperature_not_by_how_cautious_they_are():
    """Few labels, some of them wrong (15%), many weak features: the out-of-fold loss as it is rewards heads whose
    small logits hedge against the wrong labels, whatever they rank. Judged after each strength's own temperature
    (``scale``-free, as the saved head is calibrated afterwards), the chosen heads score higher on clean images
    over several folders, and the choice is the strength of lowest loss after a temperature among those tried."""
    from engine.train import probe
    from engine.train.crossfit import fold_ids
    from engine.trust.calibration import fit_temperature

    gains = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        means = rng.standard_normal((4, 200)) * 4 / np.sqrt(200)
        y, yt = np.repeat(np.arange(4), 20), np.repeat(np.arange(4), 500)
        X = (rng.standard_normal((80, 200)) + means[y]).astype(np.float32)
        Xt = (rng.standard_normal((2000, 200)) + means[yt]).astype(np.float32)
        noisy = y.copy()
        wrong = rng.random(80) < 0.15
        noisy[wrong] = rng.integers(0, 4, wrong.sum())
        folds = fold_ids(noisy, [str(i) for i in range(80)], 0)
        kw = dict(k=5, extra={"final": np.ones(80, bool)}, seed=0)
        accuracy = {}
        for scaled in (False, True):
            p = probe.fit_probe(X, noisy, folds, 4, probe.Blocks([200]), scaled=scaled, **kw)
            h = p.heads["final"]
            accuracy[scaled] = ((Xt @ h["weight"].T + h["bias"]).argmax(1) == yt).mean()
            if scaled:
                assert p.C == min(p.tried, key=lambda row: row["scaled loss"])["C"]
                # (the loss after the very temperature the saved head's calibration would fit without its prior)
                best = min(row["scaled loss"] for row in p.tried)
                t = fit_temperature(p.oof_logits, noisy, prior_sd=None)
                assert abs(best - probe.per_image_ce(p.oof_logits / t, noisy).mean()) < 1e-4
        gains.append(accuracy[True] - accuracy[False])
    assert np.mean(gains) > 0.01 and min(gains) > -0.005
