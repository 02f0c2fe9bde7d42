"""Snakemake entry: the library from its shards, its FAISS index, failures, summary (rule kline_gather)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.kline import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.gather(list(sm.input.shards), sm.input.manifest_failures, sm.config["kline_factor"], sm.config["seed"],
             dict(sm.output.items()))
