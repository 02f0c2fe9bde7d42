"""probe_qa, first part: parquet image datasets read one row group at a time, bad files/groups/images recorded."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlprep.failures import FailureLog, ItemError
from mlprep.probe.reader import image_bytes, iter_row_groups, list_row_groups
from mlprep.views import decode_image


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
    def decode(value, images_dir=None):
        return decode_image(image_bytes(value, images_dir), 8)

    assert decode(_png((255, 0, 0)))[:, 0, 0].tolist() == [255, 0, 0]
    assert decode({"bytes": _png((0, 0, 255)), "path": None}).shape == (3, 8, 8)
    assert decode({"bytes": None, "path": "x.png"}, tmp_path / "imgs")[:, 0, 0].tolist() == [0, 255, 0]
    assert decode("x.png", tmp_path / "imgs").shape[0] == 3
    for value, code in [(b"not an image", "not_an_image"), ("../secret.png", "unsafe_path"),
                        ("/etc/passwd", "unsafe_path"), ("gone.png", "missing"), (None, "not_an_image"),
                        (3, "not_an_image")]:
        with pytest.raises(ItemError) as err:
            decode(value, tmp_path / "imgs")
        assert err.value.code == code, value


def _failures(n: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = np.array(["cat", "dog", "fox", "owl"])
    return pd.DataFrame({"file": np.where(np.arange(n) % 3 == 0, "a.parquet", "b.parquet"), "row": np.arange(n),
                         "label": labels[rng.integers(0, 4, n)], "prediction": labels[rng.integers(0, 4, n)],
                         "factor": np.array(["blur", "occlusion", None], dtype=object)[rng.integers(0, 3, n)]})


def test_sampler_is_stratified_seeded_and_independent_of_chunking_and_order():
    from mlprep.probe.sampler import KeySampler

    frame = _failures(5000)
    whole = KeySampler(7, seed=1).feed([frame]).result()
    chunks = KeySampler(7, seed=1).feed([frame.iloc[i : i + 333] for i in range(0, 5000, 333)]).result()
    shuffled = frame.sample(frac=1, random_state=3)
    reordered = KeySampler(7, seed=1).feed([shuffled.iloc[:2500], shuffled.iloc[2500:]]).result()
    for other in (chunks, reordered):
        assert whole[["file", "row", "key"]].equals(other[["file", "row", "key"]])
    counts = whole.groupby("key").size()
    assert len(counts) == 16 and (counts == 7).all()
    assert (whole["key_failures"] == whole["key"].map(frame.assign(
        key=frame["label"] + " -> " + frame["prediction"]).groupby("key").size())).all()
    assert not KeySampler(7, seed=2).feed([frame]).result()[["file", "row"]].equals(whole[["file", "row"]])
    # a key with fewer failures than per_key gives all of them; keys by factor name the unverified ones
    rare = frame.iloc[:3].assign(label="zebra", prediction="horse")
    small = KeySampler(7, seed=1, key_by="both").feed([frame, rare]).result()
    assert (small["key"].str.startswith("zebra -> horse")).sum() == 3
    assert small["key"].str.endswith("| unverified").any()
    # roughly uniform: over many seeds each failure of a key is picked about per_key / size of the time
    key = frame["label"].eq("cat") & frame["prediction"].eq("dog")
    hits = pd.Series(0, index=frame.index[key])
    for seed in range(200):
        picked = KeySampler(7, seed).feed([frame[key]]).result()["row"]
        hits[picked.to_numpy()] += 1
    expected = 200 * 7 / key.sum()
    assert abs(hits.mean() - expected) < 1e-9 and hits.std() < 0.5 * expected


def test_zero_shot_probe_streams_row_groups_and_records_bad_images(tmp_path, tiny_clip):
    import torch

    from mlprep.encoders import ClipEncoder, ModelSpec
    from mlprep.probe.zero_shot import PROBE_COLUMNS, ZeroShot, probe_rows

    data = tmp_path / "data"
    data.mkdir()
    images = [_png((255, 0, 0)), _png((0, 255, 0)), b"broken", _png((0, 0, 255)), _png((9, 9, 9))]
    labels = ["red", "green", "red", "blue", "purple"]  # purple: not in the label set
    pq.write_table(pa.table({"image": images, "label": labels}), data / "a.parquet", row_group_size=2)
    spec = ModelSpec(tiny_clip["name"], tiny_clip["pretrained"], tiny_clip["config_file"])
    encoder = ClipEncoder(spec, torch.device("cpu"), torch.float32, batch_size=2)
    probe = ZeroShot(encoder, ["red", "green", "blue"], "a {label} square")
    failures = FailureLog(True)
    result = pd.concat(probe_rows(data, list_row_groups(data).frame, probe, failures), ignore_index=True)
    assert list(result.columns) == PROBE_COLUMNS and result["item_id"].tolist() == [
        "a.parquet:0", "a.parquet:1", "a.parquet:3"]
    assert result["prediction"].isin(["red", "green", "blue"]).all() and result["score"].between(1 / 3, 1).all()
    assert (result["correct"] == (result["label"] == result["prediction"])).all()
    assert {(f.item_id, f.reason_code) for f in failures.records} == {("a.parquet:2", "not_an_image"),
                                                                      ("a.parquet:4", "bad_record")}
    # the same image gives the same prediction whatever its batch, and with the images read by two workers
    wide = ZeroShot(ClipEncoder(spec, torch.device("cpu"), torch.float32, batch_size=64), probe.labels, probe.template)
    again = pd.concat(probe_rows(data, list_row_groups(data).frame, wide, FailureLog(True), workers=2))
    again = again.sort_values("row").reset_index(drop=True)
    assert again["prediction"].tolist() == result["prediction"].tolist()
    np.testing.assert_allclose(again["score"], result["score"], rtol=1e-5)


def test_the_sampler_benchmark_runs_on_the_layout_the_probe_writes(tmp_path):
    """bench/probe_sampler.py at a small size (a check that its synthetic failure cases still have every column the
    sampler step reads, not a timing): every (label, prediction) key sampled, per_key of each at most."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "probe_sampler.py"
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(bench), "--rows", "20000", "--labels", "5", "--per-key", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["rows"] == 20000 and figures["keys"] == 25 and figures["sampled"] == 25 * 3
