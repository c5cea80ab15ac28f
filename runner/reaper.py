"""Processes of the embedded Ray die with the driver, even after ``kill -9``.

Ray's own processes notice a dead driver late: raylet and GCS go quickly, but the dashboard and
runtime-env agents poll their parent and linger for 60-120 s. A small watcher process (Ray's
"reaper" idea, but keyed by the process tree) holds the read end of a pipe whose write end only
the driver holds; it records the driver's descendants every half second, and when the pipe
reaches EOF - the driver exited, however it died - it kills every recorded descendant still
alive (matched by start time, so a reused pid is never hit).
"""
from __future__ import annotations

import os
import sys

_WATCHER = r'''
import os, select, signal, sys, time
driver, me = int(sys.argv[1]), os.getpid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(b")") + 2:].split()
    return int(fields[1]), fields[19]          # ppid, start time

def descendants():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st:
                kids.setdefault(st[0], []).append((int(name), st[1]))
    out, todo = {}, [driver]
    while todo:
        for pid, start in kids.get(todo.pop(), ()):
            if pid != me and pid not in out:
                out[pid] = start
                todo.append(pid)
    return out

seen = {}
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0.5)
    if r and not os.read(sys.stdin.fileno(), 4096):
        break
    seen.update(descendants())
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid, start in list(seen.items()):
        st = stat(pid)
        if st and st[1] == start:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    time.sleep(1.0)
'''

_pipe: int | None = None   # the write end: only this process holds it, never closed


def start_reaper() -> None:
    """Start the watcher once per driver process (Linux only: it reads /proc)."""
    global _pipe
    if _pipe is not None or not os.path.isdir("/proc/self"):
        return
    r, w = os.pipe()   # both non-inheritable: Ray's children never hold the write end
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-I", "-c", _WATCHER, str(os.getpid())],
                       os.environ, setsid=True,
                       file_actions=[(os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                                     (os.POSIX_SPAWN_DUP2, null, 2)])
    finally:
        os.close(r)
        os.close(null)
    _pipe = w
