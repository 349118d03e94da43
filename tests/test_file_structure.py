"""Image containers that Pillow walks piece by piece in Python are refused before it does.

Each hostile file here is small, opens in Pillow (slowly, at full size), and must be refused
by :mod:`florence_helpers.boundary.file_structure` first; ordinary files of each kind still load.
"""

import io
import struct
import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from florence_helpers import ImageLoadError, load_image
from florence_helpers.boundary.file_structure import MAX_PIECES, structure_problem
from florence_helpers.boundary.images import image_size


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _exif_with_a_huge_tag(values: int) -> bytes:
    """EXIF data (a TIFF structure) whose XResolution holds ``values`` fractions."""
    directory = struct.pack("<H", 1) + struct.pack("<HHII", 282, 5, values, 26) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", 8) + directory + struct.pack("<II", 72, 1) * values


def _png_with(before_pixels: bytes = b"", after_pixels: bytes = b"", **options) -> bytes:
    png = _encoded(Image.new("RGB", (2, 2), (200, 30, 10)), "PNG", **options)
    pixels = png.index(b"IDAT") - 4
    end = png.index(b"IEND") - 4
    return png[:pixels] + before_pixels + png[pixels:end] + after_pixels + png[end:]


def _refused(data: bytes, match: str, tmp_path) -> None:
    path = tmp_path / "hostile"
    path.write_bytes(data)
    started = time.monotonic()
    for source in (data, path):
        with pytest.raises(ImageLoadError, match=match):
            load_image(source)
    with pytest.raises(ImageLoadError, match=match):
        image_size(data)
    assert time.monotonic() - started < 5


MANY = MAX_PIECES + 10


@pytest.mark.parametrize(
    "hostile",
    [
        _png_with(before_pixels=_chunk(b"abCd") * MANY),
        _png_with(after_pixels=_chunk(b"tEXt", b"a\0b") * MANY),  # read by load(), after IDAT
        _png_with(before_pixels=_chunk(b"IDAT") * MANY),  # empty pixel-data chunks
    ],
    ids=["before-pixels", "after-pixels", "empty-IDAT"],
)
def test_a_png_of_thousands_of_chunks_is_refused(hostile, tmp_path):
    # A million empty chunks (12 MB) took Pillow 3.5 s to open; a 50 MB upload, 15 s.
    assert Image.open(io.BytesIO(hostile)).size == (2, 2)  # Pillow itself reads it
    _refused(hostile, "PNG chunks of metadata", tmp_path)


def test_exif_of_millions_of_values_is_refused_in_png_and_webp(tmp_path):
    bomb = _exif_with_a_huge_tag(400_000)
    before = _png_with(exif=bomb)
    after = _png_with(after_pixels=_chunk(b"eXIf", bomb))  # Pillow reads it in load()
    webp = _encoded(Image.new("RGB", (2, 2)), "WEBP", exif=bomb)
    for hostile in (before, after, webp):
        _refused(hostile, r"EXIF data with a TIFF tag \(282\) of 400,000 values", tmp_path)


def test_a_decoded_image_holding_such_exif_is_refused_before_it_is_parsed():
    image = Image.new("RGB", (2, 2))
    image.info["exif"] = b"Exif\0\0" + _exif_with_a_huge_tag(400_000)
    with pytest.raises(ImageLoadError, match="EXIF data with a TIFF tag"):
        load_image(image)


def test_a_gif_of_thousands_of_comment_blocks_before_its_picture_is_refused(tmp_path):
    gif = _encoded(Image.new("P", (2, 2)), "GIF")
    picture = gif.index(b",")
    comment = b"!\xfe" + b"\x01a" * MANY + b"\0"  # one comment of many one-byte blocks
    hostile = gif[:picture] + comment + gif[picture:]
    assert Image.open(io.BytesIO(hostile)).size == (2, 2)
    _refused(hostile, "GIF extension blocks", tmp_path)


def _jpeg_with(after_start: bytes) -> bytes:
    jpeg = _encoded(Image.new("RGB", (2, 2), (1, 2, 3)), "JPEG")
    return jpeg[:2] + after_start + jpeg[2:]


