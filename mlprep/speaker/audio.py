"""Reading one utterance: any WAV (16/24/32-bit, float) or FLAC, downmixed to mono, resampled, checked.

Each problem is an ItemError with a stable reason code (mlprep.failures.REASON_CODES), so a shard
records it against the utterance and goes on.
"""

from __future__ import annotations

import numpy as np

from mlprep.failures import ItemError

SILENCE_PEAK = 1e-4  # a recording whose loudest sample is below this carries no speech


def load_audio(path: str, sample_rate: int, min_seconds: float) -> np.ndarray:
    """float32 mono samples at `sample_rate`, or ItemError (not_audio, truncated, empty_audio, bad_audio,
    too_short, silent)."""
    import soundfile

    try:
        soundfile.info(path)  # the header alone: a file no reader knows fails here
    except Exception as err:  # noqa: BLE001 - libsndfile names the problem; the code is ours
        raise ItemError("not_audio", f"not a readable audio file: {err}") from err
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # noqa: BLE001
        raise ItemError("truncated", f"audio data breaks off: {err}") from err
    if len(samples) == 0:
        raise ItemError("empty_audio", "the file holds no samples")
    missing = wav_missing_bytes(path)
    if missing:
        raise ItemError("truncated", f"the WAV header announces {missing} more bytes of audio than the file holds")
    if not np.isfinite(samples).all():
        raise ItemError("bad_audio", "samples hold NaN or infinity")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
    if len(mono) < min_seconds * sample_rate:
        raise ItemError("too_short", f"{len(mono) / sample_rate:.2f} s, shorter than min_seconds {min_seconds}")
    if float(np.abs(mono).max()) < SILENCE_PEAK:
        raise ItemError("silent", "every sample is (near) zero")
    return np.ascontiguousarray(mono, dtype=np.float32)


def wav_missing_bytes(path: str) -> int:
    """Bytes a WAV's data chunk announces beyond the end of the file (libsndfile reads such a file
    without complaint, shortened); 0 for complete files, streamed WAVs (size unset) and other formats."""
    import os
    import struct

    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return 0
    order = "<" if head[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(head):
        chunk, size = head[offset : offset + 4], struct.unpack(order + "I", head[offset + 4 : offset + 8])[0]
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF):
                return 0
            return max(0, offset + 8 + size - os.path.getsize(path))
        offset += 8 + size + (size & 1)
    return 0


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's windowed sinc), the same on every machine."""
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), int(source_rate), int(target_rate))
    return out.numpy().astype(np.float32, copy=False)
