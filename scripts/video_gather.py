"""Snakemake entry: summary, merged index and failures, contact sheet (rule video_gather)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.video.gather import gather  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
gather(sm.params.shards, sm.input.manifest_failures, sm.params.sheet_clips, dict(sm.output.items()))
