"""Every parquet table the workflow writes has one declared Arrow schema (mlprep/tables.py), whatever the shard
count and whether a shard or a table is empty: checked over every pipeline's real outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, run_snakemake
from mlprep.io import write_parquet
from mlprep.tables import TABLES, conforms, table_name


def test_a_frame_becomes_its_declared_table_whatever_pandas_inferred(tmp_path):
    # an empty frame's columns come out of pandas as float64 / object: the file still has the declared types
    empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in TABLES["speaker.skipped"].names})
    write_parquet(empty, tmp_path / "skipped.parquet", "speaker.skipped")
    schema = pq.read_schema(tmp_path / "skipped.parquet")
    assert schema.field("reason").type == pa.string() and table_name(schema) == "speaker.skipped"
    assert conforms(schema, "speaker.skipped") == []
    frame = pd.DataFrame({"speaker_key": pd.array(["d/a"], dtype="string"), "dataset": ["d"], "speaker_id": ["a"],
                          "num_utterances": [1], "failed_utterances": np.array([0], np.int32), "reason": ["few"]})
    write_parquet(frame, tmp_path / "one.parquet", "speaker.skipped")
    assert pq.read_schema(tmp_path / "one.parquet").remove_metadata() == schema.remove_metadata()
    with pytest.raises(ValueError, match=r"table 'speaker.skipped': missing column\(s\) \['reason'\]"):
        write_parquet(frame.drop(columns="reason"), tmp_path / "x.parquet", "speaker.skipped")
    with pytest.raises(ValueError, match=r"undeclared column\(s\) \['extra'\]"):
        write_parquet(frame.assign(extra=1), tmp_path / "x.parquet", "speaker.skipped")
    with pytest.raises(KeyError, match="no declared table 'nope'"):
        write_parquet(frame, tmp_path / "x.parquet", "nope")
    assert not (tmp_path / "x.parquet").exists()


def _one_shard_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["sku_index"].update(shards=1, augment_per_image=1)
    config["video_frames"]["shards"] = {"train": 1, "val": 1}
    config["kline_factor"]["factor"]["samples"] = 100
    for pipeline in ("speaker_embed", "kline_factor", "probe_qa"):
        config[pipeline]["shards"] = 1
    config["probe_qa"]["qa"]["shards"] = 1
    return config


@pytest.mark.slow
def test_every_table_of_every_pipeline_has_its_declared_schema_with_1_and_3_shards(tmp_path, hostile_demo):
    """One run here with every shard count 1; the other is the served demo (conftest's hostile_demo): 3 shards
    a pipeline, one validation shard empty, failure tables with rows."""
    one = tmp_path / "shards1"
    (one / "resources").mkdir(parents=True)
    (one / "resources" / "demo").symlink_to(REPO / "resources" / "demo")
    run_snakemake(one, _one_shard_config())
    found: dict[str, dict[str, pa.Schema]] = {}
    for shards, work in ((1, one), (3, hostile_demo)):
        files = sorted((work / "results").rglob("*.parquet"))
        assert len(files) > 40
        for path in files:
            schema = pq.read_schema(path)
            name = table_name(schema)
            where = path.relative_to(work)
            assert name in TABLES, f"{where}: no declared table ({name!r})"
            assert conforms(schema, name) == [], (where, conforms(schema, name))
            found.setdefault(name, {})[f"{shards}:{where}"] = schema.remove_metadata()
    sizes = [pq.read_metadata(p).num_rows for p in (hostile_demo / "results" / "video_frames" / "val").glob(
        "*.index.parquet")]
    assert len(sizes) == 4 and 0 in sizes, sizes  # an empty shard was among them
    assert len(list((hostile_demo / "results" / "sku_index" / "shards").iterdir())) == 3
    assert pq.read_metadata(hostile_demo / "results" / "video_frames" / "failures.parquet").num_rows == 2
    # one schema per table, whatever the run, shard or emptiness
    for name, schemas in found.items():
        distinct = {str(s) for s in schemas.values()}
        assert len(distinct) == 1, (name, list(schemas))
    assert {"failures", "speaker.skipped", "speaker.speakers", "probe.factors", "video.index",
            "kline.factor", "sku.views", "kline.series_checks"} <= set(found)
