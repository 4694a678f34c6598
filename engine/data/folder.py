"""Scan an image folder, check files, split it, and decode images to RGB.

Two layouts are understood:

* flat: ``DATA/<class>/**/*.jpg`` -> a stratified, seeded split is made;
* pre-split: ``DATA/{train,val[,test]}/<class>/**`` (usual spellings, any case) -> the folder's split is kept.

Scanning reads file headers only (``PIL.Image.open`` is lazy), never pixels, so it stays fast on big folders.
Files that cannot be read are reported as ``(path, reason)`` and skipped, never raised.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.config import ScanConfig
from engine.data.deep_grey import DEEP_GREY_MODES, grey_to_8_bits
from engine.data.splits import SPLIT_NAMES, _key, excluded_paths, stratified_split, untrained_classes
from engine.events import Callbacks, Cancelled, CancelToken, EngineError, Phase, Progress

NO_VAL_FOLDER = "No validation folder"  # (the start of the warning a run may say more precisely: engine/train/fit.py)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Refuse images that would need more than this many pixels to decode (PIL's own bomb check warns at 89M).
MAX_PIXELS = 16_000 * 16_000


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    split: str  # "train" | "val" | "test"


@dataclass
class Dataset:
    """A scanned folder: class names, samples with their split, and what was skipped."""

    root: str
    layout: str  # "flat" | "pre-split"
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    split_settings: tuple[float, float, int] = (0.2, 0.0, 0)  # (val_split, test_split, seed) it was scanned with
    excluded: list[str] = field(default_factory=list)  # images left out on purpose (an exclude list)
    labels_file: str | None = None  # read from this labels file (engine/data/labels.py), not from class folders

    def matches(
        self,
        root: str,
        val_split: float,
        test_split: float,
        seed: int,
        exclude: str | set | None = None,
        labels: str | None = None,
    ) -> bool:
        """Whether this scan is what scanning ``root`` with these settings would give now (same folder, split,
        exclude list and labels file)."""
        if os.path.abspath(self.root) != os.path.abspath(root):
            return False
        if (os.path.abspath(labels) if labels else None) != self.labels_file:
            return False
        return self.split_settings == (val_split, test_split, seed) and set(self.excluded) == {
            p
            for p in excluded_paths(exclude)
            if p.startswith(os.path.abspath(self.root) + os.sep) and os.path.exists(p)
        }

    def validation_given(self) -> bool:
        """Whether the validation images are a folder the user made (``val/``), not carved out by the split."""
        root = os.path.abspath(self.root)
        for s in self.samples:
            if s.split == "val":
                top = os.path.relpath(os.path.abspath(s.path), root).replace(os.sep, "/").split("/")[0]
                return SPLIT_NAMES.get(top.lower()) == "val"
        return False

    def with_pool_as_train(self) -> Dataset:
        """This scan with its validation images counted as training images (cross-fitting trains on both)."""
        out = self.copy()
        out.samples = [Sample(s.path, s.label, "train") if s.split == "val" else s for s in self.samples]
        return out

    def copy(self) -> Dataset:
        """A copy whose lists can be changed (``drop``) without touching this one."""
        return Dataset(
            self.root,
            self.layout,
            list(self.classes),
            list(self.samples),
            list(self.skipped),
            list(self.warnings),
            self.split_settings,
            list(self.excluded),
            self.labels_file,
        )

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{class: {split: n}}`` for the class table."""
        out = {c: {"train": 0, "val": 0, "test": 0} for c in self.classes}
        for s in self.samples:
            out[self.classes[s.label]][s.split] += 1
        return out

    def drop(self, bad: Iterable[tuple[str, str]]) -> None:
        """Remove files found unreadable later (at decode time) and record why."""
        bad = list(bad)
        if not bad:
            return
        bad_paths = {p for p, _ in bad}
        self.samples = [s for s in self.samples if s.path not in bad_paths]
        self.skipped.extend(bad)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in {"__MACOSX", "Thumbs.db", "desktop.ini"}


