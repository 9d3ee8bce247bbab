"""Small image-file builders shared by the ingest and image-reading tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise(seed: int, w: int = 64, h: int = 48, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB but carries no pixel data: a bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def finishes_despite_fifos(fn, fifos, timeout: float = 30.0):
    """``fn()``, failing the test if it is still running after ``timeout`` seconds: then it is
    blocked opening one of ``fifos`` (named pipes), and each is opened for writing and closed so
    that the blocked reader sees end-of-file and the thread ends."""
    import os
    import threading

    import pytest

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for _ in range(20):  # a blocked reader may open the same FIFO again
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            thread.join(0.5)
        pytest.fail(f"still running after {timeout}s: blocked opening a FIFO")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
