"""Every job's settings, declared once: a dataclass per job whose field metadata also makes its command line.

``TrainConfig`` is the one source of the training settings: the CLI's ``train`` options are generated from its
fields (flag, help text, default), the window reads and writes the same fields (each tab owns some), and
:func:`to_argv` turns a config back into the command line that reproduces it (the window's *Copy command line*).
A round-trip test (config -> window -> config -> argv -> parsed config) keeps them from drifting apart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.events import EngineError
from engine.network.backbones import DEFAULT_BACKBONE

MODES = ("feature-extraction", "fine-tuning", "auto")
# Per-mode defaults for the settings left at None ("auto" in the window).
DEFAULTS = {
    # Feature extraction's head is solved exactly (engine/train/probe.py) and ignores epochs, batch size, learning
    # rate and patience; they stay filled in so that a config reads the same in either mode.
    "feature-extraction": {"epochs": 100, "batch_size": 64, "lr": 3e-3, "patience": 15},
    "fine-tuning": {"epochs": 5, "batch_size": 32, "lr": 1e-3, "patience": 3},
}
FEATURES = ("auto", "final", "depths")


def unfreeze_value(v: str | int) -> int | str:
    """``--unfreeze``: a number of stages, "all", or "auto" (engine/train/fine_tuning/recipe.py)."""
    if v in ("all", "auto"):
        return v
    try:
        return int(v)
    except (TypeError, ValueError) as exc:
        raise EngineError("--unfreeze takes a number of stages, 'all' or 'auto'.") from exc


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple | None = None,
    positional: bool = False,
    required: bool = False,
    cli: bool = True,
) -> Any:
    """A config field with what its command-line option needs.

    ``flag``: the option's name (default ``--field-name``; a bool that defaults to True gets ``--no-field-name``
    unless named). ``parse``: str -> value (default: the type of ``default``; required when default is None).
    ``required``: the command line must give it (the API may leave it out). ``cli=False``: not on the command line.
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "flag": flag,
            "parse": parse,
            "choices": choices,
            "positional": positional,
            "required": required,
            "cli": cli,
        },
    )


