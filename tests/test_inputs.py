"""The one way in: URL policy, deadlines, caps on bytes and pixels, settings, local paths.

Every server here is a real listener on a loopback address; "never contacted" is checked by
the listener itself counting the connections it accepted.
"""

import io
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback import Listener, http_reply  # noqa: E402
from PIL import Image

from florence_helpers import ImageLoadError, TaskInputError, build_prompt, load_image
from florence_helpers.boundary.fetching import check_url, fetch_url, is_public_address
from florence_helpers.boundary.inputs import (
    ForbiddenAddressError,
    InputError,
    InputLimits,
    SettingError,
    check_local_path,
    check_number,
)

LOOPBACK = InputLimits(allowed_hosts=("127.0.0.1",))


def png(width: int = 40, height: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def listeners():
    made = []

    def make(*args, **kwargs) -> Listener:
        made.append(Listener(*args, **kwargs))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


# --- addresses ---------------------------------------------------------------------------------

FORBIDDEN_NETWORKS = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "100.64.0.0/10",  # shared address space (Alibaba's metadata 100.100.100.200)
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "fc00::/7",  # unique local (AWS's IPv6 metadata fd00:ec2::254)
    "fe80::/10",
    "::/128",
    "::/96",  # IPv4-compatible, deprecated: ::10.0.0.1, ::127.0.0.1 (Python calls them global)
    "fec0::/10",  # site-local, deprecated (Python calls it global)
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FORBIDDEN_NETWORKS), st.integers(min_value=0, max_value=2**128 - 1))
def test_no_address_in_a_forbidden_network_counts_as_public(network, offset):
    net = ipaddress.ip_network(network)
    address = net[offset % net.num_addresses]
    assert not is_public_address(address)
    if address.version == 4:  # the same address wrapped in IPv6
        assert not is_public_address(ipaddress.ip_address(f"::ffff:{address}"))
        sixtofour = ipaddress.ip_address((0x2002 << 112) | (int(address) << 80))
        assert not is_public_address(sixtofour)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_no_ipv6_address_outside_global_unicast_is_public_unless_it_carries_a_public_ipv4(value):
    address = ipaddress.IPv6Address(value)
    carries_ipv4 = address.ipv4_mapped is not None or any(
        address in ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96")
    )
    if address not in ipaddress.ip_network("2000::/3") and not carries_ipv4:
        assert not is_public_address(address)


def test_public_addresses_are_public():
    for text in ("93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert is_public_address(ipaddress.ip_address(text)), text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_check_url_refuses_anything_but_http_with_its_own_error(text):
    try:
        parts = check_url(text)
    except InputError:
        return
    assert parts.scheme.lower() in ("http", "https") and parts.hostname


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://user:secret@example.com/a.png",
        "http:///a.png",
        "http://example.com:99999/a.png",
        "http://exa mple.com/a.png",
    ],
)
def test_urls_that_are_never_fetched(url):
    with pytest.raises(InputError):
        check_url(url)


def test_a_loopback_listener_is_never_contacted_directly(listeners):
    target = listeners(reply=lambda path: http_reply("200 OK", png()))
    for url in (target.url + "/a.png", f"http://localhost:{target.port}/a.png"):
        with pytest.raises(ForbiddenAddressError, match="non-public address"):
            fetch_url(url)
    assert target.accepted == 0


def test_a_redirect_to_a_forbidden_address_is_not_followed(listeners):
    hidden = listeners("127.0.0.2", reply=lambda path: http_reply("200 OK", png()))
    ftp = listeners("127.0.0.2", reply=lambda path: b"220 SECRET-FTP ready\r\n")
    targets = {
        "/internal": f"{hidden.url}/a.png",
        "/ftp": f"ftp://127.0.0.2:{ftp.port}/",
        "/metadata": "http://169.254.169.254/latest/meta-data/",
    }
    redirector = listeners(
        reply=lambda path: http_reply("302 Found", Location=targets.get(path, "/"))
    )
    for path in targets:
        with pytest.raises(InputError) as caught:
            fetch_url(redirector.url + path, LOOPBACK)
        assert "SECRET" not in str(caught.value)
    assert hidden.accepted == 0 and ftp.accepted == 0