def walk_images(
    root: str | os.PathLike, cancel: CancelToken | None = None, on_error: Callable[[str, str], None] | None = None
) -> list[str]:
    """All files with an image extension under ``root`` (recursive, sorted; hidden entries and symlink loops
    skipped)."""
    found: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()

    def onerror(err: OSError) -> None:
        if on_error is not None:
            on_error(str(err.filename or root), f"cannot list folder: {err.strerror or err}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        if cancel is not None:
            cancel.raise_if_cancelled()
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError as exc:
            onerror(exc)
            dirnames[:] = []
            continue
        if key in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            if not _hidden(name) and is_image_name(name):
                found.append(os.path.join(dirpath, name))
    return found


def check_image(path: str) -> str | None:
    """Read only the header. Returns None when the file looks like an image, else the reason it is not."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
        if w * h > MAX_PIXELS:
            return f"image too large to decode safely ({w}x{h} pixels)"
        if w < 1 or h < 1:
            return "image has no pixels"
    except Image.DecompressionBombError as exc:
        return f"image too large to decode safely ({str(exc).split(' exceeds')[0]})"
    except UnidentifiedImageError:
        return "not a readable image (unknown or corrupt format)"
    except FileNotFoundError:
        return "file disappeared while scanning"
    except PermissionError:
        return "permission denied"
    except Exception as exc:  # PIL raises many types on odd files; all mean "skip it"
        return f"cannot read image: {exc.__class__.__name__}: {exc}"
    return None


def _class_dirs(folder: str) -> list[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise EngineError(f"Cannot open folder {folder}: {exc.strerror or exc}") from exc
    out = []
    for e in entries:
        try:
            if e.is_dir() and not _hidden(e.name):
                out.append(e.name)
        except OSError:
            continue
    return out


def detect_layout(root: str) -> dict[str, str]:
    """``{split: folder}`` for a pre-split folder, empty for a flat one."""
    splits: dict[str, str] = {}
    for name in _class_dirs(root):
        key = SPLIT_NAMES.get(name.lower())
        if key and key not in splits:
            splits[key] = os.path.join(root, name)
    return splits if "train" in splits else {}


@dataclass
class ScanResult:
    dataset: Dataset | None  # None when cancelled
    cancelled: bool = False


def scan_folder(
    config: ScanConfig, callbacks: Callbacks | None = None, cancel: CancelToken | None = None
) -> ScanResult:
    """The scan job (CLI ``scan``, the window's Dataset tab): :func:`scan` with the job contract."""
    cb = callbacks or Callbacks()
    try:
        return ScanResult(
            scan(
                config.data,
                config.val_split,
                config.test_split,
                config.seed,
                cancel,
                cb.on_progress,
                exclude=config.exclude,
            )
        )
    except Cancelled:
        return ScanResult(None, cancelled=True)


def _other_kinds(root: str, limit: int = 20000) -> str:
    """A sentence on the files under ``root`` that are not images the app reads (their extensions, most common
    first), with a hint for DICOM scans; "" when there are none."""
    kinds: Counter = Counter()
    for n, (_, dirnames, filenames) in enumerate(os.walk(root)):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        kinds.update(
            os.path.splitext(f)[1].lower() or "(no extension)"
            for f in filenames
            if not _hidden(f) and not is_image_name(f)
        )
        if n > limit or sum(kinds.values()) > limit:
            break
    if not kinds:
        return ""
    listed = ", ".join(f"{k} ({v})" for k, v in kinds.most_common(5))
    hint = " DICOM (.dcm) scans are not read: export them as PNG (16-bit is fine) first." if ".dcm" in kinds else ""
    return (
        f" The folder holds files of other kinds: {listed}; the app reads JPEG, PNG, BMP, GIF, WebP and TIFF "
        "images." + hint
    )


def scan(
    root: str | os.PathLike,
    val_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 0,
    cancel: CancelToken | None = None,
    progress: Callable[[Progress], None] | None = None,
    check_files: bool = True,
    exclude: str | set | None = None,
    known: Callable[[str], bool] | None = None,
) -> Dataset:
    """Scan ``root`` into a :class:`Dataset`, leaving out the images ``exclude`` lists. Raises :class:`EngineError`
    with a suggestion when it cannot be used, :class:`Cancelled` when cancelled. ``known(path)``: the file was decoded
    before and is unchanged, so its header is not checked again (engine/data/known_files.py)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise EngineError(f"Folder not found: {root}. Choose a folder that contains one subfolder per class.")
    layout = detect_layout(root)
    skipped: list[tuple[str, str]] = []
    warn: list[str] = []

    def record(path: str, reason: str) -> None:
        skipped.append((path, reason))

    # (split or None, class name, files)
    groups: list[tuple[str | None, str, list[str]]] = []
    if layout:
        for split, folder in sorted(layout.items()):
            for cname in _class_dirs(folder):
                groups.append((split, cname, walk_images(os.path.join(folder, cname), cancel, record)))
    else:
        for cname in _class_dirs(root):
            groups.append((None, cname, walk_images(os.path.join(root, cname), cancel, record)))
        loose = [n for n in os.listdir(root) if is_image_name(n) and not _hidden(n)]
        if loose:
            warn.append(
                f"{len(loose)} image(s) directly in {root} were ignored: put each image in a folder "
                "named after its class, or label them in the Label tab (Open a folder to label…, then Subfolders "
                "are classes)."
            )

    leave_out = excluded_paths(exclude)
    excluded: list[str] = []
    if leave_out:
        kept_groups = []
        for split, cname, files in groups:
            excluded += [p for p in files if os.path.abspath(p) in leave_out]
            kept_groups.append((split, cname, [p for p in files if os.path.abspath(p) not in leave_out]))
        groups = kept_groups
    files_by_group = _check_files(groups, check_files, cancel, progress, record, known)

    names = sorted({c for _, c, f in files_by_group if f})
    empty = sorted({c for _, c, f in files_by_group} - set(names))
    for c in empty:
        warn.append(f"Class folder '{c}' has no readable images and was ignored.")
    if not names:
        raise EngineError(
            f"No readable images found in {root}. Put images in one subfolder per class "
            "(for example photos/cats/*.jpg and photos/dogs/*.jpg)." + _other_kinds(root)
        )
    if len(names) < 2:
        raise EngineError(
            f"Only one class ('{names[0]}') found in {root}. A classifier needs at least two "
            "classes: add a second subfolder of images."
        )
    index = {c: i for i, c in enumerate(names)}

    samples = _assign_splits(root, bool(layout), files_by_group, index, val_split, test_split, seed, warn)

    ds = Dataset(
        root=root,
        layout="pre-split" if layout else "flat",
        classes=names,
        samples=samples,
        skipped=skipped,
        warnings=warn,
        split_settings=(val_split, test_split, seed),
        excluded=[os.path.abspath(p) for p in excluded],
    )
    ds.warnings.extend(dataset_warnings(ds))
    return ds


def _check_files(
    groups, check_files: bool, cancel, progress, record, known: Callable[[str], bool] | None = None
) -> list[tuple[str | None, str, list[str]]]:
    """Each group's files whose header reads as an image (the others are recorded with their reason); ``known``
    files are taken as they are."""
    total = sum(len(f) for _, _, f in groups)
    checked = 0
    files_by_group: list[tuple[str | None, str, list[str]]] = []
    for split, cname, files in groups:
        good = []
        for path in files:
            if cancel is not None and checked % 64 == 0:
                cancel.raise_if_cancelled()
            reason = check_image(path) if check_files and not (known and known(path)) else None
            if reason:
                record(path, reason)
            else:
                good.append(path)
            checked += 1
            if progress is not None and (checked % 256 == 0 or checked == total):
                progress(Progress(Phase.SCANNING, checked, total))
        files_by_group.append((split, cname, good))
    return files_by_group


def _assign_splits(
    root: str,
    presplit: bool,
    files_by_group,
    index: dict[str, int],
    val_split: float,
    test_split: float,
    seed: int,
    warn: list[str],
) -> list[Sample]:
    """Samples with their split: the folder's for a pre-split layout (validation carved out of train when there is no
    val/ folder), else each image's own draw (engine/data/splits.py)."""
    samples: list[Sample] = []
    if presplit:
        for split, cname, files in files_by_group:
            if files:
                samples.extend(Sample(p, index[cname], split) for p in files)
        if not any(s.split == "val" for s in samples) and val_split > 0:
            # A train/ (and test/) folder without val/: carve validation out of train.
            train = [s for s in samples if s.split == "train"]
            rest = [s for s in samples if s.split != "train"]
            assign = stratified_split(
                [s.label for s in train], val_split, 0.0, seed, [_key(s.path, root) for s in train]
            )
            samples = [Sample(s.path, s.label, a) for s, a in zip(train, assign)] + rest
            warn.append(f"{NO_VAL_FOLDER}: {val_split:.0%} of train/ was held out for validation.")
    else:
        flat = [(p, index[c]) for _, c, files in files_by_group for p in files]
        assign = stratified_split([y for _, y in flat], val_split, test_split, seed, [_key(p, root) for p, _ in flat])
        samples = [Sample(p, y, a) for (p, y), a in zip(flat, assign)]
    return samples


def dataset_warnings(ds: Dataset) -> list[str]:
    """Imbalance and tiny-class warnings a user should see before training."""
    out = []
    totals = Counter(s.label for s in ds.samples)
    counts = [totals.get(i, 0) for i in range(len(ds.classes))]
    for i, n in enumerate(counts):
        if n < 10:
            out.append(
                f"Class '{ds.classes[i]}' has only {n} image(s): results for it will be unreliable; "
                "aim for at least 20 per class."
            )
    nonzero = [n for n in counts if n]
    if nonzero and max(nonzero) >= 3 * min(nonzero):
        out.append(
            f"Classes are imbalanced (largest {max(nonzero)} vs smallest {min(nonzero)} images): training "
            "weights each class by the inverse of its share, so small classes count as much, and Results "
            "shows balanced accuracy beside accuracy."
        )
    if not ds.split("train"):
        out.append("No training images.")
    return out + untrained_classes(ds.counts())


# --------------------------------------------------------------------------------------------------------------
# Decoding


def open_rgb(source: str | bytes, draft_size: int | None = None):
    """Decode to an RGB PIL image: EXIF rotation applied; grey, palette, RGBA, CMYK, 16-bit all become RGB.

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding when the image is much larger
    than needed (a large speed-up on camera photos).
    """
    from PIL import Image, ImageOps

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(fp)
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"image too large to decode safely ({im.width}x{im.height} pixels)")
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im = ImageOps.exif_transpose(im)
        if im.mode in DEEP_GREY_MODES:
            im = Image.fromarray(grey_to_8_bits(im))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        if im.mode != "RGB":
            im = im.convert("RGB")
        im.load()
    return im


def describe_error(exc: BaseException) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, Image.DecompressionBombError):
        return "image too large to decode safely"
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or corrupt format)"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return "truncated or corrupt image data"
    return f"{exc.__class__.__name__}: {exc}"
