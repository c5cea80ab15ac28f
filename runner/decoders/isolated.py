"""Decoder package versions in their own environments: ``pil[pillow==9.4.0]``,
``opencv[opencv-python-headless==4.8.1.78 numpy<2]``.

The level's requirements get a virtual environment (``dmx.runner.envs.ensure_env``: built once,
cached). Each decoder then drives ONE long-lived server process per Python process
(``<env>/bin/python -I decode_server.py pil|opencv``), started on the first decode. The server
imports only the env's Pillow or OpenCV, numpy and the stdlib, and runs ``portable.py`` - the
very source of ``pil.py`` / ``opencv.py``'s decodes, loaded by path - so the two cannot drift:
EXIF apply/ignore, ``reduce`` by libjpeg DCT scaling, the library's own colour conversion,
Pillow's decompression-bomb guard kept on (for OpenCV the guard and the notes on the source come
from a header-only parse here, exactly as ``opencv.py`` does).

Protocol (little-endian, on the server's stdin/stdout):
  request: ``DMXQ`` u32 header-length u64 payload-length, JSON header, payload (the file bytes)
  reply:   ``DMXR`` u8 status u32 header-length u64 payload-length, JSON header, payload
The request header is ``{"op": "decode", "exif": ..., "reduce": ...}``; an ``ok`` reply's
header is ``{"shape": [h, w, 3], "notes": [...]}`` and its payload the RGB pixels, row-major.
A crash (segfault, os._exit) or no reply within ``timeout_s`` (the process is killed) is a
DecodeError "decoder process died: ..." for that image; the next image starts a fresh server.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import re
import selectors
import signal
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

import numpy as np

from ..envs import EnvBuildError, EnvInfo, ensure_env, normalise_requirements, requirement_name
from .base import REDUCTIONS, DecodeError, Decoder, DecoderUnavailable, DecodeOptions, source_header
from .opencv import OpenCVDecoder
from .pil import PilDecoder

DECODE_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0

#: The packages a level may pin, per decoder: the library (any of its wheels) and numpy. A spec
#: is data, and any other wheel could run code when the env's Python starts (a .pth file).
LIBRARY_PACKAGES: Mapping[str, tuple[str, ...]] = {
    "pil": ("pillow",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
}
_EXAMPLES = {"pil": "pil[pillow==9.4.0]",
             "opencv": "opencv[opencv-python-headless==4.8.1.78 numpy<2]"}
_PROBE_NAME = {"pil": "pillow", "opencv": "opencv"}
_LABEL = re.compile(r"^(\w+)\[(.+)\]$")

_REQUEST = struct.Struct("<4sIQ")
_REPLY = struct.Struct("<4sBIQ")
OK, FAILED = 0, 1

#: The decoder process's program, run by path with the env's interpreter (-I: no PYTHONPATH, no
#: user site); it loads ``portable.py`` (the in-process decoders' own source) from beside it.
SERVER_PATH = Path(__file__).resolve().with_name("decode_server.py")


class DecoderServer:
    """One long-lived decode process in an env, restarted after a crash or a timeout.

    ``call`` sends one request and waits for its reply; a process that dies or does not answer
    within the timeout (it is then killed) raises DecodeError "decoder process died: ...", and
    the next call starts a fresh process. Thread-safe; a forked child starts its own process.
    """

    def __init__(self, python: Path, library: str, timeout_s: float = DECODE_TIMEOUT_S,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.python, self.library = Path(python), library
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.starts = 0
        self._broken: str | None = None   # why the process could not start: not retried per image
        self.hello: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._stderr: IO[bytes] | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        """The running server's process id, or None when none runs."""
        return self._proc.pid if self._proc is not None and self._owner == os.getpid() else None

    def call(self, header: Mapping[str, Any], payload: bytes = b"",
             timeout_s: float | None = None) -> tuple[dict[str, Any], memoryview]:
        """One request -> (reply header, reply payload). Raises DecodeError."""
        with self._lock:
            proc = self._ensure_started()
            err_from = self._stderr_mark()
            h = json.dumps(dict(header)).encode()
            request = _REQUEST.pack(b"DMXQ", len(h), len(payload)) + h + payload
            limit = self.timeout_s if timeout_s is None else timeout_s
            try:
                status, reply, body = self._exchange(proc, request, time.monotonic() + limit)
            except TimeoutError:
                self._kill()
                raise DecodeError(f"decoder process died: no reply within {limit:g} s "
                                  "(hung; killed, restarted for the next image)") from None
            except EOFError:
                raise DecodeError(f"decoder process died: {self._death(err_from)}") from None
        if status != OK:
            raise DecodeError(str(reply.get("message", "decode failed")))
        return reply, body

    def close(self) -> None:
        """Stop the server: close its stdin (it exits on EOF), kill it if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # -- internals --

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._owner != os.getpid():   # forked: the parent's process and pipes are not ours
            self._proc, self._stderr, self._owner = None, None, os.getpid()
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._reap()
        if self._broken is not None:
            raise DecoderUnavailable(self._broken)
        if self._stderr is None:
            self._stderr = tempfile.TemporaryFile(mode="a+b")   # O_APPEND: truncation is safe
        self._stderr.truncate(0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        try:
            proc = subprocess.Popen([str(self.python), "-I", str(SERVER_PATH), self.library],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=self._stderr, env=env, close_fds=True, bufsize=0)
        except OSError as e:
            self._broken = f"cannot start the decoder process {self.python}: {e}"
            raise DecoderUnavailable(self._broken) from None
        assert proc.stdin is not None and proc.stdout is not None
        for fd in (proc.stdin.fileno(), proc.stdout.fileno()):
            os.set_blocking(fd, False)
            _widen_pipe(fd)
        self._proc = proc
        self.starts += 1
        try:
            status, hello, _ = self._exchange(proc, b"", time.monotonic() + self.startup_timeout_s)
        except (TimeoutError, EOFError):
            why = self._death(0)
            self._kill()
            self._broken = (f"the {self.library} decoder process in "
                            f"{self.python.parent.parent} did not start: {why}")
            raise DecoderUnavailable(self._broken) from None
        self.hello = hello                # library, version and the decode source it loaded
        if status != OK or not hello.get("ready"):
            self._kill()
            self._broken = f"the {self.library} decoder process did not start: {hello}"
            raise DecoderUnavailable(self._broken)
        return proc

    @staticmethod
    def _exchange(proc: subprocess.Popen[bytes], request: bytes,
                  deadline: float) -> tuple[int, dict[str, Any], memoryview]:
        """Write ``request`` and read one reply, both non-blocking, until ``deadline``.
        Raises TimeoutError, or EOFError when the process closed its end."""
        assert proc.stdin is not None and proc.stdout is not None
        wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
        pending = memoryview(request)
        head = bytearray(_REPLY.size)
        buf, got, body_phase = head, 0, False
        status, hlen = 0, 0
        with selectors.DefaultSelector() as sel:
            sel.register(rfd, selectors.EVENT_READ)
            if pending:
                sel.register(wfd, selectors.EVENT_WRITE)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                for key, _ in sel.select(remaining):
                    if key.fd == wfd:
                        try:
                            n = os.write(wfd, pending[:1 << 20])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            raise EOFError from None
                        pending = pending[n:]
                        if not pending:
                            sel.unregister(wfd)
                        continue
                    try:
                        n = os.readv(rfd, [memoryview(buf)[got:]])
                    except BlockingIOError:
                        continue
                    if n == 0:
                        raise EOFError
                    got += n
                    if got < len(buf):
                        continue
                    if not body_phase:
                        magic, status, hlen, plen = _REPLY.unpack(head)
                        if magic != b"DMXR":
                            raise EOFError
                        buf, got, body_phase = bytearray(hlen + plen), 0, True
                    if body_phase and got == len(buf):
                        view = memoryview(buf)
                        return status, json.loads(bytes(view[:hlen]) or b"{}"), view[hlen:]

    def _stderr_mark(self) -> int:
        if self._stderr is None:
            return 0
        if os.fstat(self._stderr.fileno()).st_size > 1 << 20:
            self._stderr.truncate(0)      # libjpeg warnings pile up over thousands of images
        return os.fstat(self._stderr.fileno()).st_size

    def _death(self, err_from: int) -> str:
        """How the process ended and what it last said on stderr."""
        rc = self._reap()
        if rc is None:
            how = "closed its pipe"
        elif rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exit code {rc}"
        said = ""
        if self._stderr is not None:
            self._stderr.seek(err_from)
            lines = [ln.strip() for ln in self._stderr.read()[-4000:].decode("utf-8", "replace")
                     .splitlines() if ln.strip()]
            fatal = [ln for ln in lines if ln.startswith("Fatal Python error")]
            said = (fatal or lines[-1:] or [""])[0][:300]
        return f"{how}" + (f" ({said})" if said else "")

    def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._reap()


def _widen_pipe(fd: int) -> None:
    """1 MiB pipe buffers (Linux; 64 KiB by default): a 12 MP image is 36 MB of pixels."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        try:
            fcntl.fcntl(fd, setpipe, 1 << 20)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works, only slower


