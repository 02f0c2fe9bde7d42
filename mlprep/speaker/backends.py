"""Utterance encoders. Each takes mono float32 waveforms at its own sample rate and returns L2-normalised
float32 embeddings [n, dim]; batching never changes an embedding (tests hold every backend to 1e-3
cosine distance against one-at-a-time encoding).

resemblyzer (default): the GE2E speaker encoder whose pretrained weights ship inside the package, so it
runs offline. An utterance is cut into 1.6 s partial windows (160 mel frames), each window embedded,
the utterance's embedding the normalised mean of its windows', as resemblyzer's embed_utterance does.
Every window has the same length, so windows of many utterances share one forward pass with no padding:
batching is exact by construction.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

BACKENDS = ("resemblyzer",)


def _hz_to_mel(f):
    """Slaney's mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=4)
def mel_filters(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters [n_mels, n_fft // 2 + 1], equal to librosa.filters.mel's."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2.0), n_mels + 2))
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, freqs)
    weights = np.maximum(0, np.minimum(-ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def mel_power(wav: np.ndarray, rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """Mel power spectrogram [frames, n_mels]: centred frames (zero padding), periodic Hann window, |STFT|^2.
    Equal to librosa.feature.melspectrogram's defaults (to ~1e-7), without its ~5 s of JIT compilation
    at the first call of every job."""
    padded = np.pad(np.asarray(wav, dtype=np.float32), n_fft // 2)
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(padded, (count, n_fft), (padded.strides[0] * hop, padded.strides[0]))
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    power = (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).astype(np.float32)
    return power @ mel_filters(rate, n_fft, n_mels).T


class ResemblyzerBackend:
    name = "resemblyzer"
    sample_rate = 16000
    rate = 1.3  # partial windows per second, resemblyzer's default
    min_coverage = 0.75

    def __init__(self, device: torch.device, batch_size: int = 64, weights: str | None = None):
        from resemblyzer import VoiceEncoder

        self.device = device
        self.batch_size = batch_size
        self.encoder = VoiceEncoder(device=device, verbose=False, weights_fpath=weights)
        self.encoder.eval()
        self.dim = int(self.encoder.linear.out_features)

    def prepare(self, wav: np.ndarray) -> np.ndarray:
        """resemblyzer's own preprocessing (volume normalisation, long silences trimmed), then the mel
        windows [n_windows, 160, 40]: what encode() batches."""
        from resemblyzer import audio, hparams

        wav = audio.preprocess_wav(wav)  # already at 16 kHz: no resampling here
        if len(wav) == 0:
            from mlprep.failures import ItemError

            raise ItemError("silent", "nothing left after trimming silences")
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), self.rate, self.min_coverage)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)), "constant")
        mel = mel_power(wav, hparams.sampling_rate, int(hparams.sampling_rate * hparams.mel_window_length / 1000),
                        int(hparams.sampling_rate * hparams.mel_window_step / 1000), hparams.mel_n_channels)
        return np.stack([mel[s] for s in mel_slices])

    @torch.inference_mode()
    def encode(self, windows: list[np.ndarray]) -> np.ndarray:
        """Mel windows of many utterances -> one embedding each: all windows go through the LSTM in
        batches of `batch_size`, then each utterance averages its own."""
        if not windows:
            return np.zeros((0, self.dim), dtype=np.float32)
        counts = np.array([len(w) for w in windows])
        stacked = np.concatenate(windows)
        out = []
        for start in range(0, len(stacked), self.batch_size):
            chunk = torch.from_numpy(stacked[start : start + self.batch_size]).to(self.device)
            out.append(self.encoder(chunk).float().cpu().numpy())
        partial = np.concatenate(out)
        sums = np.add.reduceat(partial, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
        means = sums / counts[:, None]
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def load_backend(name: str, device: torch.device, batch_size: int, weights: str | None = None):
    if name == "resemblyzer":
        return ResemblyzerBackend(device, batch_size, weights)
    raise ValueError(f"unknown speaker backend {name!r}; one of {', '.join(BACKENDS)}")
