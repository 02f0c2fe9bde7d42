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
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
    return name.startswith("/") or ".." in PurePosixPath(name).parts


def index_tar(path: Path | str) -> tuple[list[Member], list[Problem]]:
    """Every usable member of an uncompressed tar, in the tar's order, and a Problem for each other one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError as err:
        raise ContainerError(f"{path}: cannot be read: {err}") from err
    for magic, kind in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise ContainerError(f"{path}: a {kind}-compressed tar, whose members cannot be read by position; "
                                 f"store shards uncompressed (img2dataset and webdataset write them so)")
    members: list[Member] = []
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    try:
        archive = tarfile.open(path, "r:")
    except tarfile.TarError as err:
        raise ContainerError(f"{path}: not a tar file ({err})") from err
    with archive:
        entries = iter(archive)
        while True:
            try:
                info = next(entries)
            except StopIteration:
                break
            except tarfile.TarError as err:  # a header that breaks off: the members before it stand
                problems.append(Problem(None, "truncated", f"{path}: the tar breaks off after {len(members)} "
                                                           f"members: {err}"))
                break
            name = info.name
            if info.isdir():
                continue
            if _unsafe(name):
                problems.append(Problem(name, "unsafe_path", f"{path}: member {name!r} is absolute or leaves the "
                                                              f"tar's folder"))
                continue
            if not info.isfile():
                problems.append(Problem(name, "not_a_file", f"{path}: member {name!r} is a link or another "
                                                             f"non-regular file"))
                continue
            key, ext = split_key(name)
            if not key:
                problems.append(Problem(name, "unkeyed_member", f"{path}: member {name!r} is not named key.ext"))
                continue
            if info.offset_data + info.size > size:
                problems.append(Problem(name, "truncated", f"{path}: member {name!r} announces {info.size} bytes "
                                                           f"but the file ends {info.offset_data + info.size - size} "
                                                           f"bytes short"))
                continue
            if (key, ext) in seen:
                problems.append(Problem(name, "duplicate_key", f"{path}: member {name!r} repeats key {key!r} "
                                                               f"with extension {ext!r}; the first is kept"))
                continue
            seen.add((key, ext))
            members.append(Member(name, key, ext, info.offset_data, info.size))
    return members, problems


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