@dataclass
class TrainConfig:
    """Everything a training job needs. CLI: ``python -m engine train DATA [options]``, generated from these
    fields; ``out`` and ``overwrite`` are per run (the window makes a new run folder each time)."""

    data: str = option("", "folder of class subfolders, or with train/ val/ [test/] subfolders", positional=True)
    out: str | None = option(None, "run folder to create (default: a new folder in the runs folder)", parse=str)
    mode: str = option(
        "feature-extraction",
        "feature-extraction (frozen backbone, new head), fine-tuning, or auto "
        "(both: feature extraction, then fine-tuning within --budget; "
        "the lower validation loss wins)",
        choices=MODES,
    )
    backbone: str = option(DEFAULT_BACKBONE, "see `python -m engine backbones`")
    weights: str | None = option(None, "load backbone weights from this local file (.safetensors/.pth)", parse=str)
    download: bool = option(False, "allow downloading torchvision weights (needs internet)")
    unfreeze: int | str = option(
        "auto",
        "fine-tuning: last N stages, 'all', or auto (3; small pictures on a Lite backbone: all but the first 3)",
        parse=unfreeze_value,
    )
    features: str = option(
        "auto",
        "feature extraction: which of the frozen network's features the head reads: auto (the final ones, with a "
        "head on the earlier layers' mixed in when that does clearly better out of fold), final, or depths (both, "
        "one head); the regularisation is always chosen out of fold",
        choices=FEATURES,
    )
    epochs: int | None = option(
        None, "fine-tuning epochs (default 5; feature extraction's head is solved exactly, without epochs)", parse=int
    )
    batch_size: int | None = option(None, "fine-tuning batch size (default 32)", parse=int)
    lr: float | None = option(None, "fine-tuning head learning rate (default 1e-3)", parse=float)
    backbone_lr_mult: float | None = option(
        None,
        "fine-tuning: backbone learning rate = lr x this (default 0.1; small pictures, with more stages trained: 0.3)",
        parse=float,
    )
    weight_decay: float = option(1e-4, "fine-tuning AdamW weight decay")
    augment: bool = option(
        True,
        "fine-tuning: each image or its mirror image at random (other backbones than the "
        "bundled one: random crops too)",
    )
    bn_stats: str = option(
        "frozen",
        "fine-tuning: BatchNorm statistics: frozen (the pretrained ones; their scale and "
        "shift still train) or update (re-estimated from each batch)",
        choices=("frozen", "update"),
    )
    small_images: str = option(
        "auto",
        "fine-tuning pictures of at most 160 px (median shorter side) with a Lite "
        "backbone: auto (train at 128 px, not upscaled), off (upscaled to the "
        "backbone's input)",
        choices=("auto", "off"),
    )
    patience: int | None = option(None, "fine-tuning early-stopping patience in epochs, 0 = off (default 3)", parse=int)
    balance: str = option(
        "auto",
        "weight the loss by inverse class frequency: auto (when the largest class has 3x "
        "the images of the smallest), on, off",
        choices=("auto", "on", "off"),
    )
    budget: float | None = option(
        None, "auto mode: minutes fine-tuning may take (default: its planned epochs)", parse=float
    )
    linear_probe_init: bool = option(
        True, "fine-tuning: start the head from a linear probe (LP-FT)", flag="--no-lp-init"
    )
    cross_fit: str = option(
        "auto",
        "feature extraction: auto (when validation is carved out of your labelled images: 5 heads on 5 folds judge "
        "every image out of sample and the saved head learns from all of them; a val/ folder you made stays as "
        "given), off (train on the rest, judge on the validation share)",
        choices=("auto", "off"),
    )
    val_split: float = option(0.2, "share of each class held out for validation (unsplit folders)")
    test_split: float = option(0.0, "share of each class held out as a test set (unsplit folders)")
    seed: int = option(0, "random seed: same seed, same split and same run")
    exclude: str | None = option(
        None, "leave out the images listed in this CSV (a 'path' column: the doctor's CSV works as it is)", parse=str
    )
    labels: str | None = option(
        None,
        "train on the images this labels file labels (CSV: path, label, source, as the labelling view and "
        "'label' write) instead of class folders; a test/ folder in DATA is still only scored",
        parse=str,
    )
    device: str = option("auto", "auto (prefers CUDA), cpu, cuda, cuda:N, mps")
    engine: str = option(
        "auto",
        "the frozen backbone's forward pass: auto (ONNX Runtime on the CPU, PyTorch on a GPU), onnxruntime, torch",
        choices=("auto", "onnxruntime", "torch"),
    )
    precision: str = option(
        "auto",
        "ONNX Runtime's precision: auto (int8 when its features agree with fp32 on your images), fp32, int8",
        choices=("auto", "fp32", "int8"),
    )
    cache: bool = option(True, "read and write the embedding cache")
    cache_dir: str | None = option(None, "embedding cache folder (default: the user cache folder)", parse=str)
    overwrite: bool = option(False, "replace --out if it exists")

    def resolved(self) -> TrainConfig:
        """A copy with the per-mode defaults filled in, checked."""
        if self.mode not in MODES:
            raise EngineError(f"Unknown mode '{self.mode}': use one of {', '.join(MODES)}.")
        if self.budget is not None and not self.budget > 0:
            raise EngineError("--budget is in minutes and must be above 0.")
        if self.mode == "auto":  # each half fills in its own defaults
            c = copy.copy(self)
            c.unfreeze = unfreeze_value(c.unfreeze)
            return c
        d = DEFAULTS[self.mode]
        c = copy.copy(self)
        c.epochs = self.epochs if self.epochs is not None else d["epochs"]
        c.batch_size = self.batch_size if self.batch_size is not None else d["batch_size"]
        c.lr = self.lr if self.lr is not None else d["lr"]
        c.patience = self.patience if self.patience is not None else d["patience"]
        if c.epochs < 1 or c.batch_size < 1 or not c.lr > 0:
            raise EngineError("Epochs and batch size must be at least 1 and the learning rate above 0.")
        c.unfreeze = unfreeze_value(c.unfreeze)
        return c


@dataclass
class ScanConfig:
    """``python -m engine scan DATA``: classes, split and unreadable files of a folder."""

    data: str = option("", "image folder", positional=True)
    val_split: float = option(0.2, "share of each class held out for validation (unsplit folders)")
    test_split: float = option(0.0, "share of each class held out as a test set (unsplit folders)")
    seed: int = option(0, "random seed of the split")
    exclude: str | None = option(None, "leave out the images listed in this CSV (a 'path' column)", parse=str)
    labels: str | None = option(None, "read classes from this labels file instead of class folders", parse=str)


