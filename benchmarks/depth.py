"""``python -m benchmarks depth``: would the backbone's earlier layers learn more from few labels than its last?

The app embeds each image once with the backbone's final pooled features (1,280 for EfficientNet-Lite0). On pictures
far from ImageNet (handwritten digits, say) a mid-level layer may separate the classes better. This pools the
outputs of the last three block groups (112, 192 and 320 channels on Lite0) beside the final features and trains the
labelling rounds' head (``engine.labelling.session.suggest``, as ``python -m benchmarks label`` does) on random
labels, 5, 10 and 20 a class (three seeds) and on every pool label, for the final features alone and for each
group appended to them (scaled to the same total variance). The PyTorch fp32 backbone on the CPU, BatchNorm folded;
the images decoded as the app decodes them. A measurement for a design decision, not something the app does.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.label import SHARED, _accuracy, _train_on, test_split
from engine.data.decode import decode_one
from engine.data.folder import scan

GROUPS = (-4, -3, -2)  # the last three block groups (the last stage of all is the 1x1 head conv: the final features)


def _pooled(paths: list[str]) -> dict[str, np.ndarray]:
    """The final features and each group's global-average-pooled output, for every image of ``paths``."""
    import torch

    from engine.network.backbones import load_backbone
    from engine.network.forward import Forward

    bb = load_backbone()
    fw = Forward.frozen(bb.net, bb.preprocessing, torch.device("cpu"))
    body, outs = fw.net.body, {}
    names = [fw.net.stage_names[g][-1] for g in GROUPS]

    def keep(name):
        def hook(module, inputs, output):
            outs.setdefault(name, []).append(output.float().mean((2, 3)))

        return hook

    for n in names:
        body.get_submodule(n).register_forward_hook(keep(n))
    pixels = []
    for p in paths:
        u8, why = decode_one(p, bb.preprocessing, bb.preprocessing.size)
        if u8 is None:
            raise SystemExit(f"{p}: {why}")
        pixels.append(u8)
    final = fw.map(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous())
    feats = {"final": final.numpy()}
    for g, n in zip(GROUPS, names):
        feats[f"block group {len(fw.net.stage_names) + g} ({n})"] = torch.cat(outs[n]).numpy()
    return feats


def run_bench_depth(a) -> int:
    from benchmarks.crossfit import digits_folder

    folders = a.data or [os.path.join(SHARED, "hymenoptera"), os.path.join(SHARED, "flowers"), "digits"]
    tmp = tempfile.mkdtemp(prefix="ts-depth-")
    for src in folders:
        name = os.path.basename(os.path.normpath(src))
        if src == "digits":
            src = digits_folder(os.path.join(tmp, "digits"))
        elif not os.path.isdir(src):
            print(f"{src}: not found, skipped")
            continue
        t0 = time.perf_counter()
        ds = scan(src, val_split=0.0, test_split=0.0)
        feats = _pooled([s.path for s in ds.samples])
        y = np.array([s.label for s in ds.samples])
        test = test_split(ds)
        pool = np.flatnonzero(~test)
        C = len(ds.classes)
        print(f"\n{name}: {len(pool)} pool images, {test.sum()} test, {C} classes ({time.perf_counter() - t0:.0f} s "
              "to embed); test accuracy of the rounds' head on random labels (3 seeds)")  # fmt: skip
        print(f"{'features':>34} {'5/class':>8} {'10/class':>9} {'20/class':>9} {'every label':>12}")
        final = feats["final"]
        for label, X in [("final", final)] + [
            (f"final + {k}", np.hstack([final, v * np.sqrt(final.var(0).sum() / v.var(0).sum())]))
            for k, v in feats.items()
            if k != "final"
        ]:
            X = X.astype(np.float32)
            Xp, yp = X[pool], y[pool]
            row = []
            for per in (5, 10, 20):
                accs = []
                for seed in range(3):
                    rng = np.random.default_rng(seed)
                    picked = np.concatenate([rng.choice(np.flatnonzero(yp == c), per, False) for c in range(C)])
                    accs.append(_accuracy(_train_on(Xp, yp, picked, ds.classes, seed), X[test], y[test]))
                row.append(np.mean(accs))
            row.append(_accuracy(_train_on(Xp, yp, np.arange(len(pool)), ds.classes, 0), X[test], y[test]))
            print(f"{label:>34} {row[0]:8.3f} {row[1]:9.3f} {row[2]:9.3f} {row[3]:12.3f}")
    return 0
