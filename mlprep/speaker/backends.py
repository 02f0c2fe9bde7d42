"""Utterance encoders. Each takes mono float32 waveforms at its own sample rate and returns L2-normalised
float32 embeddings [n, dim]; batching never changes an embedding (tests hold every backend to 1e-3
cosine distance against one-at-a-time encoding).

resemblyzer (default): the GE2E speaker encoder whose pretrained weights ship inside the package, so it
runs offline. An utterance is cut into 1.6 s partial windows (160 mel frames), each window embedded,
the utterance's embedding the normalised mean of its windows', as resemblyzer's embed_utterance does.
Readers trim silences and place the windows (CPU work); the mel frames and windows are made on the
model's device, for many utterances at once. Every window has the same length, so windows of many
utterances share one forward pass with no padding: batching is exact by construction.

speechbrain: ECAPA-TDNN (or any speechbrain EncoderClassifier) loaded with `from_hparams` from a local
model folder (hyperparams.yaml + checkpoints) or a hub id. Padding changes its embeddings (the
convolutions see the padded frames: a cosine distance of ~0.08 for a 10% pad measured on a random-init
ECAPA), so no utterance is ever padded: each is cut to a whole number of `length_quantum_s` (the tail
lost is shorter than that) and only utterances of one length share a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from mlprep.devices import to_device, to_host

BACKENDS = ("resemblyzer", "speechbrain")


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


def trim_long_silences(wav: np.ndarray, rate: int, window_ms: int, average_width: int, max_silence: int) -> np.ndarray:
    """resemblyzer's silence trimming (webrtcvad at its strictest mode on 30 ms windows, smoothed, voiced
    regions dilated), with the PCM conversion done by numpy instead of a per-sample struct.pack: the same
    bytes, ~6x less time for the whole step, which is most of what a reader spends per utterance."""
    import webrtcvad
    from scipy.ndimage import binary_dilation

    window = (window_ms * rate) // 1000
    wav = wav[: len(wav) - len(wav) % window]
    pcm = np.round(wav * 32767).astype(np.int16).tobytes()
    vad = webrtcvad.Vad(3)
    step = 2 * window
    flags = np.array([vad.is_speech(pcm[k : k + step], sample_rate=rate) for k in range(0, len(pcm), step)],
                     dtype=np.float64)
    padded = np.concatenate((np.zeros((average_width - 1) // 2), flags, np.zeros(average_width // 2)))
    sums = np.cumsum(padded)
    sums[average_width:] = sums[average_width:] - sums[:-average_width]
    mask = np.round(sums[average_width - 1 :] / average_width).astype(bool)
    mask = binary_dilation(mask, np.ones(max_silence + 1))
    return wav[np.repeat(mask, window)]


@dataclass
class WindowedWave:
    """One utterance as a reader prepares it for resemblyzer: its trimmed, padded waveform and where each
    partial window starts (in mel frames). The mel frames and windows are made on the model's device."""

    wav: np.ndarray  # float32 samples
    starts: np.ndarray  # int64 first mel frame of each window

    def __len__(self) -> int:
        return len(self.starts)


