"""Synthetic image folders for tests: classes that differ in colour and shape, so a pretrained backbone
separates them after a few images (tests can then assert real accuracy, not only that files exist)."""
from __future__ import annotations

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
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in c)  # noqa: E731
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


def make_flat_dataset(root: Path, n_per_class: int = 12, classes=("circles", "squares", "stripes"),
                      ext: str = ".jpg", seed: int = 0) -> Path:
    root = Path(root)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            draw_image(c, seed * 10000 + ci * 1000 + i).save(root / c / f"{c}_{i:03d}{ext}")
    return root


def make_split_dataset(root: Path, names=("train", "val"), n=(10, 4), classes=("circles", "squares")) -> Path:
    root = Path(root)
    for split, count in zip(names, n):
        for ci, c in enumerate(classes):
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
