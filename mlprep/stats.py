"""Per-shard counts and timing, written as a small JSON beside the shard's outputs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlprep.io import write_json


def process_age() -> float | None:
    """Seconds since this process started (from /proc on Linux; None where that is not available)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, IndexError, ValueError):
        return None


def scheduler_ids() -> dict[str, str | None]:
    """Where this job ran: SLURM's job id, and its array job and task id when it ran as an array task."""
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }


@dataclass
class ShardStats:
    shard: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # other things done (views, frames...), rated per second
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    startup_s: float | None = None  # process start -> first item done: interpreter, imports, model build
    startup_steps: dict[str, float | None] = field(default_factory=dict)  # step -> seconds since process start
    _first_seen: bool = field(default=False, repr=False)

    def mark(self, step: str) -> None:
        """Record when a start-up step ended (seconds since the process started): where start-up goes."""
        age = process_age()
        self.startup_steps[step] = None if age is None else round(age, 3)

    def first_item_done(self) -> None:
        """Call after each item; the first call records the job's fixed start-up cost."""
        if not self._first_seen:
            self._first_seen = True
            age = process_age()
            self.startup_s = None if age is None else round(age, 3)

    def as_dict(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        done = self.ok + self.failed + self.skipped
        age = process_age()
        return {
            "shard": self.shard,
            "items_ok": self.ok,
            "items_failed": self.failed,
            "items_skipped": self.skipped,
            "seconds": round(seconds, 3),
            "items_per_s": round(done / seconds, 3) if seconds > 0 else None,
            "startup_s": self.startup_s,
            **({"startup_steps": self.startup_steps} if self.startup_steps else {}),
            "process_seconds": None if age is None else round(age, 3),  # process start -> these stats
            **self.counts,
            **{f"{name}_per_s": round(n / seconds, 3) if seconds > 0 else None for name, n in self.counts.items()},
            **self.extra,
        }

    def write(self, path: Path | str) -> dict[str, Any]:
        data = self.as_dict()
        write_json(data, path)
        return data
