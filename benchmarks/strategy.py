"""``python -m benchmarks strategy [FOLDER ...]``: feature extraction, fine-tuning (new and old recipe) and auto.

Folders: ../shared/datasets/hymenoptera and flowers (everyday photos) and, unlike photos, scikit-learn's bundled
8x8 handwritten digits upscaled to 64 px (no download) and "pairs" (two discs of the same colour or of two colours,
drawn here). Each is linked into a flat copy split 60/20/20 (seed 0);
every run picks its epoch (and auto its strategy) on validation and is scored on the test split, which played no
part in either. Each run starts from an empty embedding cache, as a user's first run does.

Recipes: *new* is the default (BatchNorm statistics frozen; on EfficientNet-Lite0 the frozen stages run once per
image and its mirror image, the last 3 stages train); *old* is the previous default, forced here: 2 stages, the
whole network run every epoch on random crops (25-100% of the area) and BatchNorm statistics updated.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from engine.config import TrainConfig
from engine.train.fit import fit
from tests.imagegen import pairs_folder

from .trust import SHARED, _flat_links


def digits_folder(dst: str, size: int = 64) -> str:
    """scikit-learn's 1,797 handwritten digits (8x8, bundled with the library), upscaled: pictures unlike photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (x, y) in enumerate(zip(d.images, d.target)):
        folder = os.path.join(dst, f"digit_{y}")
        os.makedirs(folder, exist_ok=True)
        im = Image.fromarray((x / 16 * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR).convert("RGB")
        im.save(os.path.join(folder, f"{i:04d}.png"))
    return dst


def _old_recipe():
    """A context that forces the previous fine-tuning path (whole network every epoch)."""
    import contextlib

    from engine.train.fine_tuning import inputs

    @contextlib.contextmanager
    def forced():
        keep_split, keep_applies = inputs.split, inputs.applies
        inputs.split = lambda *a, **k: None
        from engine.train.fine_tuning import loop as fine_tuning

        fine_tuning.applies = lambda *a, **k: False
        try:
            yield
        finally:
            inputs.split, fine_tuning.applies = keep_split, keep_applies

    return forced()


RUNS = {
    "feature-extraction": dict(mode="feature-extraction"),
    "fine-tuning (new)": dict(mode="fine-tuning"),
    "fine-tuning (224 px)": dict(mode="fine-tuning", small_images="off"),  # the default before small pictures
    "fine-tuning (old)": dict(mode="fine-tuning", unfreeze=2, bn_stats="update", small_images="off"),
    "auto": dict(mode="auto"),
}


def run_bench_strategy(a) -> int:
    tmp = tempfile.mkdtemp(prefix="ts-bench-strategy-")
    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers"), "digits", "pairs"]
    rows = []
    for f in folders:
        name = os.path.basename(os.path.normpath(f))
        if f == "digits":
            flat = digits_folder(os.path.join(tmp, "digits"))
        elif f == "pairs":
            flat = pairs_folder(os.path.join(tmp, "pairs"))
        elif not os.path.isdir(f):
            print(f"skipped: {f} not found (the shared datasets are not on this machine)", file=sys.stderr)
            continue
        else:
            flat = _flat_links(f, os.path.join(tmp, f"flat-{name}"))
        for label, kw in RUNS.items():
            if label not in a.runs.split(","):
                continue
            cfg = TrainConfig(
                data=flat,
                out=os.path.join(tmp, "runs", f"{name}-{label.replace(' ', '')}"),
                val_split=0.2,
                test_split=0.2,
                seed=0,
                device=a.device,
                cache_dir=os.path.join(tmp, f"cache-{name}-{label.replace(' ', '')}"),
                **kw,
            )
            if a.ft_epochs and kw["mode"] != "feature-extraction":
                cfg.epochs = None if kw["mode"] == "auto" else a.ft_epochs
            t0 = time.perf_counter()
            if label.endswith("(old)"):
                with _old_recipe():
                    res = fit(cfg)
            else:
                res = fit(cfg)
            m = res.metrics
            row = {
                "folder": name,
                "run": label,
                "seconds": round(time.perf_counter() - t0, 1),
                "test_accuracy": m.get("test_accuracy"),
                "ci95": m.get("test_accuracy_ci95"),
                "val_accuracy": m.get("val_accuracy"),
                "epochs_run": m.get("epochs_run"),
                "n_test": m.get("test_n"),
                "winner": (m.get("auto") or {}).get("winner"),
            }
            rows.append(row)
            print(
                f"  {name} {label}: test {row['test_accuracy']:.3f} in {row['seconds']:.0f} s"
                + (f" (kept {row['winner']})" if row["winner"] else ""),
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n{'folder':12} {'run':20} {'test acc':>8} {'95% interval':>13} {'n':>5} {'epochs':>6} {'wall s':>7}  winner"
    )
    for r in rows:
        ci = f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if r["ci95"] else "-"
        print(
            f"{r['folder']:12} {r['run']:20} {r['test_accuracy']:8.3f} {ci:>13} {r['n_test']:5} "
            f"{r['epochs_run']:6} {r['seconds']:7.0f}  {r['winner'] or ''}"
        )
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0
