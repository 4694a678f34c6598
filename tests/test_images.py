"""Odd but valid image files decode to RGB the way a user expects (issue: bad images)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.data.folder import open_rgb, scan


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


def test_a_12_bit_scan_keeps_its_grey_levels_and_scans_of_one_depth_scale_alike(tmp_path):
    """X-ray and MRI exports often hold 12-bit values in 16-bit PNG or TIFF files: scaled by 65535 they decoded
    nearly black, with 16 grey levels."""
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64)
    dim = ramp * (2500 / 4095)  # a darker scan from the same 12-bit scanner
    for name, values in (("full.png", ramp), ("full.tif", ramp), ("dim.png", dim)):
        Image.fromarray(values.astype(np.uint16)).save(tmp_path / name)
    Image.fromarray((ramp / 4095).astype(np.float32)).save(tmp_path / "float.tif")  # 0..1 floats

    for name in ("full.png", "full.tif", "float.tif"):
        grey = np.asarray(open_rgb(str(tmp_path / name)))[..., 0]
        assert grey.max() == 255 and len(np.unique(grey)) > 200, name
    full, dim8 = (np.asarray(open_rgb(str(tmp_path / n)))[..., 0] for n in ("full.png", "dim.png"))
    at_2000 = np.abs(ramp - 2000).argmin(), np.abs(dim - 2000).argmin()  # the same raw value, 2000 of 4095
    assert abs(int(full.flat[at_2000[0]]) - int(dim8.flat[at_2000[1]])) <= 1
    assert abs(int(full.flat[at_2000[0]]) - round(2000 * 255 / 4095)) <= 1
    # embeddings cached from the old, nearly black decoding (keyed by the file's bytes) are not reused; others are
    import hashlib

    from engine.data.decode import content_hash

    def old_key(name):
        return hashlib.blake2b((tmp_path / name).read_bytes(), digest_size=16).hexdigest()

    assert all(content_hash((tmp_path / n).read_bytes()) != old_key(n) for n in ("full.png", "full.tif", "float.tif"))
    Image.new("L", (8, 8), 9).save(tmp_path / "grey8.png")
    Image.new("RGB", (8, 8), 9).save(tmp_path / "photo.jpg")
    assert all(content_hash((tmp_path / n).read_bytes()) == old_key(n) for n in ("grey8.png", "photo.jpg"))


def test_decompression_bomb_is_skipped_with_a_reason(tmp_path):
    from tests.imagegen import make_flat_dataset

    root = make_flat_dataset(tmp_path / "d", n_per_class=3, classes=("circles", "squares"))
    # A PNG header that claims 20000 x 20000 pixels (400 M) in a tiny file.
    Image.new("1", (20000, 20000)).save(root / "circles" / "bomb.png", optimize=True)
    ds = scan(root, val_split=0.34)
    reasons = {p.split("/")[-1]: r for p, r in ds.skipped}
    assert "bomb.png" in reasons and "too large" in reasons["bomb.png"]


def test_torchvision_jpeg_decoding_matches_pil_and_falls_back_per_file(tmp_path):
    """On CUDA, JPEGs are decoded by nvjpeg in batches (issue #5); the same code runs here with torchvision's CPU
    decoder. Whatever it cannot decode exactly like PIL (EXIF rotation, CMYK, PNG, damaged files) goes to PIL, so
    pixels match PIL's to resampling noise and every error reads the same."""
    import io

    import torch

    from engine.data.decode import iter_decoded, iter_decoded_torch
    from engine.network.backbones import LITE0_PREPROCESSING, Preprocessing
    from tests.imagegen import draw_image

    files = []
    for i, style in enumerate(["circles", "squares", "stripes", "triangles"] * 2):
        p = tmp_path / f"{i}.jpg"
        draw_image(style, i, size=160).save(p, quality=92)
        files.append(p)
    draw_image("stripes", 50, size=120).convert("L").save(tmp_path / "grey.jpg")
    tall = draw_image("triangles", 51, size=150).resize((90, 200))
    exif = tall.getexif()
    exif[0x0112] = 6  # shown rotated: nvjpeg would ignore this, so PIL must take it
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    draw_image("circles", 52).save(tmp_path / "image.png")
    buf = io.BytesIO()
    draw_image("squares", 53, size=200).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:900])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300)
    (tmp_path / "empty.jpg").write_bytes(b"")
    files += [
        tmp_path / n
        for n in ("grey.jpg", "rotated.jpg", "cmyk.jpg", "image.png", "truncated.jpg", "garbage.jpg", "empty.jpg")
    ]
    paths = [str(p) for p in files]
    crop = Preprocessing(96, 110, "center-crop", (0.5,) * 3, (0.5,) * 3)
    for pre, size in ((LITE0_PREPROCESSING, 112), (crop, 96)):
        ref = [x for group in iter_decoded(paths, pre, size, chunk=5) for x in group]
        got = [x for group in iter_decoded_torch(paths, pre, size, torch.device("cpu"), chunk=5) for x in group]
        assert [i for i, _, _ in got] == list(range(len(paths)))
        assert [e for _, _, e in got] == [e for _, _, e in ref]
        assert sum(a is None for _, a, _ in got) >= 3  # garbage, empty, and the truncated one
        for (i, a, _), (_, b, _) in zip(ref, got):
            if a is None:
                assert b is None
                continue
            assert b.shape == (3, size, size) and b.dtype == torch.uint8
            diff = np.abs(a.astype(np.int16) - b.permute(1, 2, 0).numpy().astype(np.int16))
            assert diff.mean() < 3.0, (paths[i], diff.mean())
