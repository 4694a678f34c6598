"""``python -m benchmarks JOB`` (tutorial, trust, strategy, onnx, doctor, crossfit, label, features):
docs/benchmarks.md.

They live beside the product, not in it: the wheel and the bundle hold none of this code, and it may import the
engine (never the reverse: pyproject.toml's import contracts). Folders default to ``../shared/datasets`` and each
benchmark says so and skips when they are missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, function)
JOBS = {
    "tutorial": ("tutorial", "run_bench"),
    "trust": ("trust", "run_bench_trust"),
    "strategy": ("strategy", "run_bench_strategy"),
    "onnx": ("onnx_paths", "run_bench_onnx"),
    "doctor": ("doctor", "run_bench_doctor"),
    "crossfit": ("crossfit", "run_bench_crossfit"),
    "label": ("label", "run_bench_label"),
    "features": ("features", "run_bench_features"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "tutorial", help="benchmark the engine against a tutorial-style loop (see docs/benchmarks.md)"
    )
    bench.add_argument("data", nargs="?", help="image folder (default: ../shared/datasets/hymenoptera)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--epochs", type=int, default=10, help="epochs of the reference fixed-feature loop")
    bench.add_argument("--ft-epochs", type=int, default=2)
    bench.add_argument("--json", help="also write the table as JSON here")

    bt = sub.add_parser("trust", help="measure calibration, 'unsure' and 'unfamiliar' (see docs/benchmarks.md)")
    bt.add_argument("data", nargs="*", help="folders (default: ../shared/datasets/hymenoptera and flowers)")
    bt.add_argument("--device", default="auto")
    bt.add_argument("--ft-epochs", type=int, default=2)
    bt.add_argument("--other-images", type=int, default=400, help="images of the other folder(s) to predict")
    bt.add_argument("--splits", type=int, default=3, help="random 60/20/20 splits per folder and mode (seeds 0..N-1)")
    bt.add_argument("--modes", default="feature-extraction,fine-tuning", help="comma-separated modes to run")
    bt.add_argument("--json", help="also write the table as JSON here")

    bs = sub.add_parser(
        "strategy",
        help="feature extraction vs fine-tuning (new and old recipe) vs auto, "
        "scored on a test split (see docs/benchmarks.md)",
    )
    bs.add_argument(
        "data", nargs="*", help="folders, 'digits' or 'pairs' (default: hymenoptera, flowers, digits, pairs)"
    )
    bs.add_argument("--device", default="auto")
    bs.add_argument("--ft-epochs", type=int, default=0, help="fine-tuning epochs (default: the recipe's)")
    bs.add_argument(
        "--runs",
        default=",".join(["feature-extraction", "fine-tuning (new)", "fine-tuning (old)", "auto"]),
        help="comma-separated runs to make, of: feature-extraction, fine-tuning (new), "
        "fine-tuning (224 px) (small pictures upscaled, the default before 2026-11-29), "
        "fine-tuning (old), auto",
    )
    bs.add_argument("--json", help="also write the table as JSON here")

    bo = sub.add_parser("onnx", help="the frozen backbone's CPU paths: PyTorch, ONNX Runtime fp32 and int8")
    bo.add_argument("data", nargs="*", help="folders (default: ../shared/datasets/hymenoptera and flowers)")
    bo.add_argument(
        "--flavours", default="", help="also measure these int8 flavours, e.g. v8,a7,s8 (engine/network/int8.py)"
    )
    bo.add_argument("--flavours-only", action="store_true", help="only the flavour table")

    bd = sub.add_parser(
        "doctor",
        help="the dataset doctor on a folder with planted problems, against "
        "cleanlab + imagehash (see docs/benchmarks.md)",
    )
    bd.add_argument(
        "data",
        nargs="*",
        help="image folders, or one-kind folders drawn here: scans, digits, product, "
        "texture (default: ../shared/datasets/flowers, scans, product)",
    )
    bc = sub.add_parser("crossfit", help="feature extraction with and without cross-fitting, on a test split")
    bc.add_argument(
        "data",
        nargs="*",
        help="folders, or 'digits' / 'scans' / 'product' / 'texture' (default: hymenoptera, flowers, digits, scans)",
    )
    bc.add_argument("--per-class", default="all,30,10", help="training images per class: all and/or numbers")
    bc.add_argument("--draws", type=int, default=3, help="draws of the reduced training sets")
    bl = sub.add_parser("label", help="a simulated user labels a folder: the app's picks against random picks")
    bl.add_argument(
        "data",
        nargs="*",
        help="labelled folders, or digits / scans / hands / product / texture "
        "(default: hymenoptera, flowers, digits, scans)",
    )
    bl.add_argument("--max-share", type=float, default=0.15, help="stop at this share of the pool labelled")
    bl.add_argument(
        "--max-per-class", type=int, default=0, help="or at this many labels per class (default: no cap but the share)"
    )
    bl.add_argument(
        "--seeds", type=int, default=1, help="simulated users (the app's picks averaged over them; 1: stop early)"
    )
    bf = sub.add_parser(
        "features",
        help="the app's head on the final features, with its choice of the earlier layers', and scikit-learn's "
        "logistic regression, on a test split at 10, 20 and every label a class",
    )
    bf.add_argument(
        "data",
        nargs="*",
        help="labelled folders, or digits / hands / scans / texture / product "
        "(default: hymenoptera, flowers and those five)",
    )
    bf.add_argument("--seeds", type=int, default=3, help="random label draws at 10 and 20 a class (averaged)")
    bf.add_argument("--features", default="auto", choices=("auto", "final", "depths"), help="the app's choice")
    bf.add_argument(
        "--splits", type=int, default=1,
        help="test splits: the fixed quarter of each class, then random quarters (differences averaged, +- a standard "
        "error)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, fn = JOBS[args.command]
    return getattr(importlib.import_module(f"benchmarks.{module}"), fn)(args)


if __name__ == "__main__":
    sys.exit(main())
