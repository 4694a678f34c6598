"""--mode auto: feature extraction, then fine-tuning from its head within a budget; the lower validation loss wins."""

from __future__ import annotations

import json
import os

from engine import TrainConfig, fit
from engine.events import Callbacks, CancelToken, EpochMetrics
from engine.network.model import load_model
from engine.runs import read_metrics
from engine.train.auto import FE, FT, BudgetToken, Race, projected_loss


class Log(Callbacks):
    def __init__(self):
        self.lines, self.epochs = [], []

    def on_log(self, m):
        self.lines.append(m)

    def on_train_epoch_end(self, m):
        self.epochs.append(m)


def _metrics(run):
    """What the app reads when it reopens a run; metrics.json itself is written once, without the auto block."""
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        assert "auto" not in json.load(f)
    return read_metrics(run)


def test_auto_keeps_feature_extraction_where_the_features_already_separate_the_classes(flat_data, tmp_path, power_kept):
    out = tmp_path / "auto"
    log = Log()
    # (small_images off: at the backbone's input size fine-tuning starts from feature extraction's head; small
    # pictures fine-tune at 128 px from a probe of their own, as the pairs test below does)
    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(out),
            mode="auto",
            seed=1,
            cache_dir=str(tmp_path / "c"),
            small_images="off",
            val_split=0.5,  # (21 validation images: enough for the two to be compared at all)
        ),
        log,
    )
    assert res.run_dir == str(out) and not res.cancelled
    block = res.metrics["auto"]
    assert block["winner"] == FE and block["this_run"] == FE
    other = block["runs"][FT]["run"]
    assert other == f"{out}-{FT}" and _metrics(other)["auto"]["this_run"] == FT  # both runs kept, both say so
    # what the job hands on in memory is what the folder shows when reopened; a run the race stopped is complete
    assert _metrics(str(out))["auto"] == block and _metrics(str(out))["val_accuracy"] == res.metrics["val_accuracy"]
    assert (_metrics(other)["status"], _metrics(other).get("stopped_early")) == ("completed", block["stopped"])
    assert block["runs"][FE]["val_loss"] <= block["runs"][FT]["val_loss"]  # a tie keeps the cheaper one
    # fine-tuning starts from a probe of its own (feature extraction's head reads the final features raised to a power,
    # which fine-tuning's network does not pass on), and the log says why
    text = "\n".join(log.lines)
    assert "Fine-tuning starts from its own linear probe on the training split" in text
    assert _metrics(str(out))["depths"]["final_power"] < 1
    # both halves' epochs were reported, tagged, on one clock
    fe_epochs = [m for m in log.epochs if m.strategy == FE]
    ft_epochs = [m for m in log.epochs if m.strategy == FT]
    assert fe_epochs and ft_epochs and max(m.elapsed for m in fe_epochs) <= min(m.elapsed for m in ft_epochs)
    diff = block["fine_tuning_minus_feature_extraction"]
    # feature extraction was cross-fitted (every labelled image judged out of fold); the two are compared on the
    # images fine-tuning validated on, out of sample for both, and the verdict says so
    assert res.metrics["validation"]["method"] == "cross-validated" and res.metrics["val_n"] == 42
    assert diff["ci95"][0] <= diff["val_accuracy"] <= diff["ci95"][1] and diff["n"] == _metrics(other)["val_n"] < 42
    assert "Feature extraction was kept" in res.message and "out of sample for both" in res.message
    for run in (str(out), other):
        assert load_model(run).classes == ["circles", "squares", "stripes"]


def test_the_budget_stops_fine_tuning_and_feature_extraction_is_kept(flat_data, tmp_path):
    out = tmp_path / "auto"
    res = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(out),
            mode="auto",
            budget=0.001,
            seed=1,
            cache_dir=str(tmp_path / "c"),
            val_split=0.5,
        )  # fmt: skip
    )
    assert res.run_dir == str(out) and not res.cancelled
    block = res.metrics["auto"]
    assert block["winner"] == FE and block["stopped"] == "the time budget ran out"
    assert "stopped before its first epoch ended" in block["why"] and "larger time budget" in block["why"]
    assert FT not in block["runs"] and not os.path.exists(f"{out}-{FT}")