class ResemblyzerBackend:
    name = "resemblyzer"
    sample_rate = 16000
    rate = 1.3  # partial windows per second, resemblyzer's default
    min_coverage = 0.75
    pending_factor = 16  # windows of this many batches are gathered before encoding (small mel windows)
    windows_per_utterance = 4  # about, at 1.3 windows a second: what the readers' look-ahead is sized by

    def __init__(self, device: torch.device, batch_size: int = 64, weights: str | None = None):
        from resemblyzer import VoiceEncoder, hparams

        self.device = device
        self.batch_size = batch_size
        self.encoder = VoiceEncoder(device=device, verbose=False, weights_fpath=weights)
        self.encoder.eval()
        self.dim = int(self.encoder.linear.out_features)
        self.n_fft = int(hparams.sampling_rate * hparams.mel_window_length / 1000)
        self.hop = int(hparams.sampling_rate * hparams.mel_window_step / 1000)
        self.frames = hparams.partials_n_frames
        self._filters = torch.from_numpy(mel_filters(hparams.sampling_rate, self.n_fft, hparams.mel_n_channels))
        self._filters = self._filters.to(device)
        self._window = (0.5 - 0.5 * torch.cos(2 * np.pi * torch.arange(self.n_fft, dtype=torch.float64) / self.n_fft))
        self._window = self._window.float().to(device)

    def prepare(self, wav: np.ndarray) -> WindowedWave:
        """resemblyzer's own preprocessing (volume normalisation, long silences trimmed) and its partial
        windows, as numbers: what encode() turns into mel windows on the device."""
        from resemblyzer import audio, hparams

        wav = audio.normalize_volume(wav, hparams.audio_norm_target_dBFS, increase_only=True)  # as preprocess_wav
        wav = trim_long_silences(wav, hparams.sampling_rate, hparams.vad_window_length,
                                 hparams.vad_moving_average_width, hparams.vad_max_silence_length)
        if len(wav) == 0:
            from mlprep.failures import ItemError

            raise ItemError("silent", "nothing left after trimming silences")
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), self.rate, self.min_coverage)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)), "constant")
        return WindowedWave(np.ascontiguousarray(wav, dtype=np.float32),
                            np.array([s.start for s in mel_slices], dtype=np.int64))

    def mel_windows(self, items: list[WindowedWave]) -> torch.Tensor:
        """The partial mel windows [n_windows, 160, 40] of many utterances, made on the device in one pass:
        each utterance's centred frames (librosa's STFT: periodic Hann, zero padding, |X|^2, Slaney mels) laid out
        on one hop-aligned signal."""
        hop, n_fft = self.hop, self.n_fft
        lengths = [len(i.wav) + n_fft for i in items]  # centre padding: n_fft // 2 on each side
        spans = [-(-n // hop) * hop for n in lengths]
        offsets = np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
        flat = np.zeros(int(sum(spans)) + n_fft, dtype=np.float32)
        for item, at in zip(items, offsets):
            flat[at + n_fft // 2 : at + n_fft // 2 + len(item.wav)] = item.wav
        frames = to_device(flat, self.device).unfold(0, n_fft, hop)  # [G, n_fft], frame g starts at g * hop
        power = torch.fft.rfft(frames * self._window).abs() ** 2
        mel = power @ self._filters.T  # [G, n_mels]
        first = np.concatenate([at // hop + item.starts for item, at in zip(items, offsets)])
        rows = to_device(first[:, None] + np.arange(self.frames)[None, :], self.device)
        return mel[rows]

    def encode(self, windows: list[WindowedWave]) -> np.ndarray:
        return to_host([self.encode_device(windows)])

    @torch.inference_mode()
    def encode_device(self, windows: list[WindowedWave]) -> torch.Tensor:
        """Many utterances -> one embedding each, left on the device (nothing waits for it): their mel windows
        made on the device, all windows through the LSTM in batches of `batch_size`, each utterance the
        normalised mean of its own windows' embeddings. Three host-to-device copies, whatever the utterances."""
        if not windows:
            return torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        counts = np.array([len(w) for w in windows])
        mels = self.mel_windows(windows)
        partial = torch.cat([self.encoder(mels[start : start + self.batch_size]).float()
                             for start in range(0, len(mels), self.batch_size)])
        owner = to_device(np.repeat(np.arange(len(windows)), counts), self.device)
        sums = torch.zeros((len(windows), self.dim), dtype=torch.float32, device=self.device)
        sums.index_add_(0, owner, partial)
        ones = torch.ones((len(partial), 1), dtype=torch.float32, device=self.device)
        sizes = torch.zeros((len(windows), 1), dtype=torch.float32, device=self.device).index_add_(0, owner, ones)
        return torch.nn.functional.normalize(sums / sizes, dim=1)


class SpeechbrainBackend:
    name = "speechbrain"
    pending_factor = 4  # utterances of this many batches are gathered before encoding (whole waveforms)
    windows_per_utterance = 1

    def __init__(self, device: torch.device, batch_size: int, source: str, length_quantum_s: float = 0.1):
        from speechbrain.inference.speaker import EncoderClassifier

        self.device, self.batch_size = device, batch_size
        self.encoder = EncoderClassifier.from_hparams(source=str(source), savedir=None,
                                                      overrides=local_overrides(source),
                                                      run_opts={"device": str(device)})
        self.encoder.eval()
        self.sample_rate = int(getattr(getattr(self.encoder, "audio_normalizer", None), "sample_rate", 16000))
        self.quantum = max(1, int(round(length_quantum_s * self.sample_rate)))
        self.dim = int(self._forward(np.zeros((1, self.sample_rate), np.float32)).shape[1])

    def prepare(self, wav: np.ndarray) -> np.ndarray:
        """The waveform cut to a whole number of quanta, as one row [1, samples]."""
        keep = len(wav) - len(wav) % self.quantum
        if keep == 0:
            from mlprep.failures import ItemError

            raise ItemError("too_short", f"shorter than one length quantum ({self.quantum} samples)")
        return np.ascontiguousarray(wav[:keep], dtype=np.float32)[None, :]

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        """[n, samples] -> embeddings [n, dim], left on the device."""
        out = self.encoder.encode_batch(to_device(batch, self.device))
        return out.reshape(len(batch), -1).float()

    def encode(self, windows: list[np.ndarray]) -> np.ndarray:
        return to_host([self.encode_device(windows)])

    def encode_device(self, windows: list[np.ndarray]) -> torch.Tensor:
        """Waveforms [1, samples] -> normalised embeddings, left on the device (nothing waits for them), in
        batches of equal length (sorted by length): no padding."""
        if not windows:
            return torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        lengths = np.array([w.shape[1] for w in windows])
        order = np.argsort(lengths, kind="stable")
        bounds = np.flatnonzero(np.diff(lengths[order])) + 1
        parts = []
        for group in np.split(order, bounds):
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                parts.append(self._forward(np.concatenate([windows[i] for i in batch])))
        back = to_device(np.argsort(order, kind="stable"), self.device)  # sorted position of each utterance
        return torch.nn.functional.normalize(torch.cat(parts)[back], dim=1)


def local_overrides(source) -> dict:
    """A local copy of a hub model names its checkpoints by hub id (`pretrained_path: org/model`): point
    that key at the folder so that nothing is fetched."""
    from pathlib import Path

    hparams = Path(str(source)) / "hyperparams.yaml"
    if hparams.is_file() and any(line.startswith("pretrained_path:") for line in hparams.read_text().splitlines()):
        return {"pretrained_path": str(Path(str(source)).resolve())}
    return {}


def load_backend(name: str, device: torch.device, batch_size: int, weights: str | None = None,
                 source: str | None = None, length_quantum_s: float = 0.1):
    if name == "resemblyzer":
        return ResemblyzerBackend(device, batch_size, weights)
    if name == "speechbrain":
        if not source:
            raise ValueError("speaker_embed.source: backend speechbrain needs a model folder or hub id")
        return SpeechbrainBackend(device, batch_size, source, length_quantum_s)
    raise ValueError(f"unknown speaker backend {name!r}; one of {', '.join(BACKENDS)}")