@dataclass
class PredictConfig:
    """``python -m engine predict RUN IMAGES... --csv FILE``."""

    run: str = option("", "run folder", positional=True)
    images: list = option(None, "folder(s), searched recursively, and/or image files", positional=True, parse=str)
    csv: str | None = option(None, "CSV file to write", parse=str, required=True)
    top_k: int = option(1, "also list the k most likely classes")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    engine: str = option(
        "auto",
        "feature-extraction runs on the CPU: auto (ONNX Runtime, in the precision the run was "
        "trained with), onnxruntime, torch",
        choices=("auto", "onnxruntime", "torch"),
    )
    batch_size: int | None = option(None, "images per forward pass (default: measured per device)", parse=int)
    min_confidence: float | None = option(
        None,
        "mark predictions below this calibrated confidence 'unsure' (default: the threshold saved with the model)",
        parse=float,
    )
    target_accuracy: float | None = option(
        None, "or: the lowest threshold at which validation images were at least this accurate (e.g. 0.95)", parse=float
    )
    sort_into: str | None = option(
        None,
        "also copy (or hard-link) each image into DIR/<predicted class>/, "
        "DIR/_unsure/ or DIR/_unfamiliar/; nothing is moved or overwritten",
        parse=str,
    )


@dataclass
class EvaluateConfig:
    """``python -m engine evaluate RUN DATA``: score a labelled folder (every image counts)."""

    run: str = option("", "run folder", positional=True)
    data: str = option("", "labelled folder (either layout)", positional=True)
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    engine: str = option(
        "auto",
        "feature-extraction runs on the CPU: auto (ONNX Runtime, in the precision the run was "
        "trained with), onnxruntime, torch",
        choices=("auto", "onnxruntime", "torch"),
    )
    batch_size: int | None = option(None, "images per forward pass (default: measured per device)", parse=int)


EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass
class ExportConfig:
    """``python -m engine export RUN --format F --out FILE``."""

    run: str = option("", "run folder", positional=True)
    format: str = option("onnx", "onnx or torchscript", choices=EXPORT_FORMATS, required=True)
    out: str = option("", "file to write (a .json sidecar is written beside it)", required=True)


# ------------------------------------------------------------------------------------------- command line


def _flag(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _parse(f: dataclasses.Field) -> Callable[[str], Any]:
    return f.metadata.get("parse") or type(f.default)


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse option (or positional) per field of ``cls``, with its help and default."""
    for f in cli_fields(cls):
        help_text = f.metadata["help"]
        if f.metadata["positional"]:
            nargs = "+" if f.name == "images" else None
            parser.add_argument(f.name, nargs=nargs, help=help_text)
        elif isinstance(f.default, bool):
            parser.add_argument(
                _flag(f),
                dest=f.name,
                action="store_false" if f.default else "store_true",
                help=f"off: {help_text} (on by default)" if f.default else help_text,
            )
        else:
            quiet = f.default is None or f.metadata["required"] or "default" in help_text
            default_note = "" if quiet else f" (default {f.default})"
            parser.add_argument(
                _flag(f),
                dest=f.name,
                type=_parse(f),
                default=f.default,
                choices=f.metadata["choices"],
                required=f.metadata["required"],
                help=help_text + default_note,
            )


def from_args(cls, ns: argparse.Namespace):
    """The config a parsed command line describes."""
    return cls(**{f.name: getattr(ns, f.name) for f in cli_fields(cls)})


def to_argv(cfg) -> list[str]:
    """The arguments (after the subcommand) that :func:`from_args` turns back into ``cfg``: positionals, then
    every option whose value differs from its default."""
    args: list[str] = []
    for f in cli_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if f.metadata["positional"]:
            args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif value != f.default:
            if isinstance(f.default, bool):
                args.append(_flag(f))
            else:
                args += [_flag(f), str(value)]
    return args


def value_from_text(cls, name: str, text: Any) -> Any:
    """A stored setting (QSettings' INI files give strings back) as the field's value; "" means None."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if not isinstance(text, str):
        return text
    if isinstance(f.default, bool):
        return text.lower() == "true"
    if text == "" or text == "None":
        return None if f.default is None else f.default
    return _parse(f)(text)
