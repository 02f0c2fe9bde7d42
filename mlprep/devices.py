"""Device and precision selection: `device: auto|cpu|cuda[:i]`, `precision: auto|fp32|bf16|fp16`."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_summary() -> str:
    """The CPU model, core count and the flags that decide the fastest precision, for benchmark headers."""
    import os
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(errors="replace").splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none of avx512f/avx512_bf16/amx_bf16'}"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively: AMX tiles (Intel Sapphire Rapids+) or AVX512-BF16.

    Measured with ViT-B-32 at batch 32 on 2 cores: AMX runs bf16 weights ~4.6x faster than fp32,
    AVX512-BF16 without AMX (AMD Zen 4) ~2.2x; CPUs with neither run bf16 slower than fp32.
    """
    flags = cpu_flags()
    if flags:
        return "amx_bf16" in flags or "avx512_bf16" in flags
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe else False


def select_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit CUDA device that is absent is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {spec!r}")
    return device


# Batch size `auto`, per device type. On a GPU a batch of 32 ViT-B-32 views is launch-bound (8,547 views/s
# measured on an H200, under 5% of its bf16 rate); bench/device_check.sh measures 32 / 128 / 512.
AUTO_BATCH = {"cpu": 32, "cuda": 512}


def resolve_batch_size(value: int | str, device: torch.device, auto: dict[str, int] | None = None) -> int:
    """A configured batch size, with `auto` resolved for the device (`auto`, by default AUTO_BATCH)."""
    table = auto or AUTO_BATCH
    return table.get(device.type, table["cpu"]) if value == "auto" else int(value)


def to_device(host, device: torch.device) -> torch.Tensor:
    """The one way a job's loop moves host data (a tensor or a numpy array) to its model's device: from
    page-locked memory, without waiting (the caching host allocator keeps the buffer until the copy is done).
    Marked for the profiler, so tests count a loop's transfers."""
    with torch.profiler.record_function("mlprep::host_to_device"):
        if not isinstance(host, torch.Tensor):
            host = torch.from_numpy(np.ascontiguousarray(host))
        if device.type == "cpu":
            return host
        if not host.is_pinned():
            host = host.pin_memory()
        return host.to(device, non_blocking=True)


def to_host(tensors: list[torch.Tensor]):
    """Results left on the device, concatenated and brought back as one float32 numpy array: the point where
    a loop waits for the device, marked for the profiler so tests count how often it does."""
    with torch.profiler.record_function("mlprep::device_to_host"):
        return torch.cat(tensors).float().cpu().numpy()


def start_context(device: torch.device):
    """On CUDA, create the device's context in a thread and return the thread (join it when the context must
    be there), so the 1-3 s it takes overlap with the model's build on the CPU; None on a CPU."""
    if device.type != "cuda":
        return None
    import threading

    thread = threading.Thread(target=lambda: torch.empty(1, device=device), name="cuda-context", daemon=True)
    thread.start()
    return thread


def job_device(spec: str, threads: int) -> torch.device:
    """A model job's device: its thread budget set, a GPU of its own claimed when it may run on one (before
    CUDA starts: a local job gets a free GPU through mlprep.gpuslots; under SLURM, the one it was given)."""
    from mlprep.gpuslots import claim_gpu

    torch.set_num_threads(max(1, threads))
    if spec != "cpu":
        claim_gpu()
    return select_device(spec)


def select_precision(spec: str, device: torch.device) -> torch.dtype:
    """`auto` picks bf16 on CUDA (where supported) and on CPUs that multiply bf16 natively, fp32 elsewhere."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if spec not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {spec!r}")
    if spec == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return PRECISIONS[spec]


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)
