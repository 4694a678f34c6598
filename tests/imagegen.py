"""Synthetic image folders for tests: classes that differ in colour and shape, so a pretrained backbone
separates them after a few images (tests can then assert real accuracy, not only that files exist)."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASS_STYLES = {
    "circles": ((220, 40, 40), "ellipse"),
    "squares": ((40, 60, 220), "rectangle"),
    "stripes": ((40, 170, 60), "stripes"),
    "triangles": ((230, 200, 30), "polygon"),
}


def draw_image(style: str, seed: int, size: int = 96) -> Image.Image:
    rng = random.Random(seed)
    colour, shape = CLASS_STYLES[style]
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (size + rng.randint(0, 40), size + rng.randint(0, 30)), bg)
    d = ImageDraw.Draw(im)
    w, h = im.size

    def jitter(c):
        return tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in c)

    x0, y0 = rng.randint(5, w // 4), rng.randint(5, h // 4)
    x1, y1 = rng.randint(3 * w // 4, w - 5), rng.randint(3 * h // 4, h - 5)
    if shape == "ellipse":
        d.ellipse([x0, y0, x1, y1], fill=jitter(colour))
    elif shape == "rectangle":
        d.rectangle([x0, y0, x1, y1], fill=jitter(colour))
    elif shape == "polygon":
        d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=jitter(colour))
    else:
        for x in range(0, w, 12):
            d.rectangle([x, 0, x + 5, h], fill=jitter(colour))
    return im


def make_flat_dataset(
    root: Path, n_per_class: int = 12, classes=("circles", "squares", "stripes"), ext: str = ".jpg", seed: int = 0
) -> Path:
    root = Path(root)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            draw_image(c, seed * 10000 + ci * 1000 + i).save(root / c / f"{c}_{i:03d}{ext}")
    return root


def make_split_dataset(root: Path, names=("train", "val"), n=(10, 4), classes=("circles", "squares")) -> Path:
    root = Path(root)
    for split, count in zip(names, n):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_image(c, hash((split, c, i)) % 100000).save(folder / f"{i}.png")
    return root


def draw_unlike(seed: int, size: int = 160) -> Image.Image:
    """Pictures unlike the shape classes above (a page of text, dark noise, a checkerboard): what a user might
    point a shapes model at by mistake."""
    rng = random.Random(seed)
    kind = seed % 3
    if kind == 0:  # a document: dark lines of "text" on white
        im = Image.new("RGB", (size, size), (250, 250, 250))
        d = ImageDraw.Draw(im)
        for y in range(8, size - 8, 10):
            x = 6
            while x < size - 20:
                w = rng.randint(5, 18)
                d.rectangle([x, y, x + w, y + 4], fill=(20, 20, 20))
                x += w + 4
        return im
    if kind == 1:  # dark, busy noise
        px = bytes(rng.randint(0, 90) for _ in range(size * size * 3))
        return Image.frombytes("RGB", (size, size), px).resize((size, size))
    im = Image.new("RGB", (size, size), (0, 0, 0))  # a checkerboard
    d = ImageDraw.Draw(im)
    step = rng.randint(8, 20)
    for y in range(0, size, step):
        for x in range(0, size, step):
            if (x // step + y // step) % 2:
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=(255, 255, 255))
    return im


def draw_scene(kind: str, seed: int, size: int = 160) -> Image.Image:
    """A busy picture of many random ``kind`` shapes ("circles", "lines", "boxes") in random colours: each one unlike
    the next (the doctor must not take two of them for copies), the kind still plain to a pretrained network."""
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(6, 14)):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        x, y = rng.randint(-20, size), rng.randint(-20, size)
        r = rng.randint(8, 40)
        if kind == "circles":
            d.ellipse([x, y, x + r, y + r], fill=colour)
        elif kind == "boxes":
            d.rectangle([x, y, x + r, y + rng.randint(8, 40)], fill=colour)
        else:
            d.line([x, y, rng.randint(0, size), rng.randint(0, size)], fill=colour, width=rng.randint(2, 6))
    return im


# ---------------------------------------------------------------------------------------- folders of one kind
# What the app's users bring besides everyday photos: every picture has the same layout and the same kind of
# content, so two different pictures are alike everywhere but in their detail. Each picture is drawn from its own
# seed (no two are copies of each other); tests and tools/make_onekind.py plant the copies themselves.

ONE_KIND = {
    "digits": [str(d) for d in range(10)],
    "scans": ["healthy", "bright", "dark", "ring"],
    # chest X-rays whose finding is faint (a hazy patch, a small round spot, fluid at the bottom of one lung) on
    # anatomy that varies more than the findings do: the peer is about 0.56 right at 20 labels a class, 0.68 at all
    "xray": ["normal", "opacity", "nodule", "effusion"],
    "texture": ["ok", "scratch", "spot"],
    "product": ["bottle", "mug", "box"],
    # hand signs: which fingers are raised (thumb, index, middle, ring, little)
    "hands": ["fist", "one", "two", "three", "four", "five", "thumb", "rock", "call", "gun"],
    # grey noise whose grain differs by class (blurred at 0.95 or 1.05 px, 96 px pictures), random brightness and
    # contrast: the final features tell them apart at about 87% out of fold, the earlier layers' at 98%
    "grain": ["fine", "coarse"],
}
_FINGERS = {
    "fist": "00000", "one": "01000", "two": "01100", "three": "01110", "four": "01111", "five": "11111",
    "thumb": "10000", "rock": "01001", "call": "10001", "gun": "11000",
}  # fmt: skip
# Hand-sign folders are frames of a few people signing (Sign Language MNIST is cut from videos): the same person,
# light and background again and again, each frame a little different. Which person an image shows follows from its
# index (seed % 10_007, as make_one_kind numbers them), the same people in every class.
SIGNERS = 6


def _field(rng, size: int, sigma: float):
    """A smooth random grey field, zero mean, unit spread."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _grey(a, rng, noise: float) -> Image.Image:
    import numpy as np

    a = a + rng.normal(0, noise, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def draw_one_kind(kind: str, label: str, seed: int, size: int = 160) -> Image.Image:
    """One picture of a one-kind folder ``kind`` (keys of ``ONE_KIND``) of class ``label``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "digits":  # scikit-learn's 8x8 handwritten digits, one sample each, upscaled with shifts and noise
        d = _digits()
        pool = np.flatnonzero(d.target == int(label))
        img = d.images[pool[seed % len(pool)]] * 16
        big = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((size - 32, size - 32), Image.BICUBIC), float)
        a = np.zeros((size, size))
        ox, oy = rng.integers(4, 28, 2)
        a[oy : oy + size - 32, ox : ox + size - 32] = big
        return _grey(a, rng, 10)
    if kind == "scans":  # an axial "MRI" slice: one head outline, its own tissue texture, a lesion by class
        cx, cy = 0.5 + rng.normal(0, 0.015, 2)
        rx, ry = 0.36 + rng.normal(0, 0.01), 0.43 + rng.normal(0, 0.01)
        r = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        a = np.where(r < 1, 110 + 28 * _field(rng, size, 2.5) + 14 * _field(rng, size, 1.0), 8.0)
        a = np.where((r > 0.86) & (r < 1), 200.0, a)  # the skull
        lx, ly = cx + rng.uniform(-0.18, 0.18), cy + rng.uniform(-0.2, 0.2)
        q = ((xx - lx) ** 2 + (yy - ly) ** 2) / rng.uniform(0.004, 0.009)
        if label == "bright":
            a = np.where(q < 1, 230.0, a)
        elif label == "dark":
            a = np.where(q < 1, 40.0, a)
        elif label == "ring":
            a = np.where((q > 0.5) & (q < 1), 235.0, a)
        return _grey(a, rng, 6)
    if kind == "xray":
        return _draw_xray(label, rng, size)
    if kind == "grain":  # (drawn at 96 px: the grain is a property of the pixels)
        f = _field(rng, 96, 0.95 if label == "fine" else 1.05)
        a = np.clip(rng.uniform(90, 170) + rng.uniform(20, 50) * f, 0, 255)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if kind == "texture":  # crops of one woven grey material, a scratch or a spot as the defect
        a = 128 + 40 * np.sin(2 * np.pi * (xx * 11 + 0.2 * _field(rng, size, 8))) * np.sin(2 * np.pi * yy * 11)
        a += 18 * _field(rng, size, 1.2)
        if label == "scratch":
            y0, slope = rng.uniform(0.2, 0.8), rng.uniform(-0.4, 0.4)
            a = np.where(np.abs(yy - (y0 + slope * (xx - 0.5))) < 0.012, 25.0, a)
        elif label == "spot":
            sx, sy = rng.uniform(0.2, 0.8, 2)
            a = np.where((xx - sx) ** 2 + (yy - sy) ** 2 < 0.003, 235.0, a)
        return _grey(a, rng, 5)
    if kind == "hands":
        return _draw_hand(label, seed, size)
    # product: one object on one studio background, its pose and light a little different each time
    bg = 225 + 15 * (yy - 0.5) + 4 * _field(rng, size, 20)
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).convert("RGB")
    obj = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(obj)
    s = size * rng.uniform(0.9, 1.05)
    c = size / 2 + rng.normal(0, 4, 2)
    if label == "bottle":
        d.rounded_rectangle([c[0] - 0.14 * s, c[1] - 0.2 * s, c[0] + 0.14 * s, c[1] + 0.38 * s], 10, fill=255)
        d.rectangle([c[0] - 0.05 * s, c[1] - 0.4 * s, c[0] + 0.05 * s, c[1] - 0.2 * s], fill=255)
    elif label == "mug":
        d.rounded_rectangle([c[0] - 0.24 * s, c[1] - 0.22 * s, c[0] + 0.16 * s, c[1] + 0.26 * s], 8, fill=255)
        d.ellipse([c[0] + 0.08 * s, c[1] - 0.12 * s, c[0] + 0.34 * s, c[1] + 0.14 * s], outline=255, width=7)
    else:
        d.rectangle([c[0] - 0.28 * s, c[1] - 0.2 * s, c[0] + 0.28 * s, c[1] + 0.28 * s], fill=255)
    obj = obj.rotate(float(rng.normal(0, 6)), resample=Image.BILINEAR)
    shade = 70 + 25 * _field(rng, size, 6) + 30 * xx * rng.uniform(0.5, 1.5)
    colour = np.stack([shade * f for f in (1.6, 0.7, 0.5)], -1)
    fg = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8))
    im.paste(fg, (0, 0), obj)
    a = np.asarray(im, float) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _draw_xray(label: str, rng, size: int) -> Image.Image:
    """A chest X-ray: body, two dark lung fields with ribs across them, the heart between; the finding in one lung."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:size, 0:size] / size
    a = 150 + 20 * _field(rng, size, size / 7.5)
    body = ((xx - 0.5) / rng.uniform(0.42, 0.48)) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1
    a = np.where(body, a + 20, 30)
    lungs = []
    for side in (-1, 1):
        cx, cy = 0.5 + side * rng.uniform(0.17, 0.22), rng.uniform(0.45, 0.52)
        rx, ry = rng.uniform(0.12, 0.16), rng.uniform(0.25, 0.31)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        lungs.append((cx, cy, rx, ry, inside))
        a = np.where(inside, a - 75 + 10 * _field(rng, size, size / 75), a)
    ribs = np.sin(2 * np.pi * (yy * rng.uniform(9, 11) + 2.4 * (xx - 0.5) ** 2)) > 0.75
    a = np.where(ribs & (lungs[0][4] | lungs[1][4]), a + 18, a)
    hx, hy = 0.5 + rng.uniform(0.0, 0.05), rng.uniform(0.58, 0.64)
    a = np.where(((xx - hx) / rng.uniform(0.1, 0.15)) ** 2 + ((yy - hy) / 0.13) ** 2 < 1, a + 60, a)
    cx, cy, rx, ry, inside = lungs[rng.integers(2)]
    if label == "opacity":
        px, py = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.5, 0.5) * ry
        haze = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * rng.uniform(0.05, 0.08) ** 2))
        a = a + inside * haze * rng.uniform(35, 60) * (1 + 0.3 * _field(rng, size, size / 56))
    elif label == "nodule":
        px, py = cx + rng.uniform(-0.6, 0.6) * rx, cy + rng.uniform(-0.6, 0.6) * ry
        r = rng.uniform(0.025, 0.04)
        a = a + gaussian_filter((((xx - px) ** 2 + (yy - py) ** 2) < r * r).astype(float), 1.5) * rng.uniform(45, 70)
    elif label == "effusion":
        level = cy + ry * rng.uniform(0.35, 0.7)
        a = np.where(inside & (yy > level - 0.04 * (xx - cx) / rx), a + rng.uniform(50, 80), a)
    a = 255 * (np.clip(gaussian_filter(a, 1.0), 0, 255) / 255) ** rng.uniform(0.8, 1.25)
    return _grey(a * rng.uniform(0.85, 1.1), rng, 5)