@pytest.mark.parametrize(
    "hostile",
    [
        _jpeg_with(b"\xff\xe5\x00\x02" * MANY),  # empty APP5 segments
        _jpeg_with(b"\xff" * MANY),  # fill bytes
        _jpeg_with(b"\xff\xe0\x00\x02" + b"\x00" * MANY),  # stray bytes Pillow skips
    ],
    ids=["APP-segments", "fill-bytes", "stray-bytes"],
)
def test_a_jpeg_of_thousands_of_markers_before_its_pixels_is_refused(hostile, tmp_path):
    # 5 million empty APP5 segments (20 MB) took Pillow 8.8 s and 750 MB (twelfth review).
    assert Image.open(io.BytesIO(hostile)).size == (2, 2)
    _refused(hostile, "JPEG markers, fill or stray bytes", tmp_path)


@pytest.mark.parametrize("padding", [b" " * 70_000, b"# " + b"x" * 70_000 + b"\n"])
def test_a_pnm_header_of_endless_whitespace_or_comment_is_refused(padding, tmp_path):
    # 20 MB of whitespace before the width took Pillow 6.8 s, a byte at a time.
    hostile = b"P6\n" + padding + b"2 2\n255\n" + bytes(12)
    assert Image.open(io.BytesIO(hostile)).size == (2, 2)
    _refused(hostile, "PNM header longer than 64 kB", tmp_path)


def test_a_frame_control_chunk_in_a_still_png_does_not_stop_the_walk(tmp_path):
    # Pillow reads on past an fcTL when no acTL announced frames: so must the check.
    frame = _chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 2, 2, 0, 0, 1, 1, 0, 0))
    hostile = _png_with(after_pixels=frame + _chunk(b"tEXt", b"a\0b") * MANY)
    _refused(hostile, "PNG chunks of metadata", tmp_path)


def test_a_gif_with_a_stray_byte_before_its_comment_blocks_is_refused(tmp_path):
    gif = _encoded(Image.new("P", (2, 2)), "GIF")
    picture = gif.index(b",")
    hostile = gif[:picture] + b"\x00" + b"!\xfe" + b"\x01a" * MANY + b"\0" + gif[picture:]
    assert Image.open(io.BytesIO(hostile)).size == (2, 2)
    _refused(hostile, "GIF extension blocks or stray bytes", tmp_path)


