"""Tests for fewshot_studio.imageio: safe decoding of untrusted uploads and zips."""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import stat
import struct
import unicodedata
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from fewshot_studio import imageio
from fewshot_studio.errors import FewShotError
from fewshot_studio.imageio import (
    ImageError,
    ZipMember,
    content_hash,
    decode_image,
    probe_image,
    read_bytes,
    read_zip,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# ----------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color=RED, size=(8, 6), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w×h (1-bit greyscale) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def tiff_header_only(w: int, h: int) -> bytes:
    """A minimal uncompressed 8-bit greyscale TIFF claiming w×h, without its pixel data."""
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, h), (279, 4, w * h % 2**32)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag, typ, val in tags:
        if tag == 273:
            val = data_offset
        value = struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val)
        out += struct.pack("<HHI", tag, typ, 1) + value
    return out + struct.pack("<I", 0) + b"\0" * 16


def jpeg_with_sof_size(w: int, h: int) -> bytes:
    data = bytearray(encode(solid(RED, (16, 16)), "JPEG"))
    i = data.index(b"\xff\xc0\x00\x11")  # baseline SOF0, 3 components
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def assert_one_sentence(err: ImageError, name: str) -> None:
    msg = str(err)
    assert msg == f"{err.name}: {err.reason}"
    assert msg.startswith(f"{name}: ")
    assert msg.endswith(".")
    assert "\n" not in msg
    assert not re.search(r"[.!?]\s+[A-Z]", msg), msg  # no second sentence


def decode_error(data: bytes, name: str) -> ImageError:
    with pytest.raises(ImageError) as ei:
        decode_image(data, name)
    assert_one_sentence(ei.value, name)
    return ei.value


