"""Webdataset tar shards as containers of items (issue 25's first step; the pipelines do not read them yet).

A tar is indexed once: every member's name, the offset of its data in the file and its size, read from the tar's
headers with the standard `tarfile` module (no member's data is read). A job then reads only its own members, each
with one positioned read (`os.pread`), so that a shard list can name a container and a range of its members instead
of a million paths.

Members are grouped into samples by key the way webdataset and img2dataset name them: `{key}.{ext}`, where the key
is the member's folder and its file name up to the **first** dot, and the extension is everything after it
(`dir/000123.jpg` -> key `dir/000123`, ext `jpg`; `dir/a.b.jpg` -> key `dir/a`, ext `b.jpg`). So a key never holds
a dot; a catalog naming members by key must follow the same rule.

What a tar may hold that is not a usable item becomes one problem each (member name, reason code, reason), never a
silent drop: a name that is absolute or climbs out with `..` (`unsafe_path`), a link, device or other non-regular
file (`not_a_file`; folders are skipped, they hold nothing), a name with no key or no extension (`unkeyed_member`),
a repeat of an earlier member's key and extension (`duplicate_key`; the first is kept), data that runs past the end
of the file (`truncated`). A file that is not an uncompressed tar stops with a ContainerError that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlprep.failures import ItemError

COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class ContainerError(ValueError):
    """A container that cannot be indexed at all; the message names the file."""


@dataclass(frozen=True)
class Member:
    """One regular file inside a tar: where its data lies."""

    name: str
    key: str
    ext: str
    offset: int
    size: int


@dataclass(frozen=True)
class Problem:
    """A member (or, with member None, the tar itself) that gives no item, and why."""

    member: str | None
    reason_code: str
    reason: str


def split_key(name: str) -> tuple[str, str]:
    """`dir/a.b.jpg` -> (`dir/a`, `b.jpg`): the key ends at the file name's first dot ('' where there is none)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _unsafe(name: str) -> bool:
    """Absolute, or climbing out with a `..` part (string tests: a million members are checked per index)."""
    return name.startswith("/") or name == ".." or name.startswith("../") or "/../" in name or name.endswith("/..")


BLOCK = 512
REGULAR_TYPES = (b"0", b"\x00", b"7")
SKIPPED_TYPES = (b"5", b"g", b"V")  # folders, global pax headers, volume labels: they hold no member


