"""Reading one utterance: any WAV (16/24/32-bit, float), FLAC, MP3 (Common Voice), Ogg Vorbis or Opus (libsndfile),
or M4A / MP4 (AAC, ALAC: VoxCeleb2) or WebM / Matroska (Opus, Vorbis: what browsers record) through PyAV, downmixed
to mono, resampled, checked.

Each problem is an ItemError with a stable reason code (mlprep.failures.REASON_CODES), so a shard
records it against the utterance and goes on.
"""

from __future__ import annotations

import functools

import numpy as np

from mlprep.failures import ItemError, decoder_message

SILENCE_PEAK = 1e-4  # a recording whose loudest sample is below this carries no speech


def load_audio(source: str | bytes, sample_rate: int, min_seconds: float,
               max_seconds: float | None = None, timings: dict | None = None) -> np.ndarray:
    """float32 mono samples at `sample_rate` from a file path or the file's bytes (the format is read from the
    content), or ItemError (not_audio, truncated, empty_audio, bad_audio, too_short, silent, too_long beyond
    `max_seconds`, checked from the header before the samples are read). `timings` (a dict) gets the seconds
    spent decoding and, for a file at another rate, resampling (`decode`, `resample`)."""
    import io
    import time

    import soundfile

    started = time.perf_counter()

    def handle():
        return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source

    try:
        info = soundfile.info(handle())  # the header alone: a file no reader knows fails here
    except Exception as err:  # noqa: BLE001 - libsndfile names the problem; the code is ours
        kind = _pyav_format(source)
        if kind is None:
            raise ItemError("not_audio", f"not a readable audio file: {decoder_message(err)}") from err
        samples, rate = _read_with_pyav(source, kind, max_seconds)
    else:
        if max_seconds is not None and info.frames > max_seconds * info.samplerate:
            raise ItemError("too_long", f"{info.frames / info.samplerate:.1f} s of audio, more than the "
                                        f"{max_seconds:g} s accepted")
        try:
            samples, rate = soundfile.read(handle(), dtype="float32", always_2d=True)
        except Exception as err:  # noqa: BLE001
            raise ItemError("truncated", f"audio data breaks off: {decoder_message(err)}") from err
    if len(samples) == 0:
        raise ItemError("empty_audio", "the file holds no samples")
    missing = wav_missing_bytes(source)
    if missing:
        raise ItemError("truncated", f"the WAV header announces {missing} more bytes of audio than the file holds")
    if not np.isfinite(samples).all():
        raise ItemError("bad_audio", "samples hold NaN or infinity")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    decoded = time.perf_counter()
    if timings is not None:
        timings["decode"] = decoded - started
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
        if timings is not None:
            timings["resample"] = time.perf_counter() - decoded
    if len(mono) < min_seconds * sample_rate:
        raise ItemError("too_short", f"{len(mono) / sample_rate:.2f} s, shorter than min_seconds {min_seconds}")
    if float(np.abs(mono).max()) < SILENCE_PEAK:
        raise ItemError("silent", "every sample is (near) zero")
    return np.ascontiguousarray(mono, dtype=np.float32)


# What PyAV reads where libsndfile cannot: told by the first bytes, and opened with that demuxer only, so that no
# content is taken for a playlist or another format that names files (a service's uploads go through here).
_PYAV_FORMATS = {"mp4": "MP4/M4A", "matroska": "WebM/Matroska"}


def _pyav_format(source: str | bytes) -> str | None:
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:8])
    else:
        try:
            with open(source, "rb") as handle:
                head = handle.read(8)
        except OSError:  # (libsndfile has said what is wrong with it)
            return None
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    return None


def header_seconds(path: str) -> float:
    """Seconds of audio an MP4/M4A or WebM/Matroska file's header states (no decoding); NaN where it says none."""
    import av

    kind = _pyav_format(path)
    if kind is None:
        return float("nan")
    try:
        with av.open(path, format=kind) as container:
            stream = container.streams.audio[0]
            if stream.duration is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else float("nan")
    except (av.FFmpegError, ValueError, IndexError):
        return float("nan")


def _read_with_pyav(source: str | bytes, kind: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(float32 [samples, channels], rate) of the first audio stream of an MP4/M4A or WebM/Matroska file. The
    samples decoded are counted as they come, so a file whose header understates its length still stops at
    `max_seconds`."""
    import io

    import av

    name = _PYAV_FORMATS[kind]
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, format=kind)
    except (av.FFmpegError, ValueError) as err:  # the header is right but the file cannot be read
        raise ItemError("truncated", f"starts as {name} but cannot be read (cut short?): {decoder_message(err)}") \
            from err
    parts, count = [], 0
    with container:
        if not container.streams.audio:
            raise ItemError("not_audio", f"{name} file without an audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if not rate:
            raise ItemError("bad_audio", f"{name} audio stream without a sample rate")
        limit = None if max_seconds is None else max_seconds * rate
        as_float = None  # for decoders whose samples are not planar float already (AAC's, Opus' and Vorbis' are)
        try:
            for frame in container.decode(stream):
                if frame.format.name == "fltp":
                    new = [frame.to_ndarray()]
                else:
                    as_float = as_float or av.AudioResampler(format="fltp")  # (the format only: same rate, layout)
                    new = [out.to_ndarray() for out in as_float.resample(frame)]
                parts += new
                count += sum(part.shape[1] for part in new)
                if limit is not None and count > limit:
                    raise ItemError("too_long", f"more than the {max_seconds:g} s of audio accepted")
        except av.FFmpegError as err:
            if not parts:
                raise ItemError("truncated", f"{name} audio does not decode: {decoder_message(err)}") from err
            raise ItemError("truncated", f"audio data breaks off: {decoder_message(err)}") from err
    if not parts:
        return np.zeros((0, 1), np.float32), rate
    return np.ascontiguousarray(np.concatenate(parts, axis=1).T, dtype=np.float32), rate


def wav_missing_bytes(source: str | bytes) -> int:
    """Bytes a WAV's data chunk announces beyond the end of the file (libsndfile reads such a file
    without complaint, shortened); 0 for complete files, streamed WAVs (size unset) and other formats."""
    import os
    import struct

    if isinstance(source, (bytes, bytearray)):
        head, total = bytes(source[: 1 << 16]), len(source)
    else:
        with open(source, "rb") as handle:
            head = handle.read(1 << 16)
        total = os.path.getsize(source)
    if head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return 0
    order = "<" if head[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(head):
        chunk, size = head[offset : offset + 4], struct.unpack(order + "I", head[offset + 4 : offset + 8])[0]
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF):
                return 0
            return max(0, offset + 8 + size - total)
        offset += 8 + size + (size & 1)
    return 0


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's windowed sinc), the same on every machine. The filter of each pair of
    rates is made once per process and kept (a reader resamples thousands of utterances from a few rates): making
    it was a third to a half of resampling a 4 s utterance from 44.1 or 22.05 kHz; the samples are bit for bit
    torchaudio.functional.resample's."""
    import torch

    with torch.inference_mode():
        out = _resampler(int(source_rate), int(target_rate))(torch.from_numpy(np.ascontiguousarray(samples)))
    return out.numpy().astype(np.float32, copy=False)


@functools.lru_cache(maxsize=32)
def _resampler(source_rate: int, target_rate: int):
    import torch
    import torchaudio.transforms as T

    return T.Resample(source_rate, target_rate, dtype=torch.float32)  # float32: the functional form's filter