def test_a_cancel_during_fine_tuning_keeps_both_halves_done_so_far(flat_data, tmp_path):
    class CancelAfterFirstFineTuningEpoch(Log):
        def __init__(self, token):
            super().__init__()
            self.token = token

        def on_train_epoch_end(self, m):
            super().on_train_epoch_end(m)
            if m.strategy == FT:
                self.token.cancel()

    token = CancelToken()
    out = tmp_path / "auto"
    res = fit(
        TrainConfig(
            data=str(flat_data), out=str(out), mode="auto", seed=1, cache_dir=str(tmp_path / "c"), val_split=0.5
        ),
        CancelAfterFirstFineTuningEpoch(token),
        token,
    )
    assert res.cancelled and res.run_dir
    runs = res.metrics["auto"]["runs"]
    assert set(runs) == {FE, FT} and runs[FT]["epochs_run"] == 1
    assert _metrics(runs[FT]["run"])["status"] == "cancelled"  # the user's stop, not the race's
    assert all(os.path.exists(os.path.join(r["run"], "model.safetensors")) for r in runs.values())


def test_a_cancel_during_feature_extraction_saves_nothing_and_skips_fine_tuning(flat_data, tmp_path):
    class CancelAtOnce(Log):
        def on_train_epoch_end(self, m):
            token.cancel()

    token = CancelToken()
    res = fit(
        TrainConfig(data=str(flat_data), out=str(tmp_path / "auto"), mode="auto", cache_dir=str(tmp_path / "c")),
        CancelAtOnce(),
        token,
    )
    assert res.cancelled and res.run_dir is None
    assert not any(p.name.startswith("auto") for p in tmp_path.iterdir())


def _epoch(n, loss, seconds=10.0):
    return EpochMetrics(n, 5, loss, 0.5, loss, 0.5, 1e-3, seconds, 10.0, False)


def test_the_race_stops_fine_tuning_only_when_even_a_straight_line_cannot_reach_feature_extraction():
    assert abs(projected_loss([0.5, 0.9, 0.85], 3) - (0.85 - 0.05 * 3)) < 1e-12
    # a worse epoch is a swing, not a trend: from the best so far, by the largest swing (pairs folder, epochs 1-2)
    assert abs(projected_loss([0.355, 0.389, 0.478], 3) - (0.389 - 0.089 * 3)) < 1e-12
    slow = BudgetToken(CancelToken(), None)
    race = Race(Callbacks(), slow, fe_loss=0.5, epochs=5, t0=0.0)
    race.on_train_epoch_end(_epoch(1, 0.9))
    assert not slow.cancelled  # one epoch is too few to extrapolate from
    race.on_train_epoch_end(_epoch(2, 0.85))  # 0.85 - 3 x 0.05 = 0.70 > 0.5
    assert slow.cancelled and "would stay above feature extraction's" in slow.reason
    fast = BudgetToken(CancelToken(), None)
    race = Race(Callbacks(), fast, fe_loss=0.5, epochs=5, t0=0.0)
    race.on_train_epoch_end(_epoch(1, 0.9))
    race.on_train_epoch_end(_epoch(2, 0.7))  # 0.7 - 3 x 0.2 = 0.1 < 0.5: keep going
    assert not fast.cancelled
    swing = BudgetToken(CancelToken(), None)
    race = Race(Callbacks(), swing, fe_loss=0.355, epochs=5, t0=0.0)
    race.on_train_epoch_end(_epoch(1, 0.389))
    race.on_train_epoch_end(_epoch(2, 0.478))  # 0.389 - 3 x 0.089 = 0.122 < 0.355: epochs 3-4 may still win
    assert not swing.cancelled
    user = CancelToken()
    token = BudgetToken(user, None)
    user.cancel()
    assert token.cancelled and token.reason == ""  # the user's cancel is not the race's
    # its last planned epoch: it ends by itself, and the app must not say it was stopped
    done = BudgetToken(CancelToken(), None)
    race = Race(Callbacks(), done, fe_loss=0.5, epochs=2, t0=0.0)
    race.on_train_epoch_end(_epoch(1, 0.9))
    race.on_train_epoch_end(_epoch(2, 0.85))
    assert not done.cancelled and done.reason == ""
    # a budget with no room for another epoch: stopped, and said so in those words
    import time

    tight = BudgetToken(CancelToken(), time.perf_counter() + 5.0)
    race = Race(Callbacks(), tight, fe_loss=0.5, epochs=5, t0=0.0)
    race.on_train_epoch_end(_epoch(1, 0.9, seconds=60.0))
    race.on_train_epoch_end(_epoch(2, 0.85, seconds=60.0))
    assert tight.cancelled and "no time left in the budget for another epoch" in tight.reason


