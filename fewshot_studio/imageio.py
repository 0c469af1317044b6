"""Safe reading, validation and decoding of UNTRUSTED image uploads and zip archives.

Every upload is treated as hostile:

* A file's type is judged by its content (magic bytes, then Pillow restricted to a
  whitelist of ordinary raster formats), never by its extension.  Text, HTML, SVG,
  PDF, archives, random bytes, empty, truncated and corrupt files are rejected with
  an :class:`ImageError` whose ``str()`` is one sentence naming the file and the reason.
* Decompression bombs: the pixel count is checked from the *header* (our own parser
  for PNG/JPEG/GIF/BMP/WebP, then Pillow's lazy ``Image.open``) before any pixel is
  decoded.  The limit is :data:`MAX_PIXELS` (100 megapixels: ordinary 64 MP photos
  pass; 30000×30000 "bombs" do not).  Pillow's own ``DecompressionBombError`` is
  converted to :class:`ImageError` and its ``DecompressionBombWarning`` is silenced
  (our limit replaces it).  Files above :data:`MAX_FILE_BYTES` are rejected unread.
* Animated / multi-frame files (GIF, APNG, multi-page TIFF, animated WebP) give their
  first frame.
* Every mode is converted to 8-bit RGB: CMYK, palette (with transparency), 16-bit
  and 32-bit greyscale (scaled, not clipped), float, bilevel, greyscale; alpha is
  composited on white.  EXIF orientation is applied.
* JPEGs can be decoded at reduced scale (``draft_size``) when the caller will
  downscale anyway.

Zip archives of ``class_name/image`` folders are read one entry at a time by
:class:`ZipReader` (never extracted to disk; :func:`read_zip` reads all) with limits on entry count, sizes and compression
ratio, and rejection of path traversal, absolute paths, symlinks, nested archives
and encrypted entries.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import unicodedata
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FewShotError

__all__ = [
    "MAX_PIXELS",
    "MAX_FILE_BYTES",
    "MAX_ZIP_MEMBERS",
    "MAX_ZIP_TOTAL_BYTES",
    "MAX_ZIP_RATIO",
    "ImageError",
    "ZipMember",
    "content_hash",
    "read_bytes",
    "decode_image",
    "probe_image",
    "read_zip",
    "ZipReader",
]

#: Largest accepted image, in pixels (width × height), checked from the header before
#: decoding.  100 MP accepts every ordinary photo (64 MP phones, 61 MP full-frame
#: cameras) while refusing decompression bombs; a decoded 100 MP RGB image is 300 MB.
MAX_PIXELS = 100_000_000
#: Largest accepted file, in bytes (100 MiB).
MAX_FILE_BYTES = 100 * 2**20
#: Most entries (files, not counting folders and junk) a zip archive may hold.
MAX_ZIP_MEMBERS = 10_000
#: Largest total uncompressed size of a zip archive's accepted entries (2 GiB).
MAX_ZIP_TOTAL_BYTES = 2 * 2**30
#: Largest uncompressed/compressed ratio of a zip entry bigger than 1 MiB.
MAX_ZIP_RATIO = 200
_RATIO_MIN_BYTES = 2**20
_MAX_NAME_PART_BYTES = 255

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]

# Pillow plugins we let near untrusted bytes: ordinary raster formats only.  Formats
# Pillow merely recognises loosely (TGA), or that run external programs (EPS), never
# get a look in.
_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")
Image.init()  # JPEG's factory also yields MPO (multi-picture) files; AVIF only if built in
_FORMATS = tuple(f for f in _FORMATS if f in Image.OPEN)
_SUPPORTED_TEXT = "JPEG, PNG, GIF, WebP, BMP or TIFF"


class ImageError(FewShotError):
    """One file (or archive entry) that cannot be used; ``str()`` is ``"{name}: {reason}"``.

    ``name`` is the file's display name and ``reason`` one clear clause ending in a full
    stop, e.g. ``"cat.jpg: the file is not an image (it looks like HTML text)."``.
    """

    def __init__(self, name: str, reason: str):
        name = _clean_display(str(name)) or "file"
        reason = reason.strip()
        if reason and reason[-1] not in ".!?":
            reason += "."
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")

    def __reduce__(self):  # keep picklable despite the two-argument constructor
        return (type(self), (self.name, self.reason))


@dataclass
class ZipMember:
    """One accepted zip entry: sanitized relative path parts and its (unvalidated) bytes.

    ``path`` is e.g. ``("red circle", "001.png")``; no part is empty, ``.``, ``..``, a
    drive or longer than 255 bytes, and parts are NFC-normalised.  ``data`` has not been
    checked to be an image: pass it to :func:`probe_image` / :func:`decode_image`.
    """

    path: tuple[str, ...]
    data: bytes = field(repr=False)

    @property
    def name(self) -> str:
        """The path joined with ``/``, for display."""
        return "/".join(self.path)


# --------------------------------------------------------------------------- helpers

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _clean_display(text: str) -> str:
    """Make an untrusted name safe to print on one line."""
    return _CONTROL.sub("?", text)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _limit_mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def _too_big_reason(w: int, h: int) -> str:
    return (
        f"the image is {w}×{h} pixels ({w * h / 1e6:.1f} megapixels), "
        f"above the {MAX_PIXELS / 1e6:g}-megapixel limit."
    )


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Silence Pillow's decompression-bomb warning (our own MAX_PIXELS check replaces it)
    and its chatter about odd-but-readable files, so nothing escapes as a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def content_hash(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 lowercase hex digits (the identity of an image)."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ content sniffing

_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "a zip archive"),
    (b"PK\x07\x08", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
)


def _archive_kind(data: bytes) -> str | None:
    for magic, kind in _ARCHIVE_MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "a tar archive"
    return None


def _describe_non_image(data: bytes) -> str:
    """Reason for bytes Pillow could not identify as a supported image."""
    head = data[:4096]
    # Known image containers that are merely truncated/corrupt.
    if (
        head.startswith(b"\xff\xd8\xff")
        or head.startswith(b"\x89PNG\r\n\x1a\n")
        or head[:6] in (b"GIF87a", b"GIF89a")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or head[:4] in (b"II*\x00", b"MM\x00*")
        or (head[:2] == b"BM" and len(data) < 64)
    ):
        return "the file is truncated or corrupt."
    ftyp = head[8:12] if head[4:8] == b"ftyp" else b""
    if ftyp in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return f"the file is a HEIC/HEIF image, which is not supported; convert it to {_SUPPORTED_TEXT}."
    if ftyp in (b"avif", b"avis"):
        return f"the file is an AVIF image this installation cannot read; convert it to {_SUPPORTED_TEXT}."
    if ftyp:
        return "the file is not an image (it looks like a video or other media file)."
    if head.startswith(b"8BPS"):
        return f"the file is a Photoshop document, which is not supported; export it as {_SUPPORTED_TEXT}."
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return f"the file is a JPEG 2000 image, which is not supported; convert it to {_SUPPORTED_TEXT}."
    if head.startswith(b"%PDF"):
        return "the file is not an image (it looks like a PDF document)."
    if head.startswith(b"%!PS"):
        return "the file is not an image (it looks like a PostScript document)."
    kind = _archive_kind(data)
    if kind:
        return f"the file is not an image (it looks like {kind})."
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text[:2048] or (text.startswith(b"<?xml") and b"svg" in text):
        return f"the file is an SVG drawing, not a raster image; export it as {_SUPPORTED_TEXT}."
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:1024]:
        return "the file is not an image (it looks like HTML text, perhaps a web page saved instead of the picture)."
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "the file is not an image (it looks like XML or markup text)."
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte char cut at the 4096 boundary is fine
        decoded = head[: e.start].decode("utf-8") if e.start >= len(head) - 4 and e.start > 0 else None
    if decoded is not None and all(c.isprintable() or c in "\t\r\n\f" for c in decoded):
        return "the file is not an image (it looks like plain text)."
    return f"the file is not a recognised image format (supported: {_SUPPORTED_TEXT})."


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, GIF, BMP, WebP or JPEG, or None.

    Used only to refuse huge images early (and name their size); never to accept one.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            if struct.unpack(">I", data[29:33])[0] != zlib.crc32(data[12:29]):
                return None  # damaged header: let Pillow call it corrupt
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM" and len(data) >= 26:
            (hsize,) = struct.unpack("<I", data[14:18])
            if hsize == 12:
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if chunk == b"VP8L" and data[20:21] == b"\x2f":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            return None
        if data[:2] == b"\xff\xd8":
            i, n = 2, len(data)
            while i + 4 <= n:
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
                    i += 2
                    continue
                if marker in (0xD9, 0xDA):
                    return None
                (seglen,) = struct.unpack(">H", data[i + 2 : i + 4])
                if seglen < 2:
                    return None
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + seglen
    except (struct.error, IndexError):
        return None
    return None


# ------------------------------------------------------------------------- reading


def read_bytes(source: Source, name: str | None = None) -> tuple[bytes, str]:
    """Read an upload and return ``(data, display name)``.

    ``source`` is the file's bytes or a filesystem path.  The display name is ``name``
    if given, else the path's base name, else ``"image"``.  Raises :class:`ImageError`
    for a missing, unreadable, non-regular, empty or too large (> :data:`MAX_FILE_BYTES`)
    file.  At most ``MAX_FILE_BYTES + 1`` bytes are ever read, even from a growing file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        display = name if name is not None else "image"
        _check_byte_count(len(data), display)
        return data, display
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected bytes or a path, got {type(source).__name__}")
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    display = name if name is not None else (os.path.basename(path.rstrip("/\\")) or path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(display, "this is a folder, not a file.")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(display, "this is not a regular file.")
        _check_byte_count(st.st_size, display)
        with open(path, "rb") as f:
            # read what stat promised (plus one byte to notice growth), not a 100 MB buffer per file
            data = f.read(min(st.st_size, MAX_FILE_BYTES) + 1)
            if len(data) > st.st_size:  # the file grew since stat: read on, still bounded
                data += f.read(MAX_FILE_BYTES + 1 - len(data))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(display, "the file does not exist.") from None
    except PermissionError:
        raise ImageError(display, "the file could not be read (permission denied).") from None
    except OSError as e:
        raise ImageError(display, f"the file could not be read ({e.strerror or type(e).__name__}).") from None
    _check_byte_count(len(data), display)
    return data, display


def _check_byte_count(n: int, name: str) -> None:
    if n == 0:
        raise ImageError(name, "the file is empty.")
    if n > MAX_FILE_BYTES:
        raise ImageError(name, f"the file is {_mib(n)}, above the {_limit_mib(MAX_FILE_BYTES)} limit.")


# ------------------------------------------------------------------------ decoding


def _check_pixels(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(name, "the file is truncated or corrupt (it declares an empty image).")
    if w * h > MAX_PIXELS:
        raise ImageError(name, _too_big_reason(w, h))


def _open_checked(data: bytes, name: str) -> Image.Image:
    """Open lazily (header only) and enforce every limit that needs no pixel decoding.

    Must be called inside :func:`_quiet_pillow`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    _check_byte_count(len(data), name)
    data = bytes(data)
    size = _header_size(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise ImageError(name, _too_big_reason(*size))
    try:
        im = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        mp = f"{int(m.group(1)) / 1e6:.1f} megapixels" if m else "too many pixels"
        raise ImageError(
            name, f"the image has {mp}, above the {MAX_PIXELS / 1e6:g}-megapixel limit."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(name, _describe_non_image(data)) from None
    except MemoryError:
        raise ImageError(name, "the image is too large to read.") from None
    except Exception:  # noqa: BLE001 - any parser failure on hostile bytes
        raise ImageError(name, "the file is truncated or corrupt.") from None
    try:
        _check_pixels(im.size, name)
    except ImageError:
        im.close()
        raise
    return im


def probe_image(data: bytes, name: str) -> tuple[str, tuple[int, int]]:
    """Validate an upload from its header alone; return ``(format, (width, height))``.

    No pixel is decoded, so this is cheap enough to run on every upload before storing
    it.  The size is as stored (before EXIF rotation).  A file that passes can still
    fail :func:`decode_image` if its pixel data is truncated or corrupt.  Raises
    :class:`ImageError` for anything that is not a supported image within the limits.
    """
    with _quiet_pillow():
        im = _open_checked(data, name)
        try:
            return str(im.format), tuple(im.size)  # type: ignore[return-value]
        finally:
            im.close()


_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {  # as in PIL.ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE_FOR_ORIENTATION else 1
    except Exception:  # noqa: BLE001 - corrupt EXIF must not reject a readable photo
        return 1


def _to_uint8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Scale an integer/float greyscale array to uint8 (never clipping a 16-bit range)."""
    if sixteen_bit:
        a = arr.astype(np.uint32)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1.0 and arr.dtype.kind == "f":
        scaled = a * 255.0  # float images in [0, 1]
    elif lo >= 0 and hi <= 255 and arr.dtype.kind == "f":
        scaled = a
    elif lo >= 0 and hi <= 65535:
        scaled = a * (255.0 / 65535.0)  # 16-bit data held in 32-bit mode "I"
    elif hi > lo:
        scaled = (a - lo) * (255.0 / (hi - lo))  # anything else: stretch the range
    else:
        scaled = np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        grey = _to_uint8(arr, sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    ) or (mode == "P" and im.palette is not None and im.palette.mode == "RGBA")
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return im
    return im.convert("RGB")


def decode_image(data: bytes, name: str = "image", draft_size: int | None = None) -> Image.Image:
    """Decode untrusted bytes to a loaded 8-bit RGB image with EXIF orientation applied.

    The format is judged from the content; the pixel count is checked from the header
    before decoding (:data:`MAX_PIXELS`); multi-frame files give their first frame.
    ``draft_size`` is a hint that the caller will downscale to about that many pixels:
    JPEGs are then decoded at 1/2, 1/4 or 1/8 scale where both sides stay at least
    ``draft_size``.  Raises :class:`ImageError` naming ``name`` for anything unusable;
    no Pillow exception or decompression-bomb warning escapes.
    """
    if draft_size is not None and (not isinstance(draft_size, int) or draft_size <= 0):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")
    with _quiet_pillow():
        im = _open_checked(data, name)
        try:
            out = _decode_opened(im, name, draft_size)
        except BaseException:
            im.close()
            raise
        if out is not im:
            im.close()
    out.info = {}  # orientation is applied; stale EXIF/transparency must not be re-applied
    return out


def _decode_opened(im: Image.Image, name: str, draft_size: int | None) -> Image.Image:
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        try:
            im.draft("RGB", (draft_size, draft_size))
        except Exception:  # noqa: BLE001 - draft is only an optimisation
            pass
    try:
        im.load()
    except MemoryError:
        raise ImageError(name, "the image is too large to decode.") from None
    except Exception:  # noqa: BLE001
        raise ImageError(name, "the file is truncated or corrupt.") from None
    _check_pixels(im.size, name)  # a plugin may change the size while loading
    orientation = _orientation(im)
    try:
        out = _to_rgb(im)
        if orientation != 1:
            out = out.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    except MemoryError:
        raise ImageError(name, "the image is too large to decode.") from None
    except Exception:  # noqa: BLE001
        raise ImageError(name, f"the image uses a colour mode ({im.mode}) that cannot be converted to RGB.") from None
    return out


# ----------------------------------------------------------------------------- zip

_JUNK_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}
_DRIVE = re.compile(r"^[A-Za-z]:")


def _entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's raw name, with UTF-8 names that lack the UTF-8 flag repaired."""
    raw = info.orig_filename
    if not info.flag_bits & 0x800:
        try:
            raw = raw.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return raw


class _Skip(Exception):
    """Silently ignored entry (folder, macOS/Windows junk, dot-file)."""


def _sanitize(raw: str) -> tuple[str, ...]:
    """Safe relative path parts for an entry name; raises ValueError(reason) or _Skip."""
    if raw.endswith(("/", "\\")):
        raise _Skip
    if _CONTROL.search(raw):
        raise ValueError("the entry name contains control characters")
    norm = raw.replace("\\", "/")
    if norm.startswith("/"):
        raise ValueError("the entry has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if parts and _DRIVE.match(parts[0]):
        raise ValueError("the entry path starts with a drive letter")
    if ".." in parts:
        raise ValueError("the entry path leaves the archive folder (it contains '..')")
    for p in parts:
        if len(p.encode("utf-8", "surrogatepass")) > _MAX_NAME_PART_BYTES:
            raise ValueError(f"a name in the entry path is longer than {_MAX_NAME_PART_BYTES} bytes")
    if not parts:
        raise _Skip
    if parts[0] == "__MACOSX" or any(p.startswith(".") or p.lower() in _JUNK_NAMES for p in parts):
        raise _Skip
    return tuple(unicodedata.normalize("NFC", p) for p in parts)


def _member_error(archive: str, raw: str, reason: str) -> ImageError:
    shown = raw if len(raw) <= 160 else raw[:157] + "..."
    return ImageError(f"{shown} (in {archive})", reason)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


class ZipReader:
    """A zip of ``class_name/image`` folders, opened for reading one entry at a time.

    Streaming keeps memory bounded by ONE entry (at most :data:`MAX_FILE_BYTES`), whatever
    the archive holds: iterate and decode/store each :class:`ZipMember` before taking the
    next (a zip of 2,048 zero-filled 1 MiB entries once cost 2 GB held at once).  The
    listing is checked when opened: it raises :class:`ImageError` for the whole archive if
    it is not a readable zip or holds more than :data:`MAX_ZIP_MEMBERS` files, and
    :attr:`errors` holds one :class:`ImageError` per entry refused by its name.  Iterating
    yields those errors first, then, in archive order, a :class:`ZipMember` or an
    :class:`ImageError` per remaining entry (see :func:`read_zip` for what is refused).
    Use as a context manager (or :meth:`close`).
    """

    def __init__(self, source: Source, name: str | None = None):
        if isinstance(source, (bytes, bytearray, memoryview)):
            archive = name or "archive.zip"
            data = bytes(source)
            if not data:
                raise ImageError(archive, "the file is empty.")
            fileobj: object = io.BytesIO(data)
            head = data[:4096]
        elif isinstance(source, (str, os.PathLike)):
            path = os.fsdecode(os.fspath(source))
            archive = name or os.path.basename(path.rstrip("/\\")) or path
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    raise ImageError(archive, "this is not a regular file.")
                if st.st_size == 0:
                    raise ImageError(archive, "the file is empty.")
                with open(path, "rb") as f:
                    head = f.read(4096)
            except ImageError:
                raise
            except FileNotFoundError:
                raise ImageError(archive, "the file does not exist.") from None
            except OSError as e:
                raise ImageError(archive, f"the file could not be read ({e.strerror or type(e).__name__}).") from None
            fileobj = path
        else:
            raise TypeError(f"expected bytes or a path, got {type(source).__name__}")
        self.archive = archive
        try:
            zf = zipfile.ZipFile(fileobj)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001
            if head.startswith(b"PK"):
                raise ImageError(archive, "the zip archive is truncated or corrupt.") from None
            reason = _describe_non_image(head)
            if "not an image (" in reason:
                reason = reason.replace("not an image", "not a zip archive")
            else:
                reason = "the file is not a zip archive."
            raise ImageError(archive, reason) from None
        self._zf = zf
        self.errors: list[ImageError] = []
        self._entries: list[tuple[zipfile.ZipInfo, str, tuple[str, ...]]] = []
        try:
            for info in zf.infolist():
                raw = _entry_name(info)
                try:
                    parts = _sanitize(raw)
                except _Skip:
                    continue
                except ValueError as e:
                    self.errors.append(_member_error(archive, raw, f"{e}, so it was skipped."))
                    continue
                self._entries.append((info, raw, parts))
            if len(self._entries) > MAX_ZIP_MEMBERS:
                raise ImageError(
                    archive, f"the archive holds {len(self._entries):,} files, above the {MAX_ZIP_MEMBERS:,}-file limit."
                )
        except BaseException:
            zf.close()
            raise

    def __len__(self) -> int:
        """Entries to read (files whose names passed), not counting :attr:`errors`."""
        return len(self._entries)

    def __iter__(self) -> Iterator[Union[ZipMember, ImageError]]:
        yield from self.errors
        total = 0
        for info, raw, parts in self._entries:
            try:
                data = _read_member(self._zf, info, total)
            except ValueError as e:
                yield _member_error(self.archive, raw, str(e))
                continue
            total += len(data)
            yield ZipMember(parts, data)
            del data  # the caller holds the only reference: one entry in memory at a time

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> "ZipReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_zip(source: Source, name: str | None = None) -> tuple[list[ZipMember], list[ImageError]]:
    """Read a whole zip of ``class_name/image`` folders in memory; never extracts to disk.

    For small archives and tests: uploads stream with :class:`ZipReader` instead, since
    this holds every entry at once.

    Returns the accepted entries (with sanitized paths, in archive order) and one
    :class:`ImageError` per refused entry, named ``"<entry> (in <archive>)"``.  Refused:
    absolute paths, ``..`` traversal, drive letters, names with control characters or a
    part over 255 bytes, symlinks, encrypted entries, nested archives, entries over
    :data:`MAX_FILE_BYTES` or with a compression ratio above :data:`MAX_ZIP_RATIO`
    (entries over 1 MiB), entries that would take the total over
    :data:`MAX_ZIP_TOTAL_BYTES`, and corrupt entries.  Folders, ``__MACOSX/``, dot-files,
    ``Thumbs.db`` and ``desktop.ini`` are skipped silently.  Backslashes are read as
    folder separators.  Entry data is read with a bounded read, so a lying header cannot
    exhaust memory.  Entry contents are not checked to be images.

    Raises :class:`ImageError` for the whole archive if it is not a readable zip or
    holds more than :data:`MAX_ZIP_MEMBERS` files.  ``name`` defaults to the path's base
    name, or ``"archive.zip"`` for bytes.
    """
    members: list[ZipMember] = []
    errors: list[ImageError] = []
    with ZipReader(source, name) as z:
        for item in z:
            (errors if isinstance(item, ImageError) else members).append(item)
    return members, errors


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, total: int) -> bytes:
    """Checked, bounded read of one entry; raises ValueError(reason sentence)."""
    if _is_symlink(info):
        raise ValueError("the entry is a symbolic link, which is not allowed.")
    if info.flag_bits & 0x1:
        raise ValueError("the entry is encrypted (password-protected); zip it again without a password.")
    declared, packed = info.file_size, info.compress_size
    if declared > MAX_FILE_BYTES:
        raise ValueError(f"the entry is {_mib(declared)} unpacked, above the {_limit_mib(MAX_FILE_BYTES)} per-file limit.")
    if declared > _RATIO_MIN_BYTES and declared > MAX_ZIP_RATIO * max(packed, 1):
        raise ValueError(
            f"the entry is compressed {declared / max(packed, 1):.0f}:1, above the {MAX_ZIP_RATIO}:1 limit "
            "(possible zip bomb)."
        )
    if total + declared > MAX_ZIP_TOTAL_BYTES:
        raise ValueError(
            f"the archive unpacks to more than {_limit_mib(MAX_ZIP_TOTAL_BYTES)} in total, so this entry was skipped."
        )
    limit = declared  # zipfile never yields more than the declared size; we check anyway
    chunks: list[bytes] = []
    got = 0
    try:
        with zf.open(info) as f:
            while True:
                chunk = f.read(min(2**20, limit + 1 - got))
                if not chunk:
                    break
                got += len(chunk)
                if got > limit:
                    raise ValueError("the entry is larger than its header says (corrupt or malicious).")
                if got > _RATIO_MIN_BYTES and got > MAX_ZIP_RATIO * max(packed, 1):
                    raise ValueError(f"the entry's compression ratio is above the {MAX_ZIP_RATIO}:1 limit (possible zip bomb).")
                chunks.append(chunk)
    except ValueError as e:
        if str(e).startswith("the entry"):
            raise
        raise ValueError("the entry is corrupt and could not be unpacked.") from None
    except NotImplementedError:
        raise ValueError("the entry uses a compression method that is not supported.") from None
    except Exception:  # noqa: BLE001 - BadZipFile (bad CRC), zlib.error, EOFError, ...
        raise ValueError("the entry is corrupt and could not be unpacked.") from None
    data = b"".join(chunks)
    if len(data) != declared:
        raise ValueError("the entry is shorter than its header says (corrupt).")
    kind = _archive_kind(data)
    if kind:
        raise ValueError(f"the entry is {kind}; nested archives are not supported.")
    return data
