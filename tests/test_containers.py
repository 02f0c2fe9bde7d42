"""Webdataset tar shards (mlprep.containers): the index of a tar's members, positioned reads, and every kind of
member that gives no item reported, never dropped."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlprep.containers import ContainerError, index_tar, read_member, samples, split_key
from mlprep.failures import REASON_CODES, ItemError


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for member in members:
            _add(archive, *member)


def test_a_shard_as_img2dataset_writes_it_reads_back_byte_for_byte_by_position(tmp_path):
    payload = {f"{k:09d}": os.urandom(300 + 997 * k) for k in range(5)}
    members = []
    for key, data in payload.items():
        members += [(f"{key}.jpg", data), (f"{key}.json", b'{"caption": "x"}'), (f"{key}.txt", b"a red mug")]
    _tar(tmp_path / "00000.tar", [("00000", b"", tarfile.DIRTYPE)] + members)
    found, problems = index_tar(tmp_path / "00000.tar")
    assert problems == [] and len(found) == 15
    grouped = samples(found)
    assert list(grouped) == list(payload) and set(grouped["000000003"]) == {"jpg", "json", "txt"}
    fd = os.open(tmp_path / "00000.tar", os.O_RDONLY)
    try:
        with ThreadPoolExecutor(4) as pool:  # positioned reads share one descriptor safely
            got = list(pool.map(lambda key: read_member(fd, grouped[key]["jpg"]), payload))
    finally:
        os.close(fd)
    assert got == list(payload.values())


def test_keys_end_at_the_first_dot_of_the_file_name_as_webdataset_splits_them():
    assert split_key("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_key("dir.v2/a.b.jpg") == ("dir.v2/a", "b.jpg")  # a dot in a folder is not the split
    assert split_key("a.seg.npy") == ("a", "seg.npy")
    assert split_key("README") == ("", "") and split_key(".hidden") == ("", "") and split_key("x.") == ("", "")


def test_every_member_that_gives_no_item_is_one_problem_with_its_reason(tmp_path):
    _tar(tmp_path / "bad.tar", [
        ("ok.jpg", b"fine"),
        ("../evil.jpg", b"out"),
        ("/etc/evil.jpg", b"abs"),
        ("sub/../../evil2.jpg", b"climb"),
        ("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard.jpg", b"", tarfile.LNKTYPE, "ok.jpg"),
        ("fifo.jpg", b"", tarfile.FIFOTYPE),
        ("NOTES", b"no extension"),
        ("ok.jpg", b"again"),
        ("ok.txt", b"caption"),
    ])
    found, problems = index_tar(tmp_path / "bad.tar")
    assert [(m.key, m.ext) for m in found] == [("ok", "jpg"), ("ok", "txt")]
    assert [(p.member, p.reason_code) for p in problems] == [
        ("../evil.jpg", "unsafe_path"), ("/etc/evil.jpg", "unsafe_path"), ("sub/../../evil2.jpg", "unsafe_path"),
        ("link.jpg", "not_a_file"), ("hard.jpg", "not_a_file"), ("fifo.jpg", "not_a_file"),
        ("NOTES", "unkeyed_member"), ("ok.jpg", "duplicate_key")]
    assert all(p.reason_code in REASON_CODES and "bad.tar" in p.reason for p in problems)
    fd = os.open(tmp_path / "bad.tar", os.O_RDONLY)
    try:
        assert read_member(fd, found[0]) == b"fine"  # the first of the duplicates is the one kept
    finally:
        os.close(fd)


def test_a_truncated_tar_keeps_the_members_before_the_break_and_says_where(tmp_path):
    _tar(tmp_path / "whole.tar", [(f"{k}.jpg", os.urandom(5000)) for k in range(4)])
    data = (tmp_path / "whole.tar").read_bytes()
    whole, _ = index_tar(tmp_path / "whole.tar")
    cut = whole[2].offset + 100  # inside the third member's data
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    found, problems = index_tar(tmp_path / "cut.tar")
    assert [m.name for m in found] == ["0.jpg", "1.jpg"]
    assert [(p.member, p.reason_code) for p in problems][:1] == [("2.jpg", "truncated")]
    # a member indexed before the file was cut is a truncated item when read, not a short one
    fd = os.open(tmp_path / "cut.tar", os.O_RDONLY)
    try:
        with pytest.raises(ItemError, match="member '2.jpg' ends 4900 bytes short") as err:
            read_member(fd, whole[2], "cut.tar")
        assert err.value.code == "truncated"
    finally:
        os.close(fd)


def test_files_that_are_no_uncompressed_tar_stop_naming_the_file(tmp_path):
    _tar(tmp_path / "plain.tar", [("a.jpg", b"x")])
    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    with pytest.raises(ContainerError, match=r"shard.tar.gz: a gzip-compressed tar"):
        index_tar(tmp_path / "shard.tar.gz")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ContainerError, match=r"junk.tar: not a tar file"):
        index_tar(tmp_path / "junk.tar")
    with pytest.raises(ContainerError, match=r"gone.tar: cannot be read"):
        index_tar(tmp_path / "gone.tar")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_reader_finds_what_tarfile_finds_in_every_tar_format(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 70  # a ustar prefix, a GNU long name or a pax path, by format
    names = ["a.jpg", f"{deep}/f.jpg", "ü/ñ.jpg", "sub/x.seg.npy"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("g" * 150 + ".jpg")  # too long for ustar
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as archive:
        for k, name in enumerate(names):
            _add(archive, name, os.urandom(100 + 700 * k))
    found, problems = index_tar(tmp_path / "t.tar")
    with tarfile.open(tmp_path / "t.tar") as archive:
        expected = [(i.name, i.offset_data, i.size) for i in archive if i.isfile()]
    assert problems == [] and [(m.name, m.offset, m.size) for m in found] == expected


def test_a_tar_the_tar_command_wrote_with_dot_slash_names_indexes_without_them(tmp_path):
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.jpg").write_bytes(b"A" * 700)
    (tmp_path / "src" / "sub" / "b.txt").write_bytes(b"caption")
    subprocess.run(["tar", "-cf", str(tmp_path / "c.tar"), "-C", str(tmp_path / "src"), "."], check=True)
    found, problems = index_tar(tmp_path / "c.tar")
    assert problems == [] and sorted((m.key, m.ext) for m in found) == [("a", "jpg"), ("sub/b", "txt")]


def test_a_tar_cut_inside_a_header_or_without_its_end_blocks_is_truncated(tmp_path):
    _tar(tmp_path / "whole.tar", [(f"{k}.jpg", os.urandom(600)) for k in range(3)])
    data = (tmp_path / "whole.tar").read_bytes()
    whole, _ = index_tar(tmp_path / "whole.tar")
    end_of_last = whole[-1].offset + 1024  # the last member's data, padded to blocks
    for cut in (whole[1].offset - 200, end_of_last):  # in the second header; right before the end blocks
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        found, problems = index_tar(tmp_path / "cut.tar")
        assert [p.reason_code for p in problems] == ["truncated"] and problems[0].member is None
        assert len(found) == (1 if cut < whole[1].offset else 3)
