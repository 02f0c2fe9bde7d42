"""Data sets as users hold them (mlprep.sources): folders of files, webdataset tars and parquet files of bytes,
indexed per container, read by position, and every bad container or member reported."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from mlprep.demo import pack_files
from mlprep.failures import REASON_CODES, ItemError
from mlprep.sku.catalog import Source, read_catalog
from mlprep.sources import ItemReader, bytes_column, index_dataset

SKU_DATA = REPO / "resources/demo/sku/sku_data.json"
IMAGES = REPO / "resources/demo/sku/images"


def _bytes_of(items, reader=None):
    reader = reader or ItemReader(what="image file")
    return {i.item_id: reader.read(*i.location) for i in items}


@pytest.mark.parametrize("form", ["webdataset", "parquet", "parquet-struct"])
def test_the_same_images_in_tars_or_parquet_are_the_same_items_with_the_same_bytes(tmp_path, form):
    fmt = form.split("-")[0]
    pack_files(IMAGES, tmp_path / "data", fmt, per_container=10, struct=form.endswith("struct"))
    files = read_catalog(SKU_DATA, IMAGES, 4)
    packed = read_catalog(SKU_DATA, Source(str(tmp_path / "data"), fmt), 4, tmp_path / "cache")
    assert packed.failures == [] and len(packed.items) == len(files.items) == 32
    reader = ItemReader(what="image file")
    expected = _bytes_of(files.items)
    assert _bytes_of(packed.items, reader) == expected
    own = sum(len(b) for b in expected.values())  # only the items' own bytes (parquet: with its offsets, names)
    assert reader.bytes_read == own if fmt == "webdataset" else own <= reader.bytes_read <= 1.1 * own
    if fmt == "parquet":  # a row group is never split over shards: a job reads each of its row groups once
        groups = pd.DataFrame([(i.path, i.group, i.shard) for i in packed.items], columns=["path", "group", "shard"])
        assert (groups.groupby(["path", "group"])["shard"].nunique() == 1).all()
    else:
        assert [i.shard for i in packed.items] == [i.shard for i in files.items]


def test_a_catalog_may_name_tar_members_by_key_and_parquet_rows_by_key(tmp_path):
    pack_files(IMAGES, tmp_path / "tars", "webdataset", per_container=10)
    pack_files(IMAGES, tmp_path / "pq", "parquet", per_container=10, key_with_ext=False)
    by_key = tmp_path / "sku_data.json"
    by_key.write_text(SKU_DATA.read_text().replace(".jpg", ""))
    expected = list(_bytes_of(read_catalog(SKU_DATA, IMAGES, 4).items).values())
    for folder, fmt in ((tmp_path / "tars", "webdataset"), (tmp_path / "pq", "parquet")):
        catalog = read_catalog(by_key, Source(str(folder), fmt), 4, tmp_path / f"cache-{fmt}")
        assert catalog.failures == [] and list(_bytes_of(catalog.items).values()) == expected
        assert catalog.items[0].image == "sku0000_0" and catalog.items[0].member.startswith("sku0000_0")


def test_the_index_is_read_once_per_container_and_a_changed_container_alone_is_read_again(tmp_path):
    pack_files(IMAGES, tmp_path / "tars", "webdataset", per_container=10)
    first = index_dataset(tmp_path / "tars", "webdataset", tmp_path / "cache")
    again = index_dataset(tmp_path / "tars", "webdataset", tmp_path / "cache")
    pd.testing.assert_frame_equal(first.frame, again.frame)
    # make the cache of one container wrong: an unchanged container is taken from the cache, not re-read
    members = pd.read_parquet(tmp_path / "cache/containers/members.parquet")
    members.loc[members["container"] == "00001.tar", "size"] = 7
    members.to_parquet(tmp_path / "cache/containers/members.parquet", index=False)
    assert (index_dataset(tmp_path / "tars", "webdataset", tmp_path / "cache")
            .frame.query("container == '00001.tar'")["size"] == 7).all()
    os.utime(tmp_path / "tars/00001.tar", ns=(1, 1))  # changed: re-read
    fresh = index_dataset(tmp_path / "tars", "webdataset", tmp_path / "cache")
    pd.testing.assert_frame_equal(fresh.frame, first.frame)
    assert fresh.stamps["00001.tar"] != first.stamps["00001.tar"]


def test_bad_containers_and_members_are_failure_records_naming_container_and_member(tmp_path):
    data = tmp_path / "tars"
    pack_files(IMAGES, data, "webdataset", per_container=16)
    with tarfile.open(data / "00002.tar", "w") as archive:  # an evil and a repeated member
        for name, payload in (("../escape.jpg", b"x"), ("sku0000_0.jpg", b"again")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    (data / "00003.tar").write_bytes(b"no tar at all" * 100)
    raw = (data / "00001.tar").read_bytes()
    (data / "00004.tar").write_bytes(raw[: len(raw) // 2])  # a truncated copy: its members repeat 00001's
    catalog = read_catalog(SKU_DATA, Source(str(data), "webdataset"), 4, tmp_path / "cache")
    codes = sorted(f.reason_code for f in catalog.failures)
    assert set(codes) == {"unsafe_path", "duplicate_key", "bad_container", "truncated"}
    assert all(f.reason_code in REASON_CODES for f in catalog.failures)
    by_code = {f.reason_code: f for f in catalog.failures}
    assert by_code["unsafe_path"].path.endswith("00002.tar#../escape.jpg")
    assert by_code["bad_container"].path.endswith("00003.tar") and "not a tar" in by_code["bad_container"].reason
    assert len(catalog.items) == 32  # the first of each repeated member is kept, nothing else lost
    assert _bytes_of(catalog.items) == _bytes_of(read_catalog(SKU_DATA, IMAGES, 4).items)


def test_a_parquet_file_without_the_column_or_names_is_one_failure_naming_it(tmp_path):
    pack_files(IMAGES, tmp_path / "pq", "parquet", per_container=16)
    pq.write_table(pa.table({"key": ["x.jpg"], "caption": ["no image column"]}), tmp_path / "pq/00009.parquet")
    pq.write_table(pa.table({"jpg": [b"\xff\xd8"]}), tmp_path / "pq/00010.parquet")
    catalog = read_catalog(SKU_DATA, Source(str(tmp_path / "pq"), "parquet"), 4, tmp_path / "cache")
    failures = {f.path.rsplit("/", 1)[1]: f for f in catalog.failures}
    assert failures["00009.parquet"].reason_code == "missing_column" and "no bytes column" in \
        failures["00009.parquet"].reason
    assert failures["00010.parquet"].reason_code == "missing_column" and "no name" in failures["00010.parquet"].reason
    assert len(catalog.items) == 32
    with pytest.raises(KeyError, match="no column 'png'"):  # a named column is the one required
        bytes_column(pq.ParquetFile(tmp_path / "pq/00000.parquet").schema_arrow, "png")


def _changed_and_vanished(reader: ItemReader, changed, vanished) -> None:
    """Reading an item of a container that changed, and of one that vanished, fails that item with its code."""
    with pytest.raises(ItemError, match="changed after it was indexed") as err:
        reader.read(*changed.location)
    assert err.value.code == "changed"
    with pytest.raises(ItemError, match="vanished") as err:
        reader.read(*vanished.location)
    assert err.value.code == "missing"


def test_a_container_that_changes_or_vanishes_after_the_index_fails_its_items_not_the_job(tmp_path):
    pack_files(IMAGES, tmp_path / "tars", "webdataset", per_container=16)
    pack_files(IMAGES, tmp_path / "pq", "parquet", per_container=16)
    for folder, fmt in ((tmp_path / "tars", "webdataset"), (tmp_path / "pq", "parquet")):
        items = read_catalog(SKU_DATA, Source(str(folder), fmt), 1, tmp_path / f"c-{fmt}").items
        first = next(i for i in items if i.path.endswith("00000" + (".tar" if fmt == "webdataset" else ".parquet")))
        second = next(i for i in items if i.path != first.path)
        with open(first.path, "ab") as handle:
            handle.write(b"\0" * 1024)  # appended to: a new size, so a new stamp
        os.remove(second.path)
        _changed_and_vanished(ItemReader(), first, second)


def test_a_reader_handed_to_a_worker_process_opens_its_own_descriptors(tmp_path):
    import pickle

    pack_files(IMAGES, tmp_path / "tars", "webdataset", per_container=16)
    items = read_catalog(SKU_DATA, Source(str(tmp_path / "tars"), "webdataset"), 1, tmp_path / "c").items
    reader = ItemReader(what="image file")
    reader.read(*items[0].location)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fds == {} and clone.read(*items[1].location) == reader.read(*items[1].location)
    reader.close()
    assert np.all([len(clone.read(*i.location)) == i.size for i in items])


# ---------------------------------------------------------------- object storage (a real local S3 server)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_containers_in_a_bucket_are_read_with_ranged_gets_and_give_the_same_bytes(tmp_path, s3_server, fmt):
    from mlprep.storage import count_requests

    pack_files(IMAGES, s3_server.root / "bucket" / "data", fmt, per_container=10)
    source = Source("s3://bucket/data", fmt, storage=s3_server.storage)
    catalog = read_catalog(SKU_DATA, source, 4, tmp_path / "cache")
    assert catalog.failures == [] and len(catalog.items) == 32
    assert catalog.items[0].path.startswith("s3://bucket/data/0000")
    reader = ItemReader(what="image file", storage=s3_server.storage)
    requests = count_requests(s3_server.storage)
    assert _bytes_of(catalog.items, reader) == _bytes_of(read_catalog(SKU_DATA, IMAGES, 4).items)
    containers = len({i.path for i in catalog.items})
    assert requests["HeadObject"] == containers  # each container's ETag checked once
    if fmt == "webdataset":
        assert requests["GetObject"] == 32  # one ranged GET per member, nothing more
        assert reader.bytes_read == sum(i.size for i in catalog.items)


def test_a_rerun_over_a_bucket_makes_only_listing_requests(tmp_path, s3_server):
    from mlprep.storage import count_requests

    pack_files(IMAGES, s3_server.root / "bucket" / "tars", "webdataset", per_container=4)  # 8 tars
    first = index_dataset("s3://bucket/tars", "webdataset", tmp_path / "cache", storage=s3_server.storage)
    requests = count_requests(s3_server.storage)
    again = index_dataset("s3://bucket/tars", "webdataset", tmp_path / "cache", storage=s3_server.storage)
    pd.testing.assert_frame_equal(first.frame, again.frame)
    assert dict(requests) == {"ListObjectsV2": 1}
    # a changed object is read again, and only it
    (s3_server.root / "bucket/tars/00003.tar").write_bytes((s3_server.root / "bucket/tars/00002.tar").read_bytes())
    requests.clear()
    changed = index_dataset("s3://bucket/tars", "webdataset", tmp_path / "cache", storage=s3_server.storage)
    assert requests["ListObjectsV2"] == 1 and 1 <= requests["GetObject"] <= 2 and set(requests) <= {
        "ListObjectsV2", "GetObject"}
    assert changed.stamps["00003.tar"] != first.stamps["00003.tar"]
    assert {p.reason_code for p in changed.problems} == {"duplicate_key"}  # its members repeat 00002's


def test_an_object_that_changes_or_vanishes_after_the_index_fails_its_items(tmp_path, s3_server):
    pack_files(IMAGES, s3_server.root / "bucket" / "tars", "webdataset", per_container=16)
    items = read_catalog(SKU_DATA, Source("s3://bucket/tars", "webdataset", storage=s3_server.storage), 1,
                         tmp_path / "cache").items
    first = next(i for i in items if i.path.endswith("00000.tar"))
    second = next(i for i in items if i.path.endswith("00001.tar"))
    with open(s3_server.root / "bucket/tars/00000.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    (s3_server.root / "bucket/tars/00001.tar").unlink()
    _changed_and_vanished(ItemReader(storage=s3_server.storage), first, second)


def test_wrong_credentials_or_a_missing_bucket_are_one_clear_error_naming_the_url(tmp_path, s3_server, monkeypatch):
    from mlprep.storage import StorageError

    pack_files(IMAGES, s3_server.root / "bucket" / "tars", "webdataset", per_container=16)
    with pytest.raises(StorageError, match=r"s3://nobucket/tars: no such bucket"):
        index_dataset("s3://nobucket/tars", "webdataset", None, storage=s3_server.storage)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=r"s3://bucket/tars: access denied .*AWS_ACCESS_KEY_ID") as err:
        index_dataset("s3://bucket/tars", "webdataset", None, storage={**s3_server.storage, "max_attempts": 2})
    assert "not-the-secret" not in str(err.value)


class _Members:
    """A dataset of located items, read in a worker process (as an encode job's readers read)."""

    def __init__(self, items, reader):
        self.items, self.reader = items, reader

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.reader.read(*self.items[k].location)


def test_worker_processes_forked_after_the_parent_used_the_store_read_with_clients_of_their_own(tmp_path, s3_server):
    from mlprep.workers import in_order

    pack_files(IMAGES, s3_server.root / "bucket" / "tars", "webdataset", per_container=16)
    items = read_catalog(SKU_DATA, Source("s3://bucket/tars", "webdataset", storage=s3_server.storage), 1,
                         tmp_path / "cache").items
    reader = ItemReader(storage=s3_server.storage)
    expected = [reader.read(*i.location) for i in items]  # the parent's client exists before the fork
    assert list(in_order(_Members(items, reader), workers=2)) == expected


def test_a_throttling_store_is_retried_with_backoff_and_counted_and_fails_an_item_only_past_max_attempts(
        tmp_path, s3_server):
    import mlprep.storage
    from s3_faults import ThrottlingProxy

    pack_files(IMAGES, s3_server.root / "bucket" / "tars", "webdataset", per_container=16)
    items = read_catalog(SKU_DATA, Source("s3://bucket/tars", "webdataset", storage=s3_server.storage), 1,
                         tmp_path / "cache").items[:6]
    expected = _bytes_of(items, ItemReader(storage=s3_server.storage))
    proxy = ThrottlingProxy(s3_server.endpoint, every=2)  # every second GET answered 503 SlowDown
    try:
        mlprep.storage.REFUSED.clear()
        reader = ItemReader(storage={"endpoint_url": proxy.endpoint})
        assert _bytes_of(items, reader) == expected
        assert proxy.throttled >= 3 and dict(mlprep.storage.REFUSED) == {"503 SlowDown": proxy.throttled}
    finally:
        proxy.stop()
    proxy = ThrottlingProxy(s3_server.endpoint, every=1)  # every GET: past max_attempts, the item fails alone
    try:
        reader = ItemReader(storage={"endpoint_url": proxy.endpoint, "max_attempts": 2})
        with pytest.raises(ItemError, match=r"00000\.tar: member .* cannot be read") as err:
            reader.read(*items[0].location)
        assert err.value.code == "storage_error" and proxy.throttled == 2
    finally:
        proxy.stop()
