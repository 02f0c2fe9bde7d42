"""Gather: dataset summary, merged index and failures, and a contact sheet to eyeball the frames."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from mlprep.failures import count_by_code, read_failures
from mlprep.io import atomic_path, read_parquet_metadata, write_json, write_parquet
from mlprep.video.extract import shard_failures

log = logging.getLogger(__name__)


def contact_sheet(records: list[dict], path: Path | str, thumb_width: int = 128) -> None:
    """One row per clip: its frames side by side, its id and text above them."""
    if records:
        frames = records[0]["frames"]
        th = max(1, round(thumb_width * frames.shape[1] / frames.shape[2]))
        cols = max(len(r["frames"]) for r in records)
    else:
        th, cols = 80, 4
    label = 16
    sheet = Image.new("RGB", (cols * thumb_width, max(1, len(records)) * (th + label)), "white")
    draw = ImageDraw.Draw(sheet)
    if not records:
        draw.text((4, 4), "no clips extracted", fill="black")
    for row, record in enumerate(records):
        y = row * (th + label)
        draw.text((2, y + 2), f"{record['id']}: {record['text']}"[:160], fill="black")
        for col, frame in enumerate(record["frames"]):
            sheet.paste(Image.fromarray(frame).resize((thumb_width, th)), (col * thumb_width, y + label))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def gather(
    shard_prefixes: list[tuple[str, str]],
    manifest_failures: Path | str,
    sheet_clips: int,
    outputs: dict,
) -> dict:
    """shard_prefixes: (split, path prefix) per shard; its files are prefix + .pkl and prefix + .index.parquet."""
    shard_paths = [{"split": split, "pkl": f"{prefix}.pkl", "index": f"{prefix}.index.parquet"}
                   for split, prefix in shard_prefixes]
    indices, shard_failed, per_split = [], [], {}
    for shard in shard_paths:
        index = pd.read_parquet(shard["index"])
        shard_failed.append(shard_failures(index))
        indices.append(index.drop(columns=["path"]).assign(split=shard["split"],
                                                                         pkl=Path(shard["pkl"]).name))
        stats = shard["stats_data"] = read_parquet_metadata(shard["index"])["stats"]
        split = per_split.setdefault(shard["split"], {"shards": 0, "clips_ok": 0, "clips_failed": 0, "frames": 0,
                                                      "bytes": 0, "repeated": 0})
        split["shards"] += 1
        split["clips_ok"] += stats["items_ok"]
        split["clips_failed"] += stats["items_failed"]
        split["frames"] += stats["frames"]
        split["bytes"] += stats["bytes"]
        split["repeated"] += stats["repeated"]
    merged = pd.concat(indices, ignore_index=True) if indices else pd.DataFrame()
    manifest_failed = read_failures([manifest_failures])
    failures = pd.concat([manifest_failed, *shard_failed], ignore_index=True).astype("string")
    summary = {
        "splits": per_split,
        "clips_ok": sum(s["clips_ok"] for s in per_split.values()),
        "clips_failed": int(len(failures)),
        "clips_failed_in_manifest": int(len(manifest_failed)),
        "frames": sum(s["frames"] for s in per_split.values()),
        "bytes": sum(s["bytes"] for s in per_split.values()),
        "failures_by_code": count_by_code(failures),
        "warnings": [],
    }
    for name, split in per_split.items():
        if not split["clips_ok"]:
            warning = f"split {name!r} has no usable clip ({split['clips_failed']} failed in its shards)"
            summary["warnings"].append(warning)
            log.warning("%s", warning)
    sample: list[dict] = []
    for shard in shard_paths:
        if len(sample) >= sheet_clips:
            break
        if shard["stats_data"]["items_ok"]:
            with open(shard["pkl"], "rb") as handle:  # our own shard output, never a user-supplied pickle
                sample += pickle.load(handle)[: sheet_clips - len(sample)]
    for record in sample:
        if record["frames"].dtype != np.uint8 or record["frames"].ndim != 4:
            raise ValueError(f"clip {record['id']}: frames are {record['frames'].dtype} {record['frames'].shape}")
    contact_sheet(sample, outputs["sheet"])
    write_parquet(merged, outputs["index"], "video.index")
    write_parquet(failures, outputs["failures"], "failures")
    write_json(summary, outputs["summary"])
    log.info("video_frames summary: %s", summary)
    return summary
