import http.server
import io
import threading
from functools import partial

import numpy as np
import pytest
from PIL import Image

from florence_helpers import ImageLoadError, load_image
from florence_helpers.boundary.inputs import InputLimits


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_path_and_str(tmp_path, photo):
    path = tmp_path / "photo.png"
    photo.save(path)
    for source in (path, str(path)):
        image = load_image(source)
        assert image.mode == "RGB"
        assert image.size == (400, 300)
        assert np.array_equal(np.asarray(image), np.asarray(photo))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match=r"Image file not found: .*nope\.jpg"):
        load_image(missing)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"Could not read .*notes\.jpg as an image"):
        load_image(bad)


def test_truncated_file_is_named(tmp_path, photo):
    data = _png_bytes(photo, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"Could not read .*cut\.jpg as an image"):
        load_image(cut)


def test_bytes(photo):
    assert load_image(_png_bytes(photo)).size == (400, 300)
    with pytest.raises(ImageLoadError, match="Could not read the given bytes as an image"):
        load_image(b"garbage")


def test_url(tmp_path, photo):
    photo.save(tmp_path / "photo.png")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        local = InputLimits(allowed_hosts=("127.0.0.1",))
        assert load_image(f"{base}/photo.png", limits=local).size == (400, 300)
        with pytest.raises(ImageLoadError, match=rf"Could not download {base}/x.png: .*HTTP 404"):
            load_image(f"{base}/x.png", limits=local)
        with pytest.raises(ImageLoadError, match="non-public address"):
            load_image(f"{base}/photo.png")  # loopback is refused unless allowed
    finally:
        server.shutdown()


def test_unreachable_url_is_named():
    local = InputLimits(allowed_hosts=("127.0.0.0/8",))
    with pytest.raises(ImageLoadError, match=r"download http://127\.0.*could not connect"):
        load_image("http://127.0.0.1:9/photo.jpg", limits=local)


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _png_bytes(photo, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (400, 300)
    assert load_image(data).size == (300, 400)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(rgba)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency():
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    image = load_image(palette)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (0, 255, 0)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 128, (128, 128, 128)), ("CMYK", (0, 255, 255, 0), (255, 0, 0))],
)
def test_other_modes_become_rgb(mode, value, expected):
    image = load_image(Image.new(mode, (3, 3), value))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == expected


def test_sixteen_bit_grey_keeps_its_range():
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = load_image(Image.fromarray(array))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255,) * 3]


@pytest.mark.parametrize(
    ("array", "pixel"),
    [
        (np.full((5, 7), 200, np.uint8), (200, 200, 200)),
        (np.full((5, 7, 1), 10, np.uint8), (10, 10, 10)),
        (np.full((5, 7, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((5, 7, 4), (9, 8, 7, 255), np.uint8), (9, 8, 7)),
        (np.full((5, 7, 3), 1.0), (255, 255, 255)),
        (np.full((5, 7), 65535, np.uint16), (255, 255, 255)),
        (np.ones((5, 7), bool), (255, 255, 255)),
    ],
)
def test_numpy_arrays(array, pixel):
    image = load_image(array)
    assert image.size == (7, 5)
    assert image.getpixel((0, 0)) == pixel


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 2, 2), np.uint8), "expected HxW, HxWx3 or HxWx4"),
        (np.zeros(5, np.uint8), "expected HxW, HxWx3 or HxWx4"),
        (np.zeros((0, 3), np.uint8), "empty array"),
        (np.full((2, 2), np.nan), "NaN or infinite"),
        (np.zeros((2, 2), complex), "dtype complex"),
    ],
)
def test_bad_arrays_are_explained(array, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(array)


def test_other_types_are_explained():
    with pytest.raises(ImageLoadError, match="Cannot read an image from a int"):
        load_image(42)


def test_the_input_image_is_not_modified():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    before = rgba.tobytes()
    load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.tobytes() == before


def test_a_float_image_with_nan_and_infinities_loads_with_them_as_zero():
    import warnings

    array = np.array([[0.0, 0.5, 1.0], [np.nan, np.inf, -np.inf]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(Image.fromarray(array, mode="F"))
    assert np.asarray(image)[..., 0].tolist() == [[0, 128, 255], [0, 0, 0]]


def _tiff_with_a_huge_tag(values: int) -> bytes:
    """A 1x1 TIFF whose XResolution holds ``values`` fractions (a few bytes each)."""
    import struct

    entries = [  # tag, type, count, value or offset
        (256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 0), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1), (282, 5, values, 0),
    ]  # fmt: skip
    header = 8
    directory = 2 + 12 * len(entries) + 4
    pixel_at = header + directory
    rational_at = pixel_at + 1
    out = bytearray(b"II*\0" + struct.pack("<I", header) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        value = pixel_at if tag == 273 else rational_at if tag == 282 else value
        out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0) + b"\x80" + struct.pack("<II", 72, 1) * values
    return bytes(out)


def test_a_tiff_whose_tag_holds_millions_of_values_is_refused_before_pillow_parses_it(tmp_path):
    # A 19 MB 1x1 TIFF whose XResolution held 2.4 million fractions took Pillow 10 s and 0.6 GB
    # to open, before any pixel check (eleventh hostile review).
    import time

    from florence_helpers.boundary.images import image_size

    ordinary = _tiff_with_a_huge_tag(1)
    assert load_image(ordinary).size == (1, 1)  # the same file with one value loads
    hostile = _tiff_with_a_huge_tag(400_000)
    (tmp_path / "x.tif").write_bytes(hostile)
    started = time.monotonic()
    for source in (hostile, tmp_path / "x.tif", str(tmp_path / "x.tif")):
        with pytest.raises(ImageLoadError, match=r"a TIFF tag \(282\) of 400,000 values"):
            load_image(source)
    with pytest.raises(ImageLoadError, match="a TIFF tag"):
        image_size(hostile)
    assert time.monotonic() - started < 10


def test_ordinary_tiffs_still_open(tmp_path):
    picture = Image.new("RGB", (300, 200), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF directory is walked too
    for options in ({}, {"tiffinfo": exif}, {"compression": "tiff_lzw"}):
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.tif"
        picture.save(path, **options)
        assert load_image(path).size in ((300, 200), (200, 300))
    pages = tmp_path / "pages.tif"
    picture.save(pages, save_all=True, append_images=[picture] * 3)
    assert load_image(pages).size == (300, 200)