def test_an_allowed_host_with_a_port_allows_that_port_only(listeners):
    other = listeners(reply=lambda path: http_reply("200 OK", png()))
    targets = {"/other": f"{other.url}/a.png", "/same": "/a.png"}
    served = listeners(
        reply=lambda path: (
            http_reply("200 OK", png())
            if path == "/a.png"
            else http_reply("302 Found", Location=targets[path])
        )
    )
    limits = InputLimits(allowed_hosts=(f"127.0.0.1:{served.port}",))
    assert fetch_url(f"{served.url}/same", limits) == png()
    for url in (f"{other.url}/a.png", f"{served.url}/other", f"http://2130706433:{other.port}/"):
        with pytest.raises(ForbiddenAddressError):
            fetch_url(url, limits)
    assert other.accepted == 0


@pytest.mark.parametrize("entry", ["", "a b", "127.0.0.1:0", "10.0.0.0/8:80", "http://x", 5])
def test_an_allowed_host_that_cannot_be_read_is_refused_when_the_limits_are_made(entry):
    with pytest.raises(SettingError, match="allowed_hosts holds"):
        InputLimits(allowed_hosts=(entry,))


def test_an_allowed_host_is_fetched_and_redirects_within_it_are_followed(listeners):
    served = listeners(
        reply=lambda path: (
            http_reply("200 OK", png())
            if path == "/a.png"
            else http_reply("301 M", Location="/a.png")
        )
    )
    assert fetch_url(served.url + "/old", LOOPBACK) == png()
    assert load_image(served.url + "/old", limits=LOOPBACK).size == (40, 30)
    network = InputLimits(allowed_hosts=("127.0.0.0/8",))
    assert fetch_url(served.url + "/a.png", network) == png()


def test_errors_never_repeat_what_the_remote_said(listeners):
    banner = listeners(reply=lambda path: b"SSH-2.0-SECRET-BANNER\r\n")
    not_found = listeners(reply=lambda path: http_reply("404 SECRET-REASON", b"SECRET-BODY"))
    not_image = listeners(reply=lambda path: http_reply("200 OK", b"\x89PNG SECRET-BYTES"))
    for server in (banner, not_found, not_image):
        with pytest.raises(ImageLoadError) as caught:
            load_image(server.url + "/x.png", limits=LOOPBACK)
        assert "SECRET" not in str(caught.value), str(caught.value)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    with pytest.raises(InputError, match="could not connect") as caught:
        fetch_url(f"http://127.0.0.1:{port}/", LOOPBACK)
    assert "refused" not in str(caught.value).lower()


def test_one_deadline_covers_dripping_headers(listeners):
    drip = listeners(reply=lambda path: http_reply("200 OK", png()), delay=0.2, step=1)
    started = time.monotonic()
    with pytest.raises(InputError, match="more than 1 s"):
        fetch_url(drip.url + "/a.png", InputLimits(timeout=1, allowed_hosts=("127.0.0.1",)))
    assert time.monotonic() - started < 2.5


def test_one_deadline_covers_every_redirect(listeners):
    def slow_redirect(path: str) -> bytes:
        time.sleep(0.4)
        step = int(path.strip("/") or 0) + 1
        return http_reply("302 Found", Location=f"/{step}")

    chain = listeners(reply=slow_redirect)
    limits = InputLimits(timeout=1, allowed_hosts=("127.0.0.1",), max_redirects=20)
    started = time.monotonic()
    with pytest.raises(InputError, match="more than 1 s"):
        fetch_url(chain.url + "/0", limits)
    assert time.monotonic() - started < 2.5
    with pytest.raises(InputError, match="more than 2 redirects"):
        fetch_url(chain.url + "/0", InputLimits(allowed_hosts=("127.0.0.1",), max_redirects=2))


def test_the_byte_cap_holds_with_and_without_a_declared_length(listeners):
    big = b"x" * 300_000
    declared = listeners(reply=lambda path: http_reply("200 OK", big))
    chunks = b"".join(b"%x\r\n" % 50_000 + b"y" * 50_000 + b"\r\n" for _ in range(6))
    chunked = listeners(
        reply=lambda path: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    )
    limits = InputLimits(max_mb=0.1, allowed_hosts=("127.0.0.1",))
    for server in (declared, chunked):
        with pytest.raises(InputError, match="above the 0.1 MB limit"):
            fetch_url(server.url + "/a", limits)


BOMB = """
import io, resource, sys
from PIL import Image
from florence_helpers import ImageLoadError, load_image
buffer = io.BytesIO()
Image.new("1", (13000, 13000)).save(buffer, "PNG")  # a few kB on disk
data = buffer.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image(data)
    print("decoded")
except ImageLoadError as error:
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(data), (after - before) // 1024, error)
"""


