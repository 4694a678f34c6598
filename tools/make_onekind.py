"""Make a folder of one kind of picture for ``python -m benchmarks doctor`` (and for looking at the doctor by eye).

    python tools/make_onekind.py /tmp/scans scans --per-class 60

Kinds (tests/imagegen.py ``ONE_KIND``): scans (4 classes of "MRI" slices), xray (chest X-rays, 4 faint findings),
digits (scikit-learn's digits upscaled with noise and shifts), texture (one woven material, 3 defect classes),
product (one object on one background, 3 shapes), hands (10 hand signs: which fingers are raised, frames of six
people, each with their own skin, background and pose). Train/val 80/20; no two pictures are copies of each other
(the benchmark plants its own).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.imagegen import ONE_KIND, make_one_kind


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest")
    p.add_argument("kind", choices=sorted(ONE_KIND))
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if os.path.exists(a.dest) and os.listdir(a.dest):
        print(f"{a.dest} is not empty: choose a new folder", file=sys.stderr)
        return 2
    make_one_kind(a.dest, a.kind, a.per_class, seed=a.seed)
    print(f"{a.dest}: {a.kind}, {a.per_class} per class x {len(ONE_KIND[a.kind])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
