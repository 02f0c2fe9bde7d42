"""GPU slots for local runs: each GPU job claims a free device index through a lock file.

Snakemake caps how many `gpu=1` jobs run at once (`--resources gpu=N`) but does not say which
device a job should use, so two local jobs would both land on GPU 0. A job that finds no
CUDA_VISIBLE_DEVICES (a scheduler such as SLURM sets it; then it is respected) takes an
exclusive flock on `gpu<i>.lock` for the first free i and sets CUDA_VISIBLE_DEVICES=i before
CUDA starts. The lock lives as long as the process: a crash or kill frees the slot at once.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_held: list[int] = []  # open lock descriptors: kept for the life of the process


class NoFreeGpuError(RuntimeError):
    pass


def local_gpu_count() -> int:
    """GPUs on this machine: $MLPREP_GPU_COUNT if set, else the /dev/nvidia<N> device files."""
    if os.environ.get("MLPREP_GPU_COUNT"):
        return int(os.environ["MLPREP_GPU_COUNT"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def lock_dir() -> Path:
    """Host-wide (GPUs are), per user: $MLPREP_GPU_LOCK_DIR or <tmp>/mlprep-gpu-locks-<uid>."""
    default = Path(tempfile.gettempdir()) / f"mlprep-gpu-locks-{os.getuid()}"
    return Path(os.environ.get("MLPREP_GPU_LOCK_DIR", default))


def claim_gpu(wait_s: float = 30.0) -> str | None:
    """Claim a free local GPU and expose only it to this process; returns what CUDA_VISIBLE_DEVICES holds.

    None when there is no GPU here. Waits up to `wait_s` for a slot (a job that just finished may
    still be exiting), then fails: more concurrent GPU jobs than GPUs means `--resources gpu=N` is
    missing or too high.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return os.environ["CUDA_VISIBLE_DEVICES"]
    count = local_gpu_count()
    if count == 0:
        return None
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for index in range(count):
            fd = os.open(folder / f"gpu{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held.append(fd)
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
            log.info("claimed local GPU %d (lock %s)", index, folder / f"gpu{index}.lock")
            return str(index)
        if time.monotonic() > deadline:
            raise NoFreeGpuError(
                f"all {count} local GPUs are taken by other jobs (locks in {folder}); "
                f"run snakemake with --resources gpu={count} so that no more GPU jobs start than there are GPUs"
            )
        time.sleep(0.5)
