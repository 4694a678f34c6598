"""Odd but valid image files decode to RGB the way a user expects (issue: bad images)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from engine.data import open_rgb, scan_folder


def test_modes_become_rgb_and_exif_rotation_is_applied(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    grey16 = Image.fromarray((np.ones((10, 20)) * 60000).astype(np.uint16))
    grey16.save(tmp_path / "grey16.png")
    Image.new("RGBA", (20, 10), (0, 0, 255, 0)).save(tmp_path / "transparent.png")
    Image.new("P", (20, 10), 3).save(tmp_path / "palette.gif")
    Image.new("RGB", (1, 1), (10, 200, 10)).save(tmp_path / "tiny.PNG")
    wide = Image.new("RGB", (40, 10), (200, 10, 10))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    wide.save(tmp_path / "rotated.jpg", exif=exif)

    cmyk = open_rgb(str(tmp_path / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200 and cmyk.getpixel((5, 5))[2] < 60
    g = open_rgb(str(tmp_path / "grey16.png"))
    assert g.mode == "RGB" and 220 <= g.getpixel((3, 3))[0] <= 235  # 60000/65535*255 = 233, not clipped to 255
    t = open_rgb(str(tmp_path / "transparent.png"))
    assert t.getpixel((3, 3)) == (255, 255, 255)  # fully transparent -> white background, not black
    assert open_rgb(str(tmp_path / "palette.gif")).mode == "RGB"
    assert open_rgb(str(tmp_path / "tiny.PNG")).size == (1, 1)
    r = open_rgb(str(tmp_path / "rotated.jpg"))
    assert r.size == (10, 40)


def test_decompression_bomb_is_skipped_with_a_reason(tmp_path):
    from tests.imagegen import make_flat_dataset

    root = make_flat_dataset(tmp_path / "d", n_per_class=3, classes=("circles", "squares"))
    # A PNG header that claims 20000 x 20000 pixels (400 M) in a tiny file.
    Image.new("1", (20000, 20000)).save(root / "circles" / "bomb.png", optimize=True)
    ds = scan_folder(root, val_split=0.34)
    reasons = {p.split("/")[-1]: r for p, r in ds.skipped}
    assert "bomb.png" in reasons and "too large" in reasons["bomb.png"]