def _draw_hand(label: str, seed: int, size: int) -> Image.Image:
    import numpy as np

    who = (seed % 10_007) % SIGNERS
    person = np.random.default_rng(9_000 + who)  # the same for every frame of this person, in every class
    rng = np.random.default_rng(seed)
    skin = person.uniform([150, 95, 70], [235, 190, 160])
    back = person.uniform(30, 200, 3)
    scale = person.uniform(0.85, 1.1) * rng.uniform(0.96, 1.04)
    turn = person.normal(0, 12) + rng.normal(0, 4)
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = back[None, None, :] * (0.85 + 0.3 * yy[..., None]) + 6 * _field(rng, size, 12)[..., None]
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    s = size * 0.42 * scale
    cx, cy = size / 2 + rng.normal(0, 3), size * 0.6 + rng.normal(0, 3)
    d.rounded_rectangle([cx - 0.42 * s, cy - 0.35 * s, cx + 0.42 * s, cy + 0.5 * s], int(0.2 * s), fill=255)  # palm
    d.rectangle([cx - 0.3 * s, cy + 0.4 * s, cx + 0.3 * s, size], fill=255)  # wrist
    up = _FINGERS[label]
    for f, x in enumerate((-0.3, -0.1, 0.1, 0.3)):  # index .. little
        length = (0.95 if f in (1, 2) else 0.8) * s if up[f + 1] == "1" else 0.18 * s
        w = 0.085 * s
        x0 = cx + x * s + rng.normal(0, 0.01 * s)
        d.rounded_rectangle([x0 - w, cy - 0.3 * s - length, x0 + w, cy - 0.2 * s], int(w), fill=255)
    if up[0] == "1":  # the thumb out to the side
        d.line([cx - 0.35 * s, cy + 0.1 * s, cx - 0.85 * s, cy - 0.35 * s], fill=255, width=int(0.19 * s))
    else:  # folded across the palm
        d.line([cx - 0.35 * s, cy + 0.15 * s, cx + 0.05 * s, cy - 0.05 * s], fill=200, width=int(0.17 * s))
    mask = mask.rotate(turn, resample=Image.BILINEAR, center=(cx, size * 0.9))
    shade = 0.8 + 0.35 * xx[..., None] + 0.05 * _field(rng, size, 5)[..., None]
    fg = Image.fromarray(np.clip(skin[None, None, :] * shade, 0, 255).astype(np.uint8))
    im.paste(fg, (0, 0), mask)
    a = np.asarray(im, float) + rng.normal(0, 5, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_one_kind(root: Path, kind: str, n_per_class: int, seed: int = 0, val_share: float = 0.2) -> Path:
    """A train/val folder of one kind of picture (``ONE_KIND``), no two pictures copies of each other."""
    root = Path(root)
    for ci, label in enumerate(ONE_KIND[kind]):
        for i in range(n_per_class):
            split = "val" if i < round(n_per_class * val_share) else "train"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            draw_one_kind(kind, label, seed * 1_000_003 + ci * 10_007 + i).save(folder / f"{label}_{i:04d}.png")
    return root


def plant_copies(root: Path, n: int = 4, seed: int = 1) -> dict[str, list[tuple[str, str]]]:
    """In a train/val folder: ``n`` near copies (a train picture resized to 80% and re-saved at JPEG quality 60
    beside it), ``n`` leaks (cropped 5% per side into validation) and ``n`` byte copies. Returns (original, copy)
    pairs by the finding each should give."""
    import shutil

    rng = random.Random(seed)
    root = Path(root)
    train = sorted(p for p in (root / "train").rglob("*") if p.is_file() and not p.name.startswith(("near-", "copy-")))
    picks = rng.sample(train, 3 * n)
    out: dict[str, list[tuple[str, str]]] = {"near-duplicate": [], "leak": [], "duplicate": []}
    for p in picks[:n]:
        im = Image.open(p).convert("RGB")
        dst = p.with_name(f"near-{p.stem}.jpg")
        im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BILINEAR).save(dst, quality=60)
        out["near-duplicate"].append((str(p), str(dst)))
    for p in picks[n : 2 * n]:
        im = Image.open(p).convert("RGB")
        dx, dy = int(im.width * 0.05), int(im.height * 0.05)
        dst = root / "val" / p.parent.name / f"leak-{p.stem}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        im.crop((dx, dy, im.width - dx, im.height - dy)).save(dst, quality=90)
        out["leak"].append((str(p), str(dst)))
    for p in picks[2 * n :]:
        dst = p.with_name(f"copy-{p.name}")
        shutil.copy2(p, dst)
        out["duplicate"].append((str(p), str(dst)))
    return out


