"""Logging for Snakemake entry scripts: everything (logging, warnings, tracebacks, tqdm) goes to the rule's log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO


def log_to_file(path: Path | str | None) -> TextIO:
    """Send the root logger and stderr to `path` (the rule's log:) and return the stream for tqdm."""
    stream: TextIO = sys.stderr
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the job
        sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream,
        force=True,
    )
    logging.captureWarnings(True)
    return stream
