"""The decoder process of an isolated environment: ``<env>/bin/python -I decode_server.py LIB``.

Runs with the environment's own Python, which cannot import dmx: it loads ``portable.py`` from
its own folder BY PATH and serves its ``decode_<LIB>`` (the very functions dmx's in-process
decoders call) over stdin/stdout. Standard library, numpy and the driven library only.

Protocol (little-endian): request ``DMXQ`` u32 header-length u64 payload-length, JSON header,
payload (the file bytes); reply ``DMXR`` u8 status u32 header-length u64 payload-length, JSON
header, payload. A ``decode`` request's header is ``{"op": "decode", "exif": ..., "reduce": ...}``;
an ok reply's header is ``{"shape": [h, w, 3], "notes": [...]}``, its payload the RGB pixels.
"""
import faulthandler
import importlib.util
import json
import os
import signal
import struct
import sys
import time

REQ, REP = struct.Struct("<4sIQ"), struct.Struct("<4sBIQ")


def load_portable():
    """``portable.py`` beside this file, as a module (no package, no dmx on sys.path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "portable.py")
    spec = importlib.util.spec_from_file_location("dmx_portable_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(lib):
    faulthandler.enable()                           # a segfault leaves its cause on stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                   # stray C-level prints must not corrupt the protocol

    def reply(status, header, payload=b""):
        h = json.dumps(header).encode()
        out.write(REP.pack(b"DMXR", status, len(h), len(payload)))
        out.write(h)
        out.write(payload)
        out.flush()

    portable = load_portable()
    decode = portable.DECODERS[lib]
    if lib == "pil":
        import PIL
        version = PIL.__version__
    else:
        import cv2
        version = cv2.__version__
    reply(0, {"ready": True, "pid": os.getpid(), "library": lib, "version": version,
              "source": portable.__file__})
    while True:
        head = inp.read(REQ.size)
        if len(head) < REQ.size:
            break                                   # the parent closed the pipe (or died): exit
        magic, hlen, plen = REQ.unpack(head)
        header = json.loads(inp.read(hlen))
        data = inp.read(plen)
        if magic != b"DMXQ" or len(data) != plen:
            break
        op = header.get("op")
        try:
            if op == "decode":
                rgb, notes = decode(data, header["exif"], int(header["reduce"]))
                reply(0, {"shape": list(rgb.shape), "notes": notes}, memoryview(rgb).cast("B"))
            elif op == "sleep":                     # for tests: a hang
                time.sleep(float(header["seconds"]))
                reply(0, {})
            elif op == "segfault":                  # for tests: a crash
                import ctypes
                ctypes.string_at(0)
            else:
                reply(1, {"message": "unknown op %r" % (op,)})
        except portable.DecodeFailed as e:
            reply(1, {"message": str(e)})
        except Exception as e:                      # the library failed in a way it does not document
            reply(1, {"message": "%s raised %s: %s" % (lib, type(e).__name__, e)})


if __name__ == "__main__":
    main(sys.argv[1])
