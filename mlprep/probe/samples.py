"""The sampler step: the failure cases streamed through the failure-key sampler (mlprep.probe.sampler) into
`samples.jsonl`, and the same records cut into the QA shards' lists.

A sample record names its source (parquet file, row group, row) and carries the probe's and the factor step's
findings; with `embed_images: true` it also carries the image itself (its original bytes, base64), read row
group by row group. A case keyed by factor uses its factor only when the verification confirmed it.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mlprep.failures import FailureLog, write_failures
from mlprep.ids import shards_of
from mlprep.io import atomic_dir, atomic_path, write_json
from mlprep.probe.reader import group_images
from mlprep.probe.sampler import KeySampler
from mlprep.sharding import shard_names

log = logging.getLogger(__name__)

KEY_COLUMNS = ["file", "row", "label", "prediction", "factor", "factor_status"]
RECORD_FIELDS = ["item_id", "id", "label", "prediction", "score", "factor", "explanation", "verified", "factor_status"]


def _key_chunks(cases_path: Path | str):
    """The cases, a record batch at a time, with the factor kept only where it was verified."""
    for batch in pq.ParquetFile(cases_path).iter_batches(batch_size=1 << 20, columns=KEY_COLUMNS):
        chunk = batch.to_pandas()
        chunk["factor"] = chunk["factor"].where(chunk["factor_status"] == "verified")
        yield chunk


def _sampled_rows(cases_path: Path | str, sample: pd.DataFrame) -> pd.DataFrame:
    """The full case rows of the sample (a second streamed pass, keeping only the sampled rows)."""
    wanted = sample[["file", "row"]]
    parts = [batch.to_pandas().merge(wanted, on=["file", "row"])
             for batch in pq.ParquetFile(cases_path).iter_batches(batch_size=1 << 20)]
    rows = pd.concat(parts, ignore_index=True) if parts else wanted.iloc[:0]
    return sample.merge(rows, on=["file", "row"], how="left", validate="one_to_one")


def _record(row, rank: int, embed: dict | None) -> dict:
    out = {"sample_id": row.item_id, "key": row.key, "rank": rank, "key_failures": int(row.key_failures),
           "source": {"file": row.file, "row_group": int(row.row_group), "group_row": int(row.group_row),
                      "row": int(row.row)}}
    for name in RECORD_FIELDS:
        value = getattr(row, name)
        out[name] = None if value is None or (isinstance(value, float) and np.isnan(value)) else (
            value.item() if hasattr(value, "item") else value)
    out["image"] = embed if embed is not None else {"file": row.file, "row": int(row.row)}
    return out


def sample(cases_path: Path | str, cfg: dict, seed: int, continue_on_error: bool, outputs: dict) -> dict:
    """samples.jsonl, the QA shard lists (folder `qa_lists`), sample_stats.json and the sampler's failures."""
    scfg = cfg["sampler"]
    sampler = KeySampler(int(scfg["per_key"]), seed, scfg["key_by"]).feed(_key_chunks(cases_path))
    picked = sampler.result()
    rows = _sampled_rows(cases_path, picked)
    rows["rank"] = rows.groupby("key", sort=False).cumcount()
    failures = FailureLog(continue_on_error)
    images: dict[int, dict] = {}
    if scfg["embed_images"] and len(rows):
        for k, data in group_images(cfg["data_dir"], rows, cfg["image_column"], cfg.get("images_dir"),
                                    failures, cfg.get("object_storage")):
            images[k] = {"base64": base64.b64encode(data).decode("ascii")}
    lines = []
    for k, row in zip(rows.index, rows.itertuples(index=False)):
        embed = images.get(k) if scfg["embed_images"] else None
        lines.append(json.dumps(_record(row, int(row.rank), embed), ensure_ascii=False))
    names = shard_names(int(cfg["qa"]["shards"]))
    shard = shards_of(rows["item_id"].tolist(), len(names)) if len(rows) else np.zeros(0, np.int64)
    with atomic_path(outputs["samples"]) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with atomic_dir(outputs["qa_lists"]) as folder:
        for index, name in enumerate(names):
            mine = [lines[i] for i in np.flatnonzero(shard == index)]
            (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in mine), encoding="utf-8")
    write_failures(failures.records, outputs["failures"])
    stats = {"cases": int(sum(sampler.seen.values())), "keys": len(sampler.seen), "sampled": len(lines),
             "per_key": int(scfg["per_key"]), "key_by": scfg["key_by"], "embed_images": bool(scfg["embed_images"]),
             "image_failures": len(failures), "qa_shards": len(names)}
    write_json(stats, outputs["stats"])
    log.info("sampled %d of %d failure cases over %d keys", len(lines), stats["cases"], stats["keys"])
    return stats
