"""Keep Ray's C++ log lines off the console.

Ray's C++ core (the core worker inside the driver) writes its own lines straight to file
descriptor 2 when its processes die - ``[2026-11-30 09:44:01,268 E 26354 26354]
core_worker.cc:N: ...`` - below Python, where no logging setting reaches (and
``RAY_BACKEND_LOG_LEVEL`` itself prints an ``I`` line when set). ``drop_ray_core_lines``
points fd 2 at a pipe (a pseudo-terminal when stderr is a terminal, so progress stays a live
line) and relays every other byte to the real stderr from a thread; ``dmx run --verbose``
leaves stderr alone. A line is held only while it could still be one of Ray's (it starts with
``[``), so dmx's progress and messages pass at once.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import threading

RAY_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,.]+ [A-Z] \d+ \d+\] ")
END = b"\x00dmx-stderr-end\x00"          # written at exit: everything before it is relayed
_state: dict[str, object] = {}


def _relay(src: int, dest: int) -> None:
    held = b""
    while True:
        try:
            data = os.read(src, 65536)
        except OSError:          # a pseudo-terminal reports EIO once its other end closes
            data = b""
        if not data:
            break
        held += data
        ended = END in held
        if ended:
            held = held.split(END, 1)[0]
        *lines, held = held.split(b"\n")
        out = b"".join(ln + b"\n" for ln in lines if not RAY_LINE.match(ln))
        if held and not held.startswith(b"["):      # a partial line that cannot be Ray's
            out, held = out + held, b""
        if out:
            os.write(dest, out)
        if ended:
            break
    if held and not RAY_LINE.match(held):
        os.write(dest, held)


def drop_ray_core_lines() -> None:
    """Filter fd 2 for the rest of this process (idempotent)."""
    if _state:
        return
    sys.stderr.flush()
    real = os.dup(2)
    if os.isatty(2):
        import tty
        read_end, write_end = os.openpty()
        tty.setraw(write_end)            # no newline translation: bytes pass as written
    else:
        read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_relay, args=(read_end, real), daemon=True,
                              name="dmx-stderr")
    thread.start()
    _state.update(real=real, thread=thread)
    atexit.register(_restore)


def _restore() -> None:
    """Point fd 2 back at the real stderr and let the relay drain what is left."""
    if not _state:
        return
    sys.stderr.flush()
    os.write(2, END)
    _state["thread"].join(timeout=5)
    os.dup2(_state["real"], 2)