def test_ordinary_jpegs_and_pnms_still_load(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for photo in sorted((repo / "images").glob("*.jpg")):
        assert load_image(photo).size == Image.open(photo).size
    exif = Image.Exif()
    exif[0x0112] = 6
    picture = Image.new("RGB", (30, 20), (200, 10, 10))
    for options in ({"exif": exif}, {"progressive": True}, {"icc_profile": b"\0" * 5000}):
        assert load_image(_encoded(picture, "JPEG", **options)).size in ((30, 20), (20, 30))
    commented = b"P6\n# made by hand\n# twice\n3 1\n255\n" + bytes(9)
    assert load_image(commented).size == (3, 1)
    assert load_image(_encoded(picture, "PPM")).size == (30, 20)


def _apng(frames: int) -> bytes:
    """A 2x2 animated PNG of ``frames`` frames (its later frames copied chunk by chunk)."""
    colours = [Image.new("RGB", (2, 2), (c, 0, 0)) for c in (0, 100)]
    png = _encoded(colours[0], "PNG", save_all=True, append_images=colours[1:])
    second = png.rindex(b"fcTL") - 4
    end = png.index(b"IEND") - 4
    return png[:end] + png[second:end] * (frames - 2) + png[end:]


def test_ordinary_pngs_gifs_and_webps_still_load_turned_by_their_exif(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    picture = Image.new("RGB", (30, 20), (10, 200, 30))
    turned = [
        _encoded(picture, "PNG", exif=exif),
        _png_with(after_pixels=_chunk(b"eXIf", exif.tobytes())),
        _encoded(picture, "WEBP", exif=exif),
    ]
    assert [load_image(data).size for data in turned] == [(20, 30), (2, 2), (20, 30)]
    texts = _png_with(before_pixels=_chunk(b"tEXt", b"Title\0cat") * 50)
    assert load_image(texts).size == (2, 2)
    gif = _encoded(Image.new("P", (3, 2)), "GIF", comment=b"made by hand" * 100)
    assert load_image(gif).size == (3, 2)
    animation = _apng(MANY)  # Pillow stops at the second frame, and so does the check
    assert Image.open(io.BytesIO(animation)).n_frames == 2
    assert load_image(animation).size == (2, 2)


SAMPLES = {
    "png": _png_with(exif=Image.Exif().tobytes()),
    "gif": _encoded(Image.new("P", (2, 2)), "GIF", comment=b"x"),
    "webp": _encoded(Image.new("RGB", (2, 2)), "WEBP", exif=_exif_with_a_huge_tag(2)),
    "tiff": _encoded(Image.new("RGB", (2, 2)), "TIFF"),
    "jpeg": _encoded(Image.new("RGB", (2, 2)), "JPEG", exif=Image.Exif().tobytes()),
    "ppm": b"P6\n# comment\n2 2\n255\n" + bytes(12),
}


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(SAMPLES)),
    cut=st.integers(min_value=0, max_value=200),
    at=st.integers(min_value=0, max_value=200),
    noise=st.binary(min_size=1, max_size=8),
)
def test_damaged_files_give_an_answer_never_an_exception(kind, cut, at, noise):
    data = bytearray(SAMPLES[kind])
    data[at : at + len(noise)] = noise
    handle = io.BytesIO(bytes(data[: max(len(data) - cut, 0)]))
    handle.seek(0)
    problem = structure_problem(handle)
    assert problem is None or isinstance(problem, str)
    assert handle.tell() == 0


def test_exif_given_as_a_png_text_chunk_is_checked_too():
    # Pillow's getexif reads a "Raw profile type exif" text chunk (hex) when there is no eXIf
    # chunk (thirteenth review's note).
    bomb = _exif_with_a_huge_tag(300_000)
    text = f"\nexif\n{len(bomb)}\n{bomb.hex()}"
    hostile = _png_with(before_pixels=_chunk(b"tEXt", b"Raw profile type exif\0" + text.encode()))
    assert "Raw profile type exif" in Image.open(io.BytesIO(hostile)).info
    with pytest.raises(ImageLoadError, match="EXIF data with a TIFF tag"):
        load_image(hostile)


def _exif_with_a_huge_interop_tag(values: int) -> bytes:
    """EXIF (little-endian TIFF) of Orientation 6, whose EXIF directory points to an Interop
    directory holding one (private) tag of ``values`` numbers."""
    ifd0 = 8
    exif_ifd = ifd0 + 2 + 2 * 12 + 4
    interop = exif_ifd + 2 + 12 + 4
    data = interop + 2 + 12 + 4
    out = b"II*\0" + struct.pack("<I", ifd0)
    out += struct.pack("<H", 2) + struct.pack("<HHII", 274, 3, 1, 6)
    out += struct.pack("<HHII", 34665, 4, 1, exif_ifd) + struct.pack("<I", 0)
    out += struct.pack("<H", 1) + struct.pack("<HHII", 40965, 4, 1, interop) + struct.pack("<I", 0)
    out += struct.pack("<H", 1) + struct.pack("<HHII", 0x9999, 4, values, data)
    return out + struct.pack("<I", 0) + struct.pack("<I", 7) * values


def test_an_interop_directory_of_millions_of_values_is_refused(tmp_path):
    # Pillow reads the Interop directory when it turns an image by its EXIF orientation: 2
    # million values in a 16 MB PNG took 7.7 s (fourteenth hostile review).
    ordinary = _png_with(exif=_exif_with_a_huge_interop_tag(2))
    assert load_image(ordinary).size == (2, 2)  # turned by 90 degrees: still 2x2
    hostile = _png_with(exif=_exif_with_a_huge_interop_tag(300_000))
    _refused(hostile, r"EXIF data with a TIFF tag \(39321\) of 300,000 values", tmp_path)
