"""probe_qa, first part: parquet image datasets read one row group at a time, bad files/groups/images recorded."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlprep.failures import FailureLog, ItemError
from mlprep.probe.reader import decode_image, iter_row_groups, list_row_groups


def _png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def test_row_groups_are_listed_from_footers_and_bad_ones_are_recorded(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    table = pa.table({"image": [_png((k, 0, 0)) for k in range(6)], "label": [f"c{k % 2}" for k in range(6)]})
    pq.write_table(table, data / "a.parquet", row_group_size=2)  # 3 row groups
    pq.write_table(table, data / "b.parquet", row_group_size=3)
    raw = bytearray((data / "b.parquet").read_bytes())
    meta = pq.ParquetFile(data / "b.parquet").metadata.row_group(1).column(0)
    start = meta.data_page_offset
    raw[start + 10 : start + 60] = b"\xff" * 50  # the second row group's image pages
    (data / "b.parquet").write_bytes(bytes(raw))
    (data / "c.parquet").write_bytes(b"PAR1 nothing here")
    groups = list_row_groups(data)
    assert groups.frame["item_id"].tolist() == ["a.parquet#0", "a.parquet#1", "a.parquet#2", "b.parquet#0",
                                                "b.parquet#1"]
    assert [(f.item_id, f.reason_code) for f in groups.failures] == [("c.parquet", "unreadable_table")]
    failures = FailureLog(True)
    read = [(f, g, len(rows)) for f, g, rows in iter_row_groups(data, groups.frame, ["image", "label"], failures)]
    assert read == [("a.parquet", 0, 2), ("a.parquet", 1, 2), ("a.parquet", 2, 2), ("b.parquet", 0, 3)]
    assert [(f.item_id, f.reason_code) for f in failures.records] == [("b.parquet#1", "bad_row_group")]


def test_images_in_every_form_and_bad_ones_with_their_code(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(_png((0, 255, 0)))
    assert np.asarray(decode_image(_png((255, 0, 0))))[0, 0].tolist() == [255, 0, 0]
    assert decode_image({"bytes": _png((0, 0, 255)), "path": None}).size == (8, 8)
    assert np.asarray(decode_image({"bytes": None, "path": "x.png"}, tmp_path / "imgs"))[0, 0].tolist() == [0, 255, 0]
    assert decode_image("x.png", tmp_path / "imgs").mode == "RGB"
    for value, code in [(b"not an image", "not_an_image"), ("../secret.png", "unsafe_path"),
                        ("/etc/passwd", "unsafe_path"), ("gone.png", "missing"), (None, "not_an_image"),
                        (3, "not_an_image")]:
        with pytest.raises(ItemError) as err:
            decode_image(value, tmp_path / "imgs")
        assert err.value.code == code, value
