"""Snakemake entry: held-out identification and verification metrics, plot (rule speaker_evaluate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.speaker import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.evaluate(sm.input.utterances, sm.input.utterance_embeddings, sm.input.speakers, sm.input.speaker_embeddings,
               sm.params.per_speaker, sm.config["seed"], sm.params.p_target, dict(sm.output.items()),
               sm.params.threshold)