def test_a_pixel_bomb_is_refused_from_its_header_with_bounded_memory():
    done = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True, timeout=120)
    size, grown_mb, message = done.stdout.split(" ", 2)
    assert int(size) < 100_000 and "169 megapixels" in message and "max_pixels" in message
    assert int(grown_mb) < 100, done.stdout  # decoding would take 169 MB at least


def test_the_pixel_cap_is_a_setting_and_applies_to_files_and_bytes(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png(400, 300))
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageLoadError, match="0.1 megapixels allowed"):
            load_image(source, max_pixels=100_000)
        assert load_image(source, max_pixels=120_000).size == (400, 300)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timeout": 0}, "timeout must be more than 0"),
        ({"timeout": -1}, "timeout must be more than 0"),
        ({"max_mb": float("nan")}, "max_mb must be a finite number"),
        ({"max_mb": "20"}, "max_mb must be a number, got str"),
        ({"max_pixels": 2.5}, "max_pixels must be a whole number"),
        ({"max_pixels": True}, "max_pixels must be a whole number, got bool"),
        ({"timeout": float("inf")}, "timeout must be a finite number"),
    ],
)
def test_limits_are_checked_for_type_and_range(changes, message):
    with pytest.raises(SettingError, match=message):
        InputLimits(**changes)
    with pytest.raises(SettingError, match=message):
        load_image(png(), **changes)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(),
        st.integers(),
        st.integers(min_value=2**1024, max_value=10**5000).map(lambda n: n * (-1) ** (n % 2)),
        st.text(max_size=5),
    )
)
def test_check_number_accepts_only_finite_numbers_in_range(value):
    try:
        number = check_number(value, "x", minimum=1, maximum=10, integer=True)
    except SettingError:
        return
    assert isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 10


@pytest.mark.parametrize("text", [b"cat", 5, ["a", "b"], 2.5])
def test_text_that_is_not_a_string_is_refused_not_converted(text):
    with pytest.raises(TaskInputError, match="text must be a string"):
        build_prompt("OPEN_VOCABULARY_DETECTION", (10, 10), text=text)


def test_local_paths_stay_inside_the_allowed_folders(tmp_path):
    inside, outside = tmp_path / "allowed", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    (inside / "ok.png").write_bytes(png())
    (inside / "escape.png").symlink_to(outside / "secret.png")
    limits = InputLimits(allowed_folders=(inside,))
    assert load_image(inside / "ok.png", limits=limits).size == (40, 30)
    for path in (
        outside / "secret.png",
        inside / "escape.png",
        inside / ".." / "other" / "secret.png",
        f"file://{outside / 'secret.png'}",
    ):
        with pytest.raises(ImageLoadError, match="outside the folders"):
            load_image(path, limits=limits)
    with pytest.raises(InputError, match="reads no local files"):
        check_local_path(inside / "ok.png", InputLimits(allowed_folders=()))
    assert check_local_path("~/x.png") == Path(os.path.expanduser("~/x.png"))


# --- cases from a hostile review ----------------------------------------------------------


def test_a_dripping_tls_handshake_ends_at_the_deadline(listeners):
    """TLS moves the socket's descriptor into the TLS socket; the watchdog still ends it."""
    record = b"\x16\x03\x03\x40\x00" + b"\x02" * 200  # a handshake record that never ends
    drip = listeners(reply=lambda path: record, delay=0.2, step=1)
    limits = InputLimits(timeout=1, allowed_hosts=("127.0.0.1",))
    started = time.monotonic()
    with pytest.raises(InputError, match="more than 1 s"):
        fetch_url(f"https://127.0.0.1:{drip.port}/a.png", limits)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::7f00:1",
        "64:ff9b:1::808:808",
        "::ffff:0:a00:1",
    ],
)
def test_nat64_and_translated_forms_of_private_addresses_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))
    assert is_public_address(ipaddress.ip_address("64:ff9b::808:808"))  # 8.8.8.8


def test_a_url_path_beyond_ascii_is_fetched_percent_encoded(listeners):
    seen = []
    server = listeners(reply=lambda path: seen.append(path) or http_reply("200 OK", png()))
    assert fetch_url(f"{server.url}/café.png?q=ü", LOOPBACK) == png()
    assert seen == ["/caf%C3%A9.png?q=%C3%BC"]
    with pytest.raises(InputError, match="not valid Unicode"):
        fetch_url(f"{server.url}/\udcff.png", LOOPBACK)