@pytest.fixture
def no_bomb_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not bombs, [str(w.message) for w in bombs]


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test (proves checks are header-only)."""

    def boom(self, *a, **k):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


# ----------------------------------------------------------------- basics


def test_error_type_and_message_format():
    e = ImageError("cat.jpg", "the file is truncated or corrupt")
    assert isinstance(e, FewShotError)
    assert e.name == "cat.jpg" and e.reason == "the file is truncated or corrupt."
    assert str(e) == "cat.jpg: the file is truncated or corrupt."
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.name == "cat.jpg"
    assert "\n" not in str(ImageError("evil\nname.jpg", "bad."))


def test_content_hash_is_sha256():
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_limits_are_documented_and_sane():
    assert imageio.MAX_PIXELS == 100_000_000
    assert 64_000_000 < imageio.MAX_PIXELS < 200_000_000
    assert imageio.MAX_FILE_BYTES == 100 * 2**20
    assert imageio.MAX_ZIP_MEMBERS == 10_000
    assert imageio.MAX_ZIP_TOTAL_BYTES == 2 * 2**30
    assert imageio.MAX_ZIP_RATIO == 200


# ----------------------------------------------------------------- non-images


def test_random_bytes_named_jpg_rejected():
    data = random.Random(0).randbytes(5000)
    e = decode_error(data, "photo.jpg")
    assert "not a recognised image" in e.reason


def test_plain_text_named_jpg_rejected():
    e = decode_error(b"hello, this is not a picture\n" * 10, "notes.jpg")
    assert "plain text" in e.reason


def test_html_rejected():
    html = b"<!DOCTYPE html>\n<html><head><title>Cat</title></head><body><img src=cat.jpg></body></html>"
    e = decode_error(html, "cat.jpg")
    assert "not an image" in e.reason and "HTML" in e.reason


def test_svg_rejected():
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    e = decode_error(svg, "logo.png")
    assert "SVG" in e.reason
    e = decode_error(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "logo2.svg")
    assert "SVG" in e.reason


def test_pdf_and_zip_rejected():
    assert "PDF" in decode_error(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "scan.png").reason
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "x")
    assert "zip archive" in decode_error(buf.getvalue(), "photos.jpg").reason


def test_empty_file_rejected(tmp_path):
    e = decode_error(b"", "empty.png")
    assert "empty" in e.reason
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty\.jpg: the file is empty\.$"):
        read_bytes(p)
    with pytest.raises(ImageError, match="empty"):
        decode_image(*read_bytes(p))


def test_truncated_jpeg_rejected():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(im, "JPEG", quality=90)
    decode_image(data, "whole.jpg")  # sanity: the untruncated file is fine
    e = decode_error(data[: len(data) // 2], "x.jpg")
    assert str(e) == "x.jpg: the file is truncated or corrupt."
    # Cut inside the header too.
    e = decode_error(data[:3], "y.jpg")
    assert "truncated or corrupt" in e.reason


def test_truncated_and_corrupt_png_rejected():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    data = encode(im, "PNG")
    assert "truncated or corrupt" in decode_error(data[: len(data) - 300], "t.png").reason
    bad = bytearray(data)
    bad[20] ^= 0xFF  # corrupt IHDR (CRC no longer matches)
    assert "truncated or corrupt" in decode_error(bytes(bad), "c.png").reason


def test_mutated_files_only_ever_raise_image_error():
    rng = random.Random(1234)
    im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    seeds = [encode(im, "PNG"), encode(im, "JPEG"), encode(im.convert("P"), "GIF"), encode(im, "BMP")]
    for n in range(60):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            out = decode_image(bytes(data), f"m{n}.img")
        except ImageError as e:
            assert_one_sentence(e, f"m{n}.img")
        else:
            assert out.mode == "RGB"


# ----------------------------------------------------------------- size limits


def test_decompression_bomb_png_rejected_from_header(no_bomb_warnings, no_pixel_decoding):
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 200
    e = decode_error(bomb, "bomb.png")
    assert "30000×30000" in e.reason and "900.0 megapixels" in e.reason and "100-megapixel limit" in e.reason
    with pytest.raises(ImageError, match="30000×30000"):
        probe_image(bomb, "bomb.png")


def test_large_bilevel_png_bomb_rejected(no_bomb_warnings):
    # A real 1-bit image of 11000×10000 (110 MP) compresses to a few kilobytes.
    data = encode(Image.new("1", (11000, 10000), 0), "PNG", optimize=False)
    assert len(data) < 1_000_000
    e = decode_error(data, "big.png")
    assert e.reason == "the image is 11000×10000 pixels (110.0 megapixels), above the 100-megapixel limit."


def test_huge_dimensions_rejected_for_every_header_path(no_bomb_warnings, no_pixel_decoding):
    # JPEG SOF, GIF screen descriptor: our own header parser.
    assert "60000×60000" in decode_error(jpeg_with_sof_size(60000, 60000), "huge.jpg").reason
    gif = bytearray(encode(solid(RED, (4, 4)).convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", 20000, 20000)
    assert "20000×20000" in decode_error(bytes(gif), "huge.gif").reason
    # TIFF: Pillow's header reader; its DecompressionBombError must become ours.
    e = decode_error(tiff_header_only(20000, 20000), "huge.tif")
    assert "400.0 megapixels" in e.reason and "100-megapixel limit" in e.reason
    # Between Pillow's warning and error thresholds: no warning, our message with the size.
    e = decode_error(tiff_header_only(11000, 10000), "big.tif")
    assert "11000×10000" in e.reason


def test_pillow_warning_range_accepted_without_warning(no_bomb_warnings, no_pixel_decoding):
    # 9500×9500 = 90.25 MP: above Pillow's default warning threshold, below our cap.
    assert 9500 * 9500 > Image.MAX_IMAGE_PIXELS
    assert probe_image(png_header_only(9500, 9500), "ok.png") == ("PNG", (9500, 9500))
    assert probe_image(tiff_header_only(9500, 9500), "ok.tif") == ("TIFF", (9500, 9500))


def test_64_megapixel_image_accepted():
    im = Image.new("L", (8000, 8000), 77)
    im.putpixel((7999, 7999), 200)
    data = encode(im, "PNG", compress_level=1)
    out = decode_image(data, "phone.png")
    assert out.size == (8000, 8000) and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (77, 77, 77)
    assert out.getpixel((7999, 7999)) == (200, 200, 200)


def test_file_size_limit(monkeypatch, tmp_path):
    data = encode(solid(RED, (32, 32)), "BMP")
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(ImageError, match=r"^big\.bmp: the file is .* MiB, above the .* MiB limit\.$"):
        decode_image(data, "big.bmp")
    with pytest.raises(ImageError, match="above"):
        read_bytes(data, "big.bmp")
    p = tmp_path / "big.bmp"
    p.write_bytes(data)
    with pytest.raises(ImageError, match=r"^big\.bmp: .*above"):
        read_bytes(p)
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", len(data))
    assert read_bytes(p) == (data, "big.bmp")


# ----------------------------------------------------------------- frames


def test_animated_gif_uses_first_frame():
    frames = [solid(c, (10, 10)) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, "anim.gif")
    assert out.mode == "RGB" and out.size == (10, 10)
    assert out.getpixel((5, 5)) == RED


def test_apng_uses_first_frame():
    frames = [solid(c, (10, 10)) for c in (GREEN, BLUE)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data, "anim.png").getpixel((3, 3)) == GREEN


def test_animated_webp_uses_first_frame():
    frames = [solid(c, (10, 10)) for c in (BLUE, RED)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data, "anim.webp").getpixel((3, 3)) == BLUE


def test_multipage_tiff_uses_first_page():
    pages = [solid(c, (12, 9)) for c in (RED, GREEN, BLUE)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, "scan.tiff")
    assert out.size == (12, 9) and out.getpixel((0, 0)) == RED


# ----------------------------------------------------------------- modes


def test_cmyk_jpeg_converted_to_rgb():
    data = encode(solid((0, 255, 255, 0), (16, 16), "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, "print.jpg")
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_scaled_not_clipped():
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    out = decode_image(data, "depth.png")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_32bit_int_and_float_tiff_scaled():
    ints = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    out = decode_image(encode(ints, "TIFF"), "i32.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    out = decode_image(encode(floats, "TIFF"), "f32.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency_composited_on_white():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    data = encode(im, "PNG", transparency=0)
    reread = Image.open(io.BytesIO(data))
    assert reread.mode == "P" and "transparency" in reread.info
    out = decode_image(data, "icon.png")
    assert out.getpixel((0, 0)) == WHITE  # transparent black -> white
    assert out.getpixel((1, 0)) == RED


def test_palette_gif_with_transparency():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    out = decode_image(encode(im, "GIF", transparency=0), "t.gif")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == BLUE


def test_rgba_and_la_alpha_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    out = decode_image(encode(rgba, "PNG"), "rgba.png")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == RED
    r, g, b = out.getpixel((2, 0))
    assert r == 255 and 124 <= g <= 130 and g == b

    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (0, 128)])
    data = encode(la, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = decode_image(data, "la.png")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == BLACK
    assert 124 <= out.getpixel((2, 0))[0] <= 130


def test_bilevel_and_greyscale():
    bw = Image.new("1", (4, 2), 0)
    bw.putpixel((1, 0), 1)
    out = decode_image(encode(bw, "PNG"), "bw.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == BLACK and out.getpixel((1, 0)) == WHITE
    out = decode_image(encode(bw, "TIFF", compression="group4"), "fax.tif")
    assert out.getpixel((1, 0)) == WHITE

    grey = Image.new("L", (3, 3), 90)
    for fmt in ("PNG", "JPEG", "PPM"):
        out = decode_image(encode(grey, fmt), f"grey.{fmt.lower()}")
        r, g, b = out.getpixel((1, 1))
        assert out.mode == "RGB" and r == g == b and abs(r - 90) <= 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_one_by_one_images_are_valid(fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(solid(BLUE, (1, 1)), fmt, **kw)
    out = decode_image(data, f"dot.{fmt.lower()}")
    assert out.size == (1, 1) and out.mode == "RGB"
    r, g, b = out.getpixel((0, 0))
    assert b > 230 and r < 25 and g < 25
    assert probe_image(data, "dot")[1] == (1, 1)


def test_webp_lossy_and_lossless():
    im = solid(GREEN, (20, 10))
    for kw in ({"lossless": True}, {"quality": 90}):
        data = encode(im, "WEBP", **kw)
        assert probe_image(data, "g.webp") == ("WEBP", (20, 10))
        r, g, b = decode_image(data, "g.webp").getpixel((10, 5))
        assert g > 240 and r < 15 and b < 15


# ----------------------------------------------------------------- EXIF, draft


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(im, "JPEG", exif=exif, quality=95)
    assert probe_image(data, "phone.jpg") == ("JPEG", (40, 20))  # header size as stored
    out = decode_image(data, "phone.jpg")
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # left side of the stored image is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert 0x0112 not in out.getexif()  # not applied twice by a later exif_transpose


def test_draft_size_decodes_big_jpeg_at_reduced_scale():
    im = Image.new("RGB", (2000, 1500), GREEN)
    data = encode(im, "JPEG", quality=80)
    assert decode_image(data, "big.jpg").size == (2000, 1500)
    small = decode_image(data, "big.jpg", draft_size=224)
    assert small.mode == "RGB"
    assert small.size[0] < 2000 and min(small.size) >= 224
    assert small.size == (500, 375)
    assert decode_image(data, "big.jpg", draft_size=1400).size == (2000, 1500)  # never below the hint
    assert decode_image(encode(im, "PNG"), "big.png", draft_size=224).size == (2000, 1500)  # JPEG only
    with pytest.raises(ValueError):
        decode_image(data, "big.jpg", draft_size=0)


# ----------------------------------------------------------------- reading


def test_extension_lies_are_ignored(tmp_path):
    data = encode(solid(RED, (5, 4)), "PNG")
    assert probe_image(data, "photo.jpg") == ("PNG", (5, 4))
    assert decode_image(data, "photo.jpg").getpixel((0, 0)) == RED
    p = tmp_path / "photo.jpg"
    p.write_bytes(data)
    assert decode_image(*read_bytes(p)).size == (5, 4)
    assert decode_image(*read_bytes(str(p)), draft_size=2).size == (5, 4)


def test_read_bytes_paths_and_errors(tmp_path):
    data = encode(solid(), "PNG")
    p = tmp_path / "sub" / "a.png"
    p.parent.mkdir()
    p.write_bytes(data)
    assert read_bytes(p) == (data, "a.png")
    assert read_bytes(str(p), "shown.png") == (data, "shown.png")
    assert read_bytes(data) == (data, "image")
    assert read_bytes(bytearray(data), "b.png") == (data, "b.png")
    with pytest.raises(ImageError, match=r"^missing\.png: the file does not exist\.$"):
        read_bytes(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"^sub: this is a folder"):
        read_bytes(tmp_path / "sub")
    with pytest.raises(TypeError):
        read_bytes(123)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_read_bytes_refuses_special_files(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        read_bytes(fifo)  # must not block


# ----------------------------------------------------------------- zips


def make_zip(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """entries: list of (name or ZipInfo, bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def patch_central(data: bytes, name: str, *, flag_or=0, usize=None) -> bytes:
    """Patch the central-directory (and local) header of entry `name`."""
    out = bytearray(data)
    encoded = name.encode()
    c = 0
    while True:
        c = out.index(b"PK\x01\x02", c)
        nlen = struct.unpack("<H", out[c + 28 : c + 30])[0]
        if out[c + 46 : c + 46 + nlen] == encoded:
            break
        c += 4
    local = struct.unpack("<I", out[c + 42 : c + 46])[0]
    if flag_or:
        for off in (c + 8, local + 6):
            struct.pack_into("<H", out, off, struct.unpack("<H", out[off : off + 2])[0] | flag_or)
    if usize is not None:
        struct.pack_into("<I", out, c + 24, usize)
        struct.pack_into("<I", out, local + 22, usize)
    return bytes(out)


PNG_BYTES = encode(solid(RED, (4, 4)), "PNG")


def test_zip_good_members_with_sanitized_paths():
    cafe_nfd = unicodedata.normalize("NFD", "café")
    data = make_zip([
        ("red circle/", b""),
        ("red circle/001.png", PNG_BYTES),
        ("blue/002.png", b"not checked here"),
        ("./blue//003.png", PNG_BYTES),
        ("green\\004.png", PNG_BYTES),
        (f"{cafe_nfd}/ünï 😀.png", PNG_BYTES),
        ("top.png", PNG_BYTES),
        ("__MACOSX/red circle/._001.png", b"junk"),
        (".DS_Store", b"junk"),
        ("blue/.hidden.png", PNG_BYTES),
        ("blue/Thumbs.db", b"junk"),
        (".git/config", b"junk"),
    ])
    members, errors = read_zip(data, "classes.zip")
    assert errors == []
    assert all(isinstance(m, ZipMember) for m in members)
    assert [m.path for m in members] == [
        ("red circle", "001.png"),
        ("blue", "002.png"),
        ("blue", "003.png"),
        ("green", "004.png"),
        ("café", "ünï 😀.png"),
        ("top.png",),
    ]
    assert members[4].path[0] == unicodedata.normalize("NFC", "café")
    assert members[0].data == PNG_BYTES and members[1].data == b"not checked here"
    assert members[0].name == "red circle/001.png"
    assert decode_image(members[0].data, members[0].name).getpixel((0, 0)) == RED


def test_zip_from_path(tmp_path):
    p = tmp_path / "set.zip"
    p.write_bytes(make_zip([("a/1.png", PNG_BYTES)]))
    members, errors = read_zip(p)
    assert [m.path for m in members] == [("a", "1.png")] and not errors
    with pytest.raises(ImageError, match=r"^nope\.zip: the file does not exist\.$"):
        read_zip(tmp_path / "nope.zip")


def test_zip_traversal_absolute_and_drive_rejected():
    bad = ["../evil.png", "a/../../evil.png", "..\\..\\evil.png", "/etc/passwd", "\\\\server\\share\\x.png",
           "C:/x.png", "C:\\Windows\\x.png", "d:x.png"]
    data = make_zip([(n, PNG_BYTES) for n in bad] + [("ok/1.png", PNG_BYTES)])
    members, errors = read_zip(data, "up.zip")
    assert [m.path for m in members] == [("ok", "1.png")]
    assert len(errors) == len(bad)
    for name, e in zip(bad, errors):
        assert e.name == f"{name} (in up.zip)"
        assert_one_sentence(e, e.name)
    assert "'..'" in errors[0].reason and "'..'" in errors[2].reason
    assert "absolute" in errors[3].reason and "absolute" in errors[4].reason
    assert all("drive letter" in e.reason for e in errors[5:])


def test_zip_long_name_rejected_unicode_ok():
    long_part = "é" * 128 + ".png"  # 260 bytes in UTF-8
    ok_part = "é" * 120 + ".png"  # 244 bytes
    members, errors = read_zip(make_zip([(f"c/{long_part}", PNG_BYTES), (f"c/{ok_part}", PNG_BYTES)]))
    assert [m.path for m in members] == [("c", ok_part)]
    assert len(errors) == 1 and "255 bytes" in errors[0].reason


def test_zip_symlink_rejected():
    link = zipfile.ZipInfo("cls/link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    members, errors = read_zip(make_zip([(link, b"/etc/passwd"), ("cls/real.png", PNG_BYTES)]), "s.zip")
    assert [m.path for m in members] == [("cls", "real.png")]
    assert len(errors) == 1 and errors[0].name == "cls/link.png (in s.zip)"
    assert "symbolic link" in errors[0].reason


def test_zip_nested_archive_rejected():
    inner = make_zip([("x/1.png", PNG_BYTES)])
    members, errors = read_zip(make_zip([("cls/more.zip", inner), ("cls/sneaky.png", inner), ("cls/1.png", PNG_BYTES)]))
    assert [m.path for m in members] == [("cls", "1.png")]
    assert len(errors) == 2
    assert all("nested archives are not supported" in e.reason for e in errors)
    assert errors[1].name.startswith("cls/sneaky.png")  # judged by content, not name


def test_zip_ratio_bomb_rejected():
    zeros = b"\0" * (20 * 2**20)
    data = make_zip([("cls/bomb.png", zeros), ("cls/1.png", PNG_BYTES)])
    assert len(data) < 100_000
    members, errors = read_zip(data)
    assert [m.path for m in members] == [("cls", "1.png")]
    assert len(errors) == 1 and "zip bomb" in errors[0].reason and errors[0].name.startswith("cls/bomb.png")
    # Highly compressible but small (<1 MiB) entries are fine.
    members, errors = read_zip(make_zip([("cls/blank.bmp", b"\0" * 500_000)]))
    assert len(members) == 1 and not errors


def test_zip_size_limits(monkeypatch):
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 1000)
    members, errors = read_zip(make_zip([("c/big.png", os.urandom(2000)), ("c/1.png", PNG_BYTES)]))
    assert [m.path for m in members] == [("c", "1.png")]
    assert len(errors) == 1 and "per-file limit" in errors[0].reason
    monkeypatch.undo()

    monkeypatch.setattr(imageio, "MAX_ZIP_TOTAL_BYTES", 2 * len(PNG_BYTES) + 10)
    members, errors = read_zip(make_zip([(f"c/{i}.png", PNG_BYTES) for i in range(4)]))
    assert len(members) == 2 and len(errors) == 2
    assert all("in total" in e.reason for e in errors)


def test_zip_member_count_limit(monkeypatch):
    monkeypatch.setattr(imageio, "MAX_ZIP_MEMBERS", 3)
    junk = [("__MACOSX/._a", b"x"), (".DS_Store", b"x"), ("c/", b"")]
    members, errors = read_zip(make_zip(junk + [(f"c/{i}.png", b"x") for i in range(3)]))
    assert len(members) == 3  # junk and folders don't count
    with pytest.raises(ImageError, match=r"^many\.zip: the archive holds 4 files, above the 3-file limit\.$"):
        read_zip(make_zip([(f"c/{i}.png", b"x") for i in range(4)]), "many.zip")


def test_zip_lying_header_cannot_inflate():
    payload = b"\0" * (5 * 2**20)
    data = make_zip([("c/liar.png", payload), ("c/1.png", PNG_BYTES)])
    data = patch_central(data, "c/liar.png", usize=1000)  # claims 1000 bytes, holds 5 MiB
    members, errors = read_zip(data)
    assert [m.path for m in members] == [("c", "1.png")]
    assert len(errors) == 1 and "corrupt" in errors[0].reason


def test_zip_encrypted_member_rejected():
    data = patch_central(make_zip([("c/secret.png", PNG_BYTES), ("c/1.png", PNG_BYTES)]), "c/secret.png", flag_or=1)
    members, errors = read_zip(data, "locked.zip")
    assert [m.path for m in members] == [("c", "1.png")]
    assert len(errors) == 1 and "encrypted" in errors[0].reason
    assert errors[0].name == "c/secret.png (in locked.zip)"


def test_zip_corrupt_member_reported():
    data = bytearray(make_zip([("c/a.png", PNG_BYTES)], compression=zipfile.ZIP_STORED))
    i = data.index(PNG_BYTES)
    data[i + 10] ^= 0xFF  # CRC mismatch
    members, errors = read_zip(bytes(data))
    assert members == [] and len(errors) == 1 and "corrupt" in errors[0].reason


def test_not_a_zip_or_corrupt_zip_raises():
    with pytest.raises(ImageError, match=r"^photo\.zip: the file is not a zip archive\.$"):
        read_zip(PNG_BYTES, "photo.zip")
    with pytest.raises(ImageError, match=r"^page\.zip: .*not a zip archive.*HTML"):
        read_zip(b"<html><body>404</body></html>", "page.zip")
    good = make_zip([("c/1.png", PNG_BYTES)])
    with pytest.raises(ImageError, match=r"^cut\.zip: the zip archive is truncated or corrupt\.$"):
        read_zip(good[: len(good) // 2], "cut.zip")
    with pytest.raises(ImageError, match="empty"):
        read_zip(b"", "e.zip")