def test_the_summary_never_says_minus_zero_points():
    from engine.train.auto import summary

    runs = {FT: {"val_accuracy": 1.0, "val_loss": 0.0075}, FE: {"val_accuracy": 1.0, "val_loss": 0.0006}}
    text = summary(FE, runs, 0.0, (0.0, 0.0), 32)
    assert "(+0.0 points, 95% interval +0.0 to +0.0, 32 images)" in text and "-0.0" not in text
    assert "(+6.7 points, 95% interval +4.1 to +9.3, 500 images)" in summary(FT, runs, 0.067, (0.041, 0.093), 500)
    assert "(-6.7 points, 95% interval -9.3 to -4.1" in summary(FE, runs, 0.067, (0.041, 0.093), 500)


def test_fine_tuning_runs_the_frozen_stages_once_and_its_model_reproduces_the_validation_probabilities(
    flat_data, tmp_path
):
    """The cached path trains only the last stages on the frozen stages' outputs; the saved model, run on the whole
    images by predict, must give the validation probabilities fine-tuning recorded (val_predictions.csv)."""
    import csv

    from engine.config import PredictConfig
    from engine.predict.predictions import predict_folder

    log = Log()
    run = fit(
        TrainConfig(
            data=str(flat_data),
            out=str(tmp_path / "ft"),
            mode="fine-tuning",
            epochs=2,
            batch_size=8,
            unfreeze=2,
            seed=3,
        ),
        log,
    )
    assert any("Ran the frozen stages once over" in m for m in log.lines)
    assert any("The frozen stages run through ONNX Runtime (fp32)" in m for m in log.lines)  # the CPU's fast path
    assert any("BatchNorm statistics frozen" in m for m in log.lines)
    with open(os.path.join(run.run_dir, "val_predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    classes = run.metrics["classes"]
    res = predict_folder(PredictConfig(run.run_dir, [r["path"] for r in rows], engine="torch"))
    got = {r.path: r.probabilities for r in res.rows}
    for r in rows:
        want = [float(r[f"p_{c}"]) for c in classes]
        assert max(abs(a - b) for a, b in zip(got[r["path"]], want)) < 1e-4


def test_auto_picks_fine_tuning_where_frozen_features_cannot_compare_two_objects(tmp_path):
    """Matching pairs of discs against mixed pairs: frozen features see which colours are there, not whether the
    two discs agree, so feature extraction stays well short; fine-tuning's trained stages learn the comparison."""
    from tests.imagegen import pairs_folder

    data = pairs_folder(str(tmp_path / "pairs"))
    out = tmp_path / "auto"
    res = fit(TrainConfig(data=data, out=str(out), mode="auto", seed=1, cache_dir=str(tmp_path / "c")))
    block = res.metrics["auto"]
    fe, ft = block["runs"][FE], block["runs"][FT]
    assert block["winner"] == FT and res.run_dir == str(out) and not block.get("stopped")
    assert ft["val_loss"] < fe["val_loss"] - 0.03
    assert ft["val_accuracy"] >= fe["val_accuracy"] + 0.02, (fe, ft)
    # feature extraction really is short here, not only slightly worse (0.92 against 0.99 with the head's choices read
    # after a temperature; 0.89 before)
    assert fe["val_accuracy"] <= ft["val_accuracy"] - 0.05, (fe, ft)
    assert "Kept fine-tuning" in res.message and _metrics(f"{out}-{FE}")["auto"]["this_run"] == FE
    assert res.metrics["fine_tuning_recipe"]["small_pictures"]  # 128 px pictures: trained at their own size
    assert "your pictures are small (about 128 px)" in block["why"], block["why"]


def test_with_a_dozen_labels_automatic_mode_keeps_feature_extraction_and_says_it_could_not_compare(tmp_path):
    """A pile labelled a dozen times, trained in automatic mode: fine-tuning would be judged on 3 images, where no
    comparison can show a difference, so it does not start; feature extraction is kept, judged on every label."""
    from engine.data.labels import write_labels
    from tests.imagegen import make_flat_dataset

    pile = make_flat_dataset(tmp_path / "sorted", n_per_class=4)
    labels = {str(p): (p.parent.name, "user") for p in sorted(pile.rglob("*.jpg"))}
    write_labels(str(tmp_path / "labels.csv"), labels)
    log = Log()
    res = fit(
        TrainConfig(data=str(pile), labels=str(tmp_path / "labels.csv"), out=str(tmp_path / "auto"), mode="auto",
                    cache_dir=str(tmp_path / "c")),
        log,
    )  # fmt: skip
    block = res.metrics["auto"]
    assert block["winner"] == FE and FT not in block["runs"] and block["too_few"]["needed"] == 20
    assert not [m for m in log.epochs if m.strategy == FT]  # fine-tuning never started
    n_val = block["too_few"]["validation_images"]
    assert n_val < 20 and f"{n_val} validation images: too few to compare" in res.message
    assert "kept feature extraction, judged on all 12 labelled images" in res.message
    assert _metrics(res.run_dir)["auto"]["winner"] == FE and not os.path.exists(f"{tmp_path / 'auto'}-{FT}")


def test_paired_intervals_hold_on_a_handful_of_images():
    """Every interval the comparison prints has width on a few images, and matches published values."""
    import numpy as np

    from engine.trust.scores import (
        paired_accuracy_difference,
        paired_mean_difference,
        t_quantile_975,
        wilson_interval,
    )

    for n, half in ((3, 0.5615), (10, 0.2775), (100, 0.0370)):  # both right on every image: -z^2/(n+z^2) .. +
        d = paired_accuracy_difference(np.ones(n, bool), np.ones(n, bool))
        assert d["difference"] == 0 and np.allclose(d["ci95"], [-half, half], atol=1e-4)
    # Fagerland, Lydersen & Laake (2017), the paired 2x2 table of Cavo et al.: -0.0621 (-0.1186 to -0.0046)
    before = np.array([1] * 59 + [1] * 6 + [0] * 16 + [0] * 80, bool)
    after = np.array([1] * 59 + [0] * 6 + [1] * 16 + [0] * 80, bool)
    d = paired_accuracy_difference(after, before)
    assert round(d["difference"], 4) == -0.0621 and [round(v, 4) for v in d["ci95"]] == [-0.1186, -0.0046]
    assert [round(v, 3) for v in wilson_interval(3, 3)] == [0.438, 1.0]
    m, (lo, hi) = paired_mean_difference(np.array([0.1, 0.3, 0.2]))  # t with 2 degrees of freedom: 4.303
    assert round(m, 3) == 0.2 and round(hi - m, 3) == round(4.303 * 0.1 / np.sqrt(3), 3)
    # Student's t tables: 2.042 at 30 degrees of freedom, 1.984 at 100, 1.962 at 1000
    assert [round(t_quantile_975(df), 3) for df in (2, 29, 30, 100, 1000)] == [4.303, 2.045, 2.042, 1.984, 1.962]