def test_text_with_bytes_that_are_not_utf8_is_refused_clearly():
    with pytest.raises(TaskInputError, match="not valid Unicode"):
        build_prompt("OPEN_VOCABULARY_DETECTION", (10, 10), text="caf\udce9")


def repeated_scans(count: int) -> bytes:
    """A small progressive JPEG whose last scan is repeated ``count`` times: every scan is
    another pass over every pixel (libjpeg only warns about the bogus progression)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # up to the end-of-image marker
    return data[:-2] + scan * count + b"\xff\xd9"


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    with pytest.raises(ImageLoadError, match="more than 64 progressive scans"):
        load_image(repeated_scans(2000))
    assert load_image(repeated_scans(3)).size == (64, 64)  # an ordinary progressive JPEG


def rle8_bmp(side: int) -> bytes:
    """A ``side`` x ``side`` RLE8 BMP of a few bytes per row: one pixel, then end-of-line."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    pixels = b"\x01\x07\x00\x00" * side + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


@pytest.mark.parametrize(
    "data",
    [
        b"P2\n1 1\n255\n" + b"#\n" * 500_000 + b"0\n",  # plain PGM: comments cost quadratic time
        b"P5\n2000 2000\n254\n" + bytes(2000 * 2000),  # maximum not 255: a per-sample loop
        rle8_bmp(4000),  # 18 kB, 16 MP: a per-pixel loop
    ],
    ids=["plain-pgm-of-comments", "pgm-of-maximum-254", "rle8-bmp"],
)
def test_images_that_pillow_decodes_in_python_are_refused_before_decoding(data):
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="decodes this kind of .* in Python"):
        load_image(data)
    assert time.monotonic() - started < 5  # the header only (decoding took 2-38 s)


@pytest.mark.parametrize("mode, maximum", [("L", 255), ("I;16", 65535), ("RGB", 255)])
def test_ordinary_pnm_and_bmp_files_still_load(mode, maximum):
    for kind in ("PPM", "BMP") if mode != "I;16" else ("PPM",):
        buffer = io.BytesIO()
        Image.new(mode, (8, 4), 7).save(buffer, kind)
        assert load_image(buffer.getvalue()).size == (8, 4), (mode, kind)


def test_formats_outside_the_decoded_ones_are_refused_before_their_decoder_runs(tmp_path):
    # An ICO whose directory says 16x16 and whose PNG inside is 13000x13000: Pillow decodes
    # it while opening; it must never get that far.
    inner = png(1, 1)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack(
        "<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22
    )
    for data in (ico + inner, b"DDS " + b"\x00" * 124):
        with pytest.raises(ImageLoadError, match="not a picture in a format this package decodes"):
            load_image(data)


def test_a_fifo_named_like_an_image_is_refused_at_once(tmp_path):
    fifo = tmp_path / "trap.jpg"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
    assert time.monotonic() - started < 5


def test_damaged_exif_is_an_image_error_not_a_crash(tmp_path):
    # EXIF saying "rotated", with XResolution stored as text where a fraction belongs:
    # turning the image upright rewrites the EXIF, and Pillow trips over it.
    entries = struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", 6, 0)
    entries += struct.pack("<HHI", 0x011A, 2, 4) + b"abc\x00"
    exif = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + b"\x00" * 4
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12)).save(buffer, "WEBP", exif=b"Exif\x00\x00" + exif)
    try:
        result = load_image(buffer.getvalue())
    except ImageLoadError as error:
        assert "EXIF" in str(error)
    else:
        assert result.size == (12, 16)  # read and turned upright


def test_a_nul_in_a_path_is_a_clear_error():
    with pytest.raises(ImageLoadError, match="NUL"):
        load_image("images/cat\x00.jpg")


def test_the_allowed_folder_is_checked_on_the_opened_file(tmp_path, monkeypatch):
    """A link swapped after the path's check still cannot lead outside: the check is repeated
    on the file that was opened."""
    from florence_helpers.boundary import images

    inside, outside = tmp_path / "allowed", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    (inside / "ok.png").write_bytes(png())
    real_allowed = images._allowed

    def swap_after_the_check(path, limits):
        checked = real_allowed(path, limits)
        os.remove(inside / "ok.png")
        os.symlink(outside / "secret.png", inside / "ok.png")  # the swap
        images._allowed = real_allowed
        return checked

    monkeypatch.setattr(images, "_allowed", swap_after_the_check)
    with pytest.raises(ImageLoadError, match="outside the folders"):
        load_image(inside / "ok.png", limits=InputLimits(allowed_folders=(inside,)))


