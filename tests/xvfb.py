"""A private X server for GUI tests, and screenshots of it as PNG without ImageMagick."""

from __future__ import annotations

import atexit
import os
import select
import shutil
import struct
import subprocess
import sys
import time
import zlib


# Exec Xvfb so that it dies with this process (PR_SET_PDEATHSIG, Linux), even on kill -9 or exit from C.
EXEC_DYING_WITH_PARENT = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() == int(sys.argv[1]):
    os.execvp(sys.argv[2], sys.argv[2:])
"""


class Xvfb:
    """``with Xvfb(1000, 680) as x:`` starts Xvfb on a free display (``x.display``) and kills it after."""

    def __init__(self, width=1000, height=680, timeout=15.0):
        self.width, self.height, self.timeout = width, height, timeout
        self.proc = None
        self.display = None

    def __enter__(self):
        read_fd, write_fd = os.pipe()
        try:
            # -displayfd: the server picks a free display and writes its number once it is ready.
            self.proc = subprocess.Popen(
                [sys.executable, "-c", EXEC_DYING_WITH_PARENT, str(os.getpid()),
                 "Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{self.width}x{self.height}x24",
                 "-nolisten", "tcp", "-noreset"],
                pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.close(write_fd)
            write_fd = None
            data = b""
            deadline = time.monotonic() + self.timeout
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([read_fd], [], [], max(0.0, left))
                if not ready:
                    raise RuntimeError("Xvfb did not start in time")
                chunk = os.read(read_fd, 64)
                if not chunk:
                    raise RuntimeError("Xvfb exited before it was ready")
                data += chunk
            self.display = ":" + data.decode().strip()
            return self
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            os.close(read_fd)
            if write_fd is not None:
                os.close(write_fd)

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def screenshot(self, path, window=None):
        """Save the screen (or one window id) as PNG; needs ``xwd`` (x11-apps).
        Returns the image as ``xwd_to_rgb`` does, to look at its pixels."""
        target = ["-id", str(window)] if window else ["-root"]
        data = subprocess.run(["xwd", "-silent", "-display", self.display] + target,
                              capture_output=True, check=True, timeout=30).stdout
        image = xwd_to_rgb(data)
        write_png(path, *image)
        return image


_shared: Xvfb | None = None


class shared_xvfb:
    """``with shared_xvfb() as x:`` one Xvfb for every GUI test of this process, stopped at exit.

    Tk keeps its connection to a display until the process ends, and Xlib
    ends the whole process ("XIO: fatal IO error") when such a connection
    breaks; so a display must outlive every Tk that used it, and GUI tests
    share one instead of killing theirs.
    """

    def __init__(self, width=1000, height=680):
        self.size = (width, height)

    def __enter__(self) -> Xvfb:
        global _shared
        if _shared is None or _shared.proc.poll() is not None:
            _shared = Xvfb(*self.size).__enter__()
            atexit.register(_shared.__exit__, None, None, None)
        if (_shared.width, _shared.height) != self.size:
            raise ValueError(f"the shared Xvfb is {_shared.width}x{_shared.height}, not {self.size}")
        return _shared

    def __exit__(self, *exc):
        return None


def on_screen(root):
    """Make what Tk has to draw reach the screen, for a screenshot: the idle
    redraws run, then a request the X server answers (``winfo pointerxy``).
    It answers only once it has done every earlier request of Tk's
    connection, the drawing among them, so ``xwd`` run after sees it all."""
    root.update_idletasks()
    root.winfo_pointerxy()


def pixel(image, x, y):
    """The ``(r, g, b)`` at screen ``x, y`` of an image from ``Xvfb.screenshot``."""
    row = image[2][y]
    return tuple(row[3 * x: 3 * x + 3])


def can_screenshot() -> bool:
    return shutil.which("xwd") is not None


def xwd_to_rgb(data: bytes):
    """Decode a 24/32-bit TrueColor XWD dump -> (width, height, rows of RGB bytes)."""
    fields = struct.unpack(">25I", data[:100])
    header_size, _version, _fmt, _depth, width, height = fields[:6]
    byte_order, bits_per_pixel, bytes_per_line = fields[7], fields[11], fields[12]
    red_mask, green_mask, blue_mask = fields[14:17]
    ncolors = fields[19]
    if bits_per_pixel != 32:
        raise ValueError(f"unsupported xwd pixel size {bits_per_pixel}")
    offset = header_size + 12 * ncolors
    order = "<" if byte_order == 0 else ">"

    def shift(mask):
        return (mask & -mask).bit_length() - 1
    rs, gs, bs = shift(red_mask), shift(green_mask), shift(blue_mask)
    rows = []
    for y in range(height):
        line = data[offset + y * bytes_per_line: offset + y * bytes_per_line + 4 * width]
        pixels = struct.unpack(f"{order}{width}I", line)
        rows.append(bytes(b for p in pixels for b in ((p & red_mask) >> rs, (p & green_mask) >> gs,
                                                        (p & blue_mask) >> bs)))
    return width, height, rows


def write_png(path, width, height, rows):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + row for row in rows)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
