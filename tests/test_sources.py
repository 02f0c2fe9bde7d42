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
        reader = ItemReader()
        with pytest.raises(ItemError, match="changed after it was indexed") as err:
            reader.read(*first.location)
        assert err.value.code == "changed"
        with pytest.raises(ItemError, match="vanished") as err:
            reader.read(*second.location)
        assert err.value.code == "missing"


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
