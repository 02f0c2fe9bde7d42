"""Snakemake entry: the pattern-library windows of one shard's symbols (rule kline_library_shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.kline.library import build_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
build_shard(
    shard_text=sm.wildcards.shard,
    list_path=sm.params.shard_list,
    cfg=sm.config["kline_factor"],
    continue_on_error=sm.config["continue_on_error"],
    out_dir=sm.output[0],
    progress=progress,
    seed=sm.config["seed"],
    device_spec=sm.config["device"],
    precision_spec=sm.config["precision"],
    threads=sm.threads,
)