_LIVE: "weakref.WeakSet[DecoderServer]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop this process's decoder servers at exit (they also exit when the pipe closes)."""
    for server in list(_LIVE):
        server.close()


def requirements_for(label: str) -> list[str]:
    """The requirement set a level label stands for: ``pil[pillow==9.4.0]`` ->
    ``["numpy", "pillow==9.4.0"]``; numpy unpinned unless the label pins it. Raises
    DecoderUnavailable for a label that names no library version or other packages."""
    m = _LABEL.match(label)
    if not m:
        raise DecoderUnavailable(f"{label!r} is not a package-version level like "
                                 f"{_EXAMPLES['pil']}")
    name, text = m.groups()
    if name not in LIBRARY_PACKAGES:
        raise DecoderUnavailable(f"{label}: package versions in their own environment are "
                                 f"supported for {' and '.join(LIBRARY_PACKAGES)} only")
    try:
        reqs = normalise_requirements(text)
    except ValueError as e:
        raise DecoderUnavailable(f"{label}: {e}") from None
    names = {requirement_name(r) for r in reqs}
    allowed = set(LIBRARY_PACKAGES[name]) | {"numpy"}
    if names - allowed:
        raise DecoderUnavailable(f"{label}: a {name} level may pin only "
                                 f"{', '.join(sorted(allowed))}; "
                                 f"not {', '.join(sorted(names - allowed))}")
    if not names & set(LIBRARY_PACKAGES[name]):
        raise DecoderUnavailable(f"{label}: name the {name} package and its version, "
                                 f"e.g. {_EXAMPLES[name]}")
    return reqs if "numpy" in names else sorted([*reqs, "numpy"])