# ------------------------------------------------------------------------------- pairs (benchmarks/strategy.py)
PAIR_COLOURS = ((220, 40, 40), (40, 60, 220), (40, 170, 60), (230, 200, 30))


def draw_pair(match: bool, seed: int, size: int = 128):
    """Two discs on a light background, one in each half: of the same colour (``match``) or of two colours.

    Frozen features say which colours are in a picture, and a linear head on them sees roughly the sum of the two
    discs' features: "two reds" and "two blues" then lie on either side of "one red, one blue", so no straight line
    separates matching from mixed pairs. Stages that are trained can compare the two discs."""
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    d = ImageDraw.Draw(im)
    a = rng.randrange(len(PAIR_COLOURS))
    b = a if match else rng.choice([c for c in range(len(PAIR_COLOURS)) if c != a])
    colours = [a, b]
    rng.shuffle(colours)
    for (lo, hi), c in zip(((0, size // 2), (size // 2, size)), colours):
        r = rng.randint(14, 26)
        cx, cy = rng.randint(lo + r + 2, hi - r - 2), rng.randint(r + 2, size - r - 2)
        fill = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in PAIR_COLOURS[c])
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return im


def pairs_folder(dst: str, n_per_class: int = 300, seed: int = 0) -> str:
    """Classes ``same`` and ``mixed`` (see `draw_pair`): a folder where feature extraction stays well short of what
    fine-tuning reaches."""
    for ci, name in enumerate(("same", "mixed")):
        folder = os.path.join(dst, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(n_per_class):
            draw_pair(name == "same", seed * 100000 + ci * 10000 + i).save(os.path.join(folder, f"{i:04d}.png"))
    return dst
