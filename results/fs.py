"""Where a run or a dataset lives: a local path or an object-store URI (``s3://``, ``gs://``).

One function, :func:`filesystem`, turns either into a ``pyarrow.fs.FileSystem`` and a path on
it. S3 follows the usual AWS variables: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or any
other source of the AWS SDK's default chain), ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
for S3-compatible stores such as MinIO or moto, and ``AWS_REGION``/``AWS_DEFAULT_REGION``. GCS
follows ``GOOGLE_APPLICATION_CREDENTIALS`` and ``STORAGE_EMULATOR_HOST``.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")


class StorageError(RuntimeError):
    """An object store could not be reached or a URI cannot be used."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for ``s3://...`` and ``gs://...`` locations."""
    return urlparse(str(location)).scheme in REMOTE_SCHEMES


_S3_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS")
S3_MAX_ATTEMPTS = 8            # AWS SDK attempts per request (AWS_MAX_ATTEMPTS overrides)
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0
_GCS_VARS = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")


def _store(scheme: str) -> pafs.FileSystem:
    names = _S3_VARS if scheme == "s3" else _GCS_VARS
    return _build(scheme, tuple((n, os.environ.get(n)) for n in names))


@functools.lru_cache(maxsize=8)  # one client per scheme and set of variables, per process
def _build(scheme: str, variables: tuple[tuple[str, str | None], ...]) -> pafs.FileSystem:
    env = dict(variables)
    if scheme == "s3":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            u = urlparse(endpoint)
            kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        if env.get("AWS_ACCESS_KEY_ID"):
            kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"],
                          secret_key=env.get("AWS_SECRET_ACCESS_KEY") or "",
                          session_token=env.get("AWS_SESSION_TOKEN"))
        # The AWS SDK's standard retry mode (throttling such as SlowDown/503, 5xx, dropped
        # connections), with the attempt count users set for every AWS SDK, and timeouts so a
        # stalled request fails and is retried instead of hanging a worker.
        attempts = int(env.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                                 connect_timeout=S3_CONNECT_TIMEOUT_S,
                                 request_timeout=S3_REQUEST_TIMEOUT_S, **kwargs)
    emulator = env.get("STORAGE_EMULATOR_HOST")
    if emulator:
        u = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(anonymous=True, scheme=u.scheme, endpoint_override=u.netloc)
    return pafs.GcsFileSystem()


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or an ``s3://``/``gs://`` URI.

    A local path is made absolute; a remote path is ``bucket/key`` without a trailing slash."""
    text = str(location)
    u = urlparse(text)
    if u.scheme in REMOTE_SCHEMES:
        if not u.netloc:
            raise StorageError(f"{text}: no bucket in the URI (expected {u.scheme}://BUCKET/PREFIX)")
        scheme = "s3" if u.scheme == "s3" else "gs"
        return _store(scheme), f"{u.netloc}/{u.path.lstrip('/')}".rstrip("/")
    if u.scheme == "file":
        text = u.path
    elif u.scheme and len(u.scheme) > 1:
        raise StorageError(f"{text}: unsupported storage scheme {u.scheme!r} "
                           "(a local path, s3:// or gs://)")
    return pafs.LocalFileSystem(), str(Path(text).absolute())


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The user-facing location of ``path`` on ``fs`` (``s3://bucket/key`` or a local path)."""
    if isinstance(fs, pafs.S3FileSystem):
        return f"s3://{path}"
    if isinstance(fs, pafs.GcsFileSystem):
        return f"gs://{path}"
    return path


def read_bytes(location: str) -> bytes:
    """All bytes of one file, local or remote (one GET for an object)."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "does not exist" in str(e) or "NoSuchKey" in str(e):
            raise FileNotFoundError(2, "no such object", location) from None
        raise
