"""Hostile request files for the serving tests: crafted images, archives, videos and cameras.

Each builder returns the bytes of one file. Nothing here is large: headers claim sizes the
payload does not have, and bombs are made of compressible zeros.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image


def png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def picture(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with one row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim ``width x height``."""
    data = bytearray(jpeg(picture(16, 16)))
    start = data.index(b"\xff\xc0")
    # SOF0: marker, length (2), precision (1), height (2), width (2).
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(io_bytes(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def io_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def float_tiff(values: np.ndarray) -> bytes:
    return io_bytes(Image.fromarray(values.astype(np.float32), mode="F"), "TIFF")


def int32_tiff(values: np.ndarray) -> bytes:
    return io_bytes(Image.fromarray(values.astype(np.int32), mode="I"), "TIFF")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def corrupt_png_data(data: bytes) -> bytes:
    """A PNG whose compressed pixel data is scrambled (with a checksum that matches it)."""
    out = bytearray(data)
    start = out.index(b"IDAT")
    length = struct.unpack(">I", out[start - 4 : start])[0]
    body = start + 4
    for offset in range(2, length, 3):
        out[body + offset] ^= 0x5A
    crc = zlib.crc32(bytes(out[start : body + length]))
    out[body + length : body + length + 4] = struct.pack(">I", crc)
    return bytes(out)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
PSD = b"8BPS\x00\x01" + b"\x00" * 64
FITS = b"SIMPLE  =                    T" + b" " * 50
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
HLS = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n"
FFCONCAT = b"ffconcat version 1.0\nfile '/etc/hostname'\n"
SDP = b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nm=video 5004 RTP/AVP 96\r\n"


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with_flags(members: dict[str, bytes], flag: int) -> bytes:
    """A stored zip whose members claim general-purpose ``flag`` bits (0x1: encrypted)."""
    data = bytearray(zip_of(members, zipfile.ZIP_STORED))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.find(signature)
        while position >= 0:
            (flags,) = struct.unpack("<H", data[position + offset : position + offset + 2])
            data[position + offset : position + offset + 2] = struct.pack("<H", flags | flag)
            position = data.find(signature, position + 4)
    return bytes(data)


def zip_with_method(members: dict[str, bytes], method: int) -> bytes:
    """A stored zip whose members claim compression ``method`` (99: AES, unsupported)."""
    data = bytearray(zip_of(members, zipfile.ZIP_STORED))
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        position = data.find(signature)
        while position >= 0:
            data[position + offset : position + offset + 2] = struct.pack("<H", method)
            position = data.find(signature, position + 4)
    return bytes(data)


def zip_with_bad_crc(members: dict[str, bytes]) -> bytes:
    """A stored zip whose first member's data has one byte flipped (its CRC no longer holds)."""
    data = bytearray(zip_of(members, zipfile.ZIP_STORED))
    name_length, extra_length = struct.unpack("<HH", data[26:30])
    payload = 30 + name_length + extra_length
    data[payload + 40] ^= 0xFF
    return bytes(data)


def cameras(**document: object) -> bytes:
    return json.dumps(document).encode()


def k_matrix(fx: float = 60.0, cx: float = 32.0, cy: float = 24.0) -> list[list[float]]:
    return [[fx, 0.0, cx], [0.0, fx, cy], [0.0, 0.0, 1.0]]


def nested_json(depth: int) -> bytes:
    return b"{" + b'"a":' + b"[" * depth + b"]" * depth + b"}"
