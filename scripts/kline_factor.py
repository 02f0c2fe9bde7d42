"""Snakemake entry: the win-rate factor of the sample points, with no look-ahead (rule kline_win_rate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.kline import steps  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
steps.factor(
    library={"windows": sm.input.windows, "embeddings": sm.input.embeddings, "closes": sm.input.closes},
    index_path=sm.input.index,
    cfg=sm.config["kline_factor"],
    seed=sm.config["seed"],
    outputs=dict(sm.output.items()),
    progress=progress,
)