def _number(field: bytes) -> int:
    """A tar header's number: octal ASCII, or base-256 (GNU) when the first byte's high bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ('<length> <key>=<value>\\n' each)."""
    out, at = {}, 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0:
            break
        length = int(data[at:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


def _checksum_ok(header: bytes) -> bool:
    """A pre-POSIX header has no magic: its checksum is what tells it from other bytes."""
    try:
        return _number(header[148:156]) == sum(header[:148]) + 256 + sum(header[156:])
    except ValueError:
        return False


class _Blocks:
    """Positioned reads of a file through one window, so that the headers of small members cost one read per
    window, not one per member (`pread(size, offset)`: os.pread locally, a ranged GET from object storage, where
    the window is larger)."""

    def __init__(self, pread, window: int):
        self.pread, self.window, self.start, self.data = pread, window, 0, b""

    def read(self, offset: int, size: int, ahead: bool = True) -> bytes:
        """`size` bytes at `offset`; on a miss, a whole window is read when `ahead` (more headers are near)."""
        if not (self.start <= offset and offset + size <= self.start + len(self.data)):
            self.start, self.data = offset, self.pread(max(size, self.window) if ahead else size, offset)
        return self.data[offset - self.start : offset - self.start + size]


def _headers(path, pread, file_size: int, window: int):
    """(name, type, offset of data, size) of every header of a tar, GNU long names and pax records applied;
    raises ContainerError where the first header is not a tar's, and _BrokenOff where a later one breaks off."""
    blocks = _Blocks(pread, window)
    offset, pending, n, ahead = 0, {}, 0, True
    while offset + BLOCK <= file_size:
        header = blocks.read(offset, BLOCK, ahead)
        if header == bytes(BLOCK):
            return
        if header[257:262] != b"ustar" and not _checksum_ok(header):  # ustar, GNU and pax headers say so
            if n == 0:
                raise ContainerError(f"{path}: not a tar file (its first header's checksum does not match)")
            raise _BrokenOff(f"the header at byte {offset} is not a tar header")
        size, kind = _number(header[124:136]), header[156:157]
        data = offset + BLOCK
        offset = data + -(-size // BLOCK) * BLOCK
        ahead = size < blocks.window // 4  # after a large member, read the next header alone, not a window of data
        n += 1
        if kind in (b"L", b"K", b"x"):  # the next header's long name, long link or pax records
            if data + size > file_size:
                raise _BrokenOff(f"a long-name header at byte {data - BLOCK} runs past the end")
            value = blocks.read(data, size)
            if kind == b"L":
                pending["path"] = value.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pending.update(_pax(value))
            continue
        name = _text(header[:100])
        if header[257:263] == b"ustar\x00" and header[345:346] != b"\x00":
            name = _text(header[345:500]) + "/" + name
        name = pending.get("path", name)
        if "size" in pending:
            size = int(pending["size"])
            offset = data + -(-size // BLOCK) * BLOCK
        pending = {}
        yield name, kind, data, size
    if offset < file_size:
        raise _BrokenOff(f"the file ends inside the header at byte {offset}")
    raise _BrokenOff("the file ends without the zero blocks that close a tar")


class _BrokenOff(Exception):
    pass


def index_tar(path: Path | str, pread=None, file_size: int | None = None,
              window: int = 1 << 16) -> tuple[list[Member], list[Problem]]:
    """Every usable member of an uncompressed tar, in the tar's order, and a Problem for each other one.

    The headers are read directly (a few microseconds a member; `tarfile` takes ~30): a million images in a
    thousand tars are indexed within a dry-run's time. A tar elsewhere than on a local disk is read through
    `pread(size, offset)` with its `file_size` given."""
    fd = None
    if pread is None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise ContainerError(f"{path}: cannot be read: {err}") from err

        def pread(size: int, offset: int) -> bytes:
            return os.pread(fd, size, offset)

    members: list[Member] = []
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    try:
        file_size = os.fstat(fd).st_size if file_size is None else file_size
        head = pread(6, 0)
        for magic, kind in COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise ContainerError(f"{path}: a {kind}-compressed tar, whose members cannot be read by position; "
                                     f"store shards uncompressed (img2dataset and webdataset write them so)")
        if file_size < BLOCK:
            raise ContainerError(f"{path}: not a tar file ({file_size} bytes, less than one header)")
        try:
            for name, kind, data, size in _headers(path, pread, file_size, window):
                problem = _member_problem(path, name, kind, data, size, file_size)
                if problem is None:
                    name = name[2:] if name.startswith("./") else name
                    key, ext = split_key(name)
                    if not key:
                        problem = Problem(name, "unkeyed_member", f"{path}: member {name!r} is not named key.ext")
                    elif (key, ext) in seen:
                        problem = Problem(name, "duplicate_key", f"{path}: member {name!r} repeats key {key!r} "
                                                                 f"with extension {ext!r}; the first is kept")
                    else:
                        seen.add((key, ext))
                        members.append(Member(name, key, ext, data, size))
                        continue
                if problem.reason_code:
                    problems.append(problem)
        except _BrokenOff as err:  # the members before the break stand
            problems.append(Problem(None, "truncated", f"{path}: the tar breaks off after {len(members)} members: "
                                                       f"{err}"))
    finally:
        if fd is not None:
            os.close(fd)
    return members, problems


def _member_problem(path: Path, name: str, kind: bytes, data: int, size: int, file_size: int) -> Problem | None:
    """Why a member gives no item (reason_code '' for members that are skipped quietly: folders), or None."""
    if kind in SKIPPED_TYPES or (kind in REGULAR_TYPES and name.endswith("/")):
        return Problem(name, "", "")
    if _unsafe(name):
        return Problem(name, "unsafe_path", f"{path}: member {name!r} is absolute or leaves the tar's folder")
    if kind not in REGULAR_TYPES:
        return Problem(name, "not_a_file", f"{path}: member {name!r} is a link or another non-regular file")
    if data + size > file_size:
        return Problem(name, "truncated", f"{path}: member {name!r} announces {size} bytes but the file ends "
                                          f"{data + size - file_size} bytes short")
    return None


def samples(members: list[Member]) -> dict[str, dict[str, Member]]:
    """Members grouped by key, in the order their keys first appear: key -> {ext: member}."""
    out: dict[str, dict[str, Member]] = {}
    for member in members:
        out.setdefault(member.key, {})[member.ext] = member
    return out


def read_member(fd: int, member: Member, container: str = "") -> bytes:
    """A member's bytes from an open file descriptor of its tar, by position (no seek: safe across threads)."""
    parts, offset, left = [], member.offset, member.size
    while left:
        chunk = os.pread(fd, left, offset)
        if not chunk:
            raise ItemError("truncated", f"{container}: member {member.name!r} ends {left} bytes short")
        parts.append(chunk)
        offset += len(chunk)
        left -= len(chunk)
    return b"".join(parts)