def is_isolated_label(label: str) -> bool:
    """True for labels that name a package version (``pil[pillow==9.4.0]``)."""
    return "[" in label


def ensure_decoder_envs(labels: Iterable[str | None]) -> dict[str, EnvInfo]:
    """Build (or find) the environment of every package-version decoder level, before any
    image is processed, so that an install failure stops a run up front. Labels that are not
    package versions, or that name packages a level may not pin, are left to the cell's skip
    reason. Raises EnvBuildError."""
    out: dict[str, EnvInfo] = {}
    for label in dict.fromkeys(lb for lb in labels if lb and is_isolated_label(lb)):
        try:
            reqs = requirements_for(label)
        except DecoderUnavailable:
            continue
        out[label] = ensure_env(reqs)
    return out


class IsolatedDecoder(Decoder):
    """Pillow or OpenCV at a pinned version, decoding in its own environment's process."""

    reductions = REDUCTIONS

    def __init__(self, label: str, timeout_s: float = DECODE_TIMEOUT_S) -> None:
        self.system_name = label
        self.library = label.split("[")[0]
        self.env = ensure_env(requirements_for(label))      # EnvBuildError propagates
        self._probe = self.env.libraries.get(_PROBE_NAME.get(self.library, ""))
        if not self._probe:
            raise DecoderUnavailable(f"{label}: the environment {self.env.path} holds no "
                                     f"working {self.library}")
        self.server = DecoderServer(self.env.python_bin, self.library, timeout_s)

    @property
    def native_exif(self) -> str:  # type: ignore[override]
        """``exif: native`` is what the pinned library does by itself, as in-process."""
        return OpenCVDecoder.native_exif if self.library == "opencv" else PilDecoder.native_exif

    def _decode(self, data: bytes, options: DecodeOptions) -> np.ndarray:
        mode: str | None = None
        orientation: int | None = None
        if self.library == "opencv":
            mode, orientation = source_header(data)   # bomb guard + notes, as opencv.py
        reply, pixels = self.server.call({"op": "decode", "exif": options.exif,
                                          "reduce": options.reduce}, data)
        if self.library == "opencv":
            OpenCVDecoder.note_source(self, mode, orientation, options)  # type: ignore[arg-type]
        for note in reply.get("notes", []):
            self._note(str(note))
        shape = tuple(int(s) for s in reply["shape"])
        return np.frombuffer(pixels, np.uint8).reshape(shape)

    def version(self) -> dict[str, str | None]:
        """Library, its exact version in the env, the libjpeg it links, and the env."""
        p = self._probe or {}
        out: dict[str, str | None] = {
            "library": "pillow" if self.library == "pil" else "opencv",
            "version": p.get("version"), "libjpeg": p.get("libjpeg"),
            "numpy": self.env.versions.get("numpy"), "env": self.env.key,
            "requirements": " ".join(self.env.requirements)}
        if "libjpeg_turbo" in p:
            out["libjpeg_turbo"] = p.get("libjpeg_turbo")
        return out

    def close(self) -> None:
        """Stop the decoder process (a later decode starts a new one)."""
        self.server.close()


__all__ = ["DECODE_TIMEOUT_S", "DecoderServer", "EnvBuildError", "IsolatedDecoder",
           "LIBRARY_PACKAGES", "ensure_decoder_envs", "is_isolated_label", "requirements_for"]
