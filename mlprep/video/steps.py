"""The video_frames pipeline's cheap steps; the heavy one is mlprep.video.extract.extract_shard."""

from __future__ import annotations

import logging

import pandas as pd

from mlprep.failures import FailureLog, check_failed_share, write_failures
from mlprep.io import read_json, write_json, write_parquet
from mlprep.video.pairs import load_catalog

log = logging.getLogger(__name__)


def manifest(cfg: dict, seed: int, shard_counts: dict, lists_folder, continue_on_error: bool, outputs: dict,
             storage: dict | None = None) -> None:
    catalog = load_catalog(cfg, seed, shard_counts, lists_folder, storage)
    failures = FailureLog(continue_on_error)
    failures.extend(catalog.failures)
    frame = catalog.frame()
    write_parquet(frame, outputs["manifest"], "video.catalog")
    write_failures(failures.records, outputs["failures"])
    log.info("%d clips (%s), %d failures", len(frame), frame["split"].value_counts().to_dict(), len(failures))


def check(summary_path, failures_path, max_failed_fraction: float, out) -> dict:
    """Fail the run when no clip, or too large a share of clips, could be used."""
    summary = read_json(summary_path)
    result = check_failed_share("video_frames", summary["clips_ok"], pd.read_parquet(failures_path),
                                max_failed_fraction, failures_path)
    result["warnings"] = summary.get("warnings", [])
    write_json(result, out)
    log.info("check passed: %s", result)
    return result