def _tiled_tiff(tile: int) -> bytes:
    """A 1x1 RGB TIFF stored as one deflate tile of tile x tile pixels (all zero)."""
    import zlib

    body = zlib.compress(bytes(tile * tile * 3), 9)
    tags = [  # (tag, type, count, value); type 3 SHORT, 4 LONG
        (256, 4, 1, 1), (257, 4, 1, 1), (258, 3, 3, None), (259, 3, 1, 8), (262, 3, 1, 2),
        (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile),
        (324, 4, 1, 8), (325, 4, 1, len(body)),
    ]  # fmt: skip
    pad = len(body) % 2
    ifd = 8 + len(body) + pad
    bits_at = ifd + 2 + 12 * len(tags) + 4
    data = b"II*\0" + struct.pack("<I", ifd) + body + b"\0" * pad
    data += struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        if value is None:
            data += struct.pack("<HHII", tag, kind, count, bits_at)
        elif kind == 3:
            data += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            data += struct.pack("<HHII", tag, kind, count, value)
    return data + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8)


def test_a_tiff_whose_tile_is_larger_than_the_pixel_cap_is_refused_from_its_header():
    # The decoder allocates a whole tile: a 2 MB file of one 26736x26736 tile took 2.3 GB.
    bomb = _tiled_tiff(64)
    with pytest.raises(ImageLoadError, match="TIFF tiles are 64x64 pixels"):
        load_image(bomb, limits=InputLimits(max_pixels=64 * 64 - 1))
    assert load_image(bomb, limits=InputLimits(max_pixels=64 * 64)).size == (1, 1)


def test_a_file_name_too_long_to_open_is_an_image_error(tmp_path):
    with pytest.raises(ImageLoadError, match="File name too long"):
        load_image(tmp_path / ("x" * 300 + ".png"))


@pytest.mark.parametrize(
    "source",
    [
        "~no_such_user_f2/cat.png",
        "file:///tmp/a%00b.png",
        "file:///~no_such_user_f2/x",
        "file://[/x.png",
        "file://a]b/x.png",
    ],
)
@pytest.mark.parametrize("folders", [None, ("/tmp",)])
def test_odd_local_paths_are_image_load_errors(source, folders):
    with pytest.raises(ImageLoadError):
        load_image(source, limits=InputLimits(allowed_folders=folders))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.sampled_from([None, (), ("/tmp",)]))
def test_any_local_path_is_a_path_or_an_input_error(text, folders):
    try:
        path = check_local_path(text, InputLimits(allowed_folders=folders))
    except InputError:
        return
    assert isinstance(path, Path)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_any_file_url_is_an_image_or_an_image_load_error(text):
    try:
        load_image("file://" + text)
    except ImageLoadError:
        pass


def test_read_file_reads_only_a_regular_file_of_bounded_size(tmp_path):
    from florence_helpers.boundary.inputs import InputError, read_file

    data = tmp_path / "data.json"
    data.write_bytes(b"{}")
    assert read_file(data) == b"{}"
    assert read_file(data, max_bytes=2) == b"{}"
    with pytest.raises(InputError, match=r"holds 3 bytes, more than the 2 bytes read at most"):
        data.write_bytes(b"{ }")
        read_file(data, max_bytes=2)
    link = tmp_path / "link.json"
    link.symlink_to(data)
    assert read_file(link) == b"{ }"
    with pytest.raises(InputError, match=r"link\.json: it is a symbolic link"):
        read_file(link, follow_links=False)
    with pytest.raises(InputError, match=r"it is a directory"):
        read_file(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"File not found: .*missing\.json"):
        read_file(tmp_path / "missing.json")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match=r"fifo: it is not a regular file"):
        read_file(tmp_path / "fifo")
    with open(tmp_path / "sparse", "wb") as handle:
        handle.truncate(2**40)
    with pytest.raises(InputError, match=r"holds 1024.0 GiB, more than the 1.0 GiB"):
        read_file(tmp_path / "sparse")
