"""Snakemake entry: utterance and speaker embeddings of one shard (rule speaker_embed_shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.speaker.embed import embed_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
embed_shard(
    shard_text=sm.wildcards.shard,
    list_path=sm.params.shard_list,
    cfg=sm.config["speaker_embed"],
    device_spec=sm.config["device"],
    continue_on_error=sm.config["continue_on_error"],
    threads=sm.threads,
    out_dir=sm.output[0],
    progress=progress,
    storage=sm.config.get("object_storage"),
)
