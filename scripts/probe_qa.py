"""Snakemake entry: question-answer pairs for one QA shard's sampled failures (rule probe_qa_shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe.catalog import with_storage  # noqa: E402
from mlprep.probe.qa import qa_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
qa_shard(
    shard_text=sm.wildcards.shard,
    list_path=f"{sm.input.lists}/{sm.wildcards.shard}.jsonl",
    cfg=with_storage(sm.config),
    seed=sm.config["seed"],
    continue_on_error=sm.config["continue_on_error"],
    out_dir=sm.output[0],
    cache_path=sm.params.cache,
    progress=progress,
)
