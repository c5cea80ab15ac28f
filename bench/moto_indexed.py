"""Benchmark helper (not a test): moto's S3 server holding N objects, for planning at 1M objects.

Two things keep plain moto from serving a 1,000,000-object prefix, neither of them S3's:
it accepts ~50 PUTs a second over HTTP (5.5 hours for 1M), and each ListObjects request scans
and sorts every key of the bucket in Python (1,000 pages x 1M keys), and its generic response
serializer spends ~160 us per listed key re-parsing its own timestamps (160 s of server CPU per
1M keys, on the cores the client runs on). Here the objects are put into moto's backend in this
process (~30 us each), a listing finds its prefix's keys by bisection in the sorted key list, as
S3's index does, and the ListObjectsV2 answer moto built (its own dict: keys, sizes, ETags,
continuation token) is written as S3's XML directly. moto still routes and parses each request
and paginates, over real HTTP. ``--latency-ms`` delays every listing answer (S3's round trip per
page of 1,000 keys; the requests are served in threads, so delays overlap).

    python bench/moto_indexed.py N PORT [--per-folder 1000] [--latency-ms 0]

Prints "ready" on stdout once the objects are in and the server listens.
"""
from __future__ import annotations

import argparse
import bisect
import logging
import sys
import time
from xml.sax.saxutils import escape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("port", type=int)
    ap.add_argument("--per-folder", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    a = ap.parse_args()

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.responses import BaseResponse
    from moto.s3.models import FakeDeleteMarker, S3Backend, s3_backends
    from moto.server import ThreadedMotoServer

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket("scale", "us-east-1")
    t = time.perf_counter()
    for i in range(a.n):
        backend.put_object("scale", f"p/d{i // a.per_folder:05d}/s{i:07d}.jpg", b"\xff\xd8")
    names = sorted(backend.get_bucket("scale").keys.keys())
    print(f"put {a.n} objects into moto's backend in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    plain_list = S3Backend.list_objects
    plain_list_v2 = S3Backend.list_objects_v2

    def list_objects(self, bucket, prefix, delimiter, marker, max_keys):
        if bucket.name != "scale":
            return plain_list(self, bucket, prefix, delimiter, marker, max_keys)
        prefix = prefix or ""
        lo = bisect.bisect_left(names, prefix)
        hi = bisect.bisect_left(names, prefix + "\U0010ffff")
        keys, folders = [], set()
        for name in names[lo:hi]:
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                folders.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            else:
                key = bucket.keys[name]
                if not isinstance(key, FakeDeleteMarker):
                    keys.append(key)
        folders = sorted(folders)
        if marker:
            keys = self._get_results_from_token(keys, self._pagination_tokens.get(marker) or marker)
        if max_keys is not None:
            keys, truncated, next_marker = self._truncate_result(keys, max_keys)
            return keys, folders, truncated, next_marker
        return keys, folders, False, None

    def list_objects_v2(self, *args, **kwargs):
        if a.latency_ms:
            time.sleep(a.latency_ms / 1e3)
        return plain_list_v2(self, *args, **kwargs)

    plain_serialized = BaseResponse.serialized

    def serialized(self, action_result):
        if self.data.get("Action") != "ListObjectsV2":
            return plain_serialized(self, action_result)
        return 200, {"Content-Type": "application/xml"}, list_v2_xml(action_result.result)

    S3Backend.list_objects = list_objects
    S3Backend.list_objects_v2 = list_objects_v2
    BaseResponse.serialized = serialized
    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=a.port, verbose=False)
    server.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()        # until the benchmark closes our stdin
    finally:
        server.stop()


def list_v2_xml(r: dict) -> str:
    """S3's ListBucketResult for moto's ListObjectsV2 result dict."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n'
           '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">']
    for tag in ("Name", "Prefix", "MaxKeys", "KeyCount", "Delimiter", "EncodingType",
                "NextContinuationToken", "StartAfter"):
        if tag in r:
            out.append(f"<{tag}>{escape(str(r[tag]))}</{tag}>")
    out.append(f"<IsTruncated>{'true' if r['IsTruncated'] else 'false'}</IsTruncated>")
    out += [f"<Contents><Key>{escape(c['Key'])}</Key><LastModified>{c['LastModified']}"
            f"</LastModified><ETag>{escape(c['ETag'])}</ETag><Size>{c['Size']}</Size>"
            f"<StorageClass>{c['StorageClass']}</StorageClass></Contents>"
            for c in r["Contents"]]
    out += [f"<CommonPrefixes><Prefix>{escape(p['Prefix'])}</Prefix></CommonPrefixes>"
            for p in r.get("CommonPrefixes", ())]
    return "".join(out) + "</ListBucketResult>"


if __name__ == "__main__":
    main()
