"""speaker_embed: corpus listing, batched = one-at-a-time embeddings, the speaker step, bad inputs, the workflow."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from conftest import REPO, kill_mid_run, run_snakemake

from mlprep.config import only
from mlprep.failures import REASON_CODES
from mlprep.shardlists import ShardLists
from mlprep.speaker.corpus import LIST_COLUMNS, list_corpus, speaker_keys, sync_lists
from mlprep.speaker.embed import embed_shard
from mlprep.speaker.speakers import aggregate
from mlprep.speaker.steps import speaker_pickle_name

DEMO = REPO / "resources" / "demo" / "speech"
BASE_CFG = {
    "corpus_dir": str(DEMO), "manifest": None, "input": "audio", "shards": 2, "items_per_shard": None,
    "backend": "resemblyzer", "weights": None, "batch_size": 4, "decode_workers": 0, "min_seconds": 0.5,
    "embedding_dim": None, "trust_pickles": False, "min_utterances": 2, "normalize": "both", "outlier_std": None,
    "write_pickles": True,
}


def _cfg(**overrides) -> dict:
    return {**BASE_CFG, **overrides}


# ---------------------------------------------------------------- corpus


def test_layout_lists_every_utterance_and_keeps_a_speaker_in_one_shard():
    corpus = list_corpus(_cfg(), 8)
    frame = corpus.frame
    assert len(frame) == 20 and corpus.failures == []
    assert set(frame["dataset"]) == {"studio", "phone"} and frame["path"].str.endswith((".wav", ".flac")).all()
    assert frame.groupby(["dataset", "speaker_id"])["shard"].nunique().eq(1).all()
    assert "phone/chen/utt1" in set(frame["item_id"])  # the FLAC one, id without its extension


def test_manifest_ids_are_unambiguous_and_hostile_paths_are_refused(tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(DEMO, root)
    wav = "studio/alice/utt0.wav"
    rows = [
        ("a/b", "c", "u", wav), ("a", "b/c", "u", wav),  # would both be a/b/c/u without escaping
        ("d", "s", "up", "../outside.wav"), ("d", "s", "abs", "/etc/passwd"), ("d", "s", "nul", "x\x00.wav"),
        ("d", "s", "gone", "studio/alice/missing.wav"), ("d", "s", "u", wav), ("d", "s", "u", "phone/dana/utt0.wav"),
    ]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["dataset", "speaker_id", "utterance_id", "path"]).to_csv(manifest, index=False)
    corpus = list_corpus(_cfg(corpus_dir=str(root), manifest=str(manifest)), 4)
    assert sorted(corpus.frame["item_id"]) == ["a%2Fb/c/u", "a/b%2Fc/u", "d/s/u"]
    codes = sorted(f.reason_code for f in corpus.failures)
    assert codes == ["duplicate_id", "missing", "unsafe_path", "unsafe_path", "unsafe_path"]
    assert all(str(root) in p for p in corpus.frame["path"])


def test_pickle_names_never_leave_their_folder():
    for dataset, speaker in [("..", "x"), ("a/b", "../../etc"), ("d", "名前"), ("d", "x\x00y"), ("d", "s" * 500)]:
        name = speaker_pickle_name(dataset, speaker)
        parts = Path(name).parts
        assert len(parts) == 2 and ".." not in parts and "\x00" not in name and len(parts[1]) < 120
    assert speaker_pickle_name("d", "a/b") != speaker_pickle_name("d", "a_b")


def test_adding_a_speaker_rewrites_only_its_shard_list(tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(DEMO, root)
    names = [f"{i:03d}-of-008" for i in range(8)]
    lists = ShardLists(tmp_path / "lists", names, LIST_COLUMNS)
    before = sync_lists(_cfg(corpus_dir=str(root)), lists)
    shutil.copytree(root / "phone" / "chen", root / "phone" / "newcomer")
    after = sync_lists(_cfg(corpus_dir=str(root)), lists)
    changed = [n for n in names if before[n] != after[n]]
    shard = list_corpus(_cfg(corpus_dir=str(root)), 8).frame.query("speaker_id == 'newcomer'")["shard"].iloc[0]
    assert changed == [names[shard]]


# ---------------------------------------------------------------- the speaker step


def _utterances(keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"speaker_key": keys, "dataset": [k.split("/")[0] for k in keys],
                         "speaker_id": [k.split("/")[1] for k in keys],
                         "item_id": [f"{k}/u{i}" for i, k in enumerate(keys)], "path": [f"/p{i}" for i in range(len(keys))]})


def test_speaker_step_matches_a_plain_loop_for_every_normalize_mode():
    rng = np.random.default_rng(0)
    keys = [f"ds/s{i % 7}" for i in range(60)]
    vectors = rng.standard_normal((60, 16)).astype(np.float32) * rng.uniform(0.5, 3, (60, 1)).astype(np.float32)
    utts = _utterances(keys)
    shuffled = rng.permutation(60)  # rows in any order: the step sorts ids, not vectors
    utts, vectors = utts.iloc[shuffled].reset_index(drop=True), vectors[shuffled]
    for mode in ("before", "after", "both", "none"):
        out = aggregate(utts, vectors, normalize=mode)
        for row, emb in zip(out.table.itertuples(), out.embeddings):
            mine = (utts["speaker_key"] == row.speaker_key).to_numpy()
            rows = vectors[mine]
            units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
            if mode in ("before", "both"):
                rows = units
            expected = rows.mean(axis=0)
            if mode in ("after", "both"):
                expected = expected / np.linalg.norm(expected)
            np.testing.assert_allclose(emb, expected, atol=1e-5)
            assert row.num_utterances == len(rows) and row.embedding_dim == 16
            assert row.spread == pytest.approx((units @ (expected / np.linalg.norm(expected))).mean(), abs=1e-5)
            assert list(row.utterance_list) == utts.loc[mine, "item_id"].tolist()  # input order (a shard's: by id)
            assert list(row.original_paths) == utts.loc[mine, "path"].tolist()
            assert row.embedding_min == pytest.approx(emb.min()) and row.embedding_max == pytest.approx(emb.max())


def test_speaker_step_skips_small_speakers_with_a_reason_and_drops_outliers():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(8)
    keys = ["ds/big"] * 6 + ["ds/small"] + ["ds/gone"] * 0
    vectors = np.stack([base + 0.01 * rng.standard_normal(8) for _ in range(5)] + [-base] + [base]).astype(np.float32)
    failed = pd.DataFrame({"speaker_key": ["ds/small", "ds/gone"], "dataset": ["ds", "ds"], "speaker_id": ["small", "gone"]})
    out = aggregate(_utterances(keys), vectors, failed, min_utterances=2, outlier_std=1.0)
    assert out.table["speaker_key"].tolist() == ["ds/big"]
    big = out.table.iloc[0]
    assert big.num_utterances == 5 and big.dropped_outliers == 1 and big.spread > 0.99
    skipped = out.skipped.set_index("speaker_key")
    assert skipped.loc["ds/small", "failed_utterances"] == 1 and "min_utterances" in skipped.loc["ds/small", "reason"]
    assert skipped.loc["ds/gone", "reason"] == "every utterance failed"


def test_eer_and_min_dcf_match_the_roc_curve():
    from sklearn.metrics import roc_curve

    from mlprep.speaker.evaluate import verification_metrics

    hand = verification_metrics(np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1]), np.array([1, 1, 1, 0, 0, 0, 0], bool))
    assert hand["eer"] == pytest.approx(0.25)
    assert verification_metrics(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0], bool))["eer"] == 0
    assert verification_metrics(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0], bool))["min_dcf"] == 0
    rng = np.random.default_rng(4)
    target = rng.random(3000) < 0.1
    scores = rng.standard_normal(3000) + 1.5 * target
    got = verification_metrics(scores, target, p_target=0.01)
    fpr, tpr, _ = roc_curve(target, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    assert got["eer"] == pytest.approx((fpr[i] + fnr[i]) / 2, abs=0.01)
    brute = min(0.01 * m + 0.99 * f for m, f in zip(fnr, fpr)) / 0.01
    assert got["min_dcf"] == pytest.approx(min(brute, 1.0), abs=1e-9)


def test_held_out_identification_on_separable_speakers():
    from mlprep.speaker.evaluate import choose_holdout, evaluate

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((5, 32))
    keys = pd.Series([f"d/s{i}" for i in range(5) for _ in range(6)] + ["d/lonely"])
    items = pd.Series([f"{k}/u{j}" for j, k in enumerate(keys)])
    vectors = np.vstack([centres[i] + 0.05 * rng.standard_normal(32) for i in range(5) for _ in range(6)]
                        + [rng.standard_normal(32)])
    held = choose_holdout(keys, items, 2, seed=1)
    assert held.sum() == 10 and not held[-1]  # 2 per speaker; a speaker's only utterance is never held out
    assert (held == choose_holdout(keys[::-1], items[::-1], 2, seed=1)[::-1]).all()  # order does not matter
    result = evaluate(keys, items, vectors, per_speaker=2, seed=1)
    assert result["top1"] == 1.0 and result["eer"] == 0 and result["speakers"] == 6 and result["held_out"] == 10


# ---------------------------------------------------------------- embeddings


def test_resampling_keeps_each_rates_filter_and_gives_torchaudios_samples_bit_for_bit():
    """A reader resamples thousands of utterances from a few rates: the filter of a pair of rates is made once
    (making it was up to half of resampling a 4 s utterance), and the samples are torchaudio's own."""
    import torchaudio.functional as AF

    from mlprep.speaker.audio import _resampler, resample

    speech, rate = soundfile.read(DEMO / "studio" / "bruno" / "utt0.wav", dtype="float32")
    _resampler.cache_clear()
    for source in (44100, 22050, 48000, 8000, 44100, 22050):
        wav = np.ascontiguousarray(np.resize(speech, source * 2))  # 2 s at that rate
        got = resample(wav, source, rate)
        assert got.dtype == np.float32 and len(got) == rate * 2
        assert np.array_equal(got, AF.resample(torch.from_numpy(wav), source, rate).numpy()), source
    assert _resampler.cache_info().misses == 4 and _resampler.cache_info().hits == 2


def test_batched_resemblyzer_embeddings_equal_one_at_a_time():
    from resemblyzer import VoiceEncoder, preprocess_wav

    from mlprep.speaker.audio import load_audio
    from mlprep.speaker.backends import ResemblyzerBackend

    wavs = [load_audio(str(p), 16000, 0.5) for p in sorted(DEMO.rglob("utt[0-2].*"))[:6]]
    backend = ResemblyzerBackend(torch.device("cpu"), batch_size=5)  # windows of several utterances per batch
    batched = backend.encode([backend.prepare(w) for w in wavs])
    reference = VoiceEncoder(device="cpu", verbose=False)
    single = np.stack([reference.embed_utterance(preprocess_wav(w)) for w in wavs])
    cosine = (batched * single).sum(axis=1)
    assert cosine.min() > 1 - 1e-3, cosine


def test_the_speaker_loop_queues_each_group_in_three_copies_and_waits_only_to_bring_embeddings_back(monkeypatch):
    """The speaker feed's shape, counted with torch.profiler on the CPU: a group of utterances goes to the device
    in three marked copies whatever its size (waveforms, window rows, owners), the embeddings come back in one
    marked copy per GROUPS_PER_COPY groups and at the end, and nothing in the loop reads a device value back
    (no item, nonzero): on a GPU the host reads the next group while the device encodes. The embeddings are
    those of encoding all utterances at once."""
    from torch.profiler import ProfilerActivity, profile

    import mlprep.speaker.embed as embed
    from mlprep.failures import FailureLog
    from mlprep.speaker.backends import ResemblyzerBackend

    paths = sorted(str(p) for p in DEMO.rglob("utt*.*")) * 2
    frame = pd.DataFrame({"item_id": [f"u{i}" for i in range(len(paths))], "path": paths})
    backend = ResemblyzerBackend(torch.device("cpu"), batch_size=2)  # groups of 32 windows: 6-9 utterances
    monkeypatch.setattr(embed, "GROUPS_PER_COPY", 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        vectors, positions, _ = embed.embed_audio(frame, backend, FailureLog(False), 1, 0.5)  # readers apart
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    groups = counts["mlprep::host_to_device"] // 3
    assert counts["mlprep::host_to_device"] == 3 * groups and groups >= 5, counts["mlprep::host_to_device"]
    assert counts["mlprep::device_to_host"] == -(-groups // 2)
    # one value read back in all: the readers' DataLoader drawing its seed on the host as it starts
    assert counts.get("aten::item", 0) == counts.get("aten::random_", 0) == 1 and "aten::nonzero" not in counts
    assert positions.tolist() == list(range(len(paths)))
    from mlprep.speaker.audio import load_audio

    whole = backend.encode([backend.prepare(load_audio(p, 16000, 0.5)) for p in paths])
    assert np.abs(vectors - whole).max() < 1e-5


@pytest.fixture(scope="module")
def tiny_ecapa(tmp_path_factory) -> Path:
    from mlprep.demo import write_ecapa_model

    return write_ecapa_model(tmp_path_factory.mktemp("ecapa") / "model")


def test_speechbrain_loads_a_local_model_folder_and_batches_without_changing_an_embedding(tiny_ecapa):
    from speechbrain.inference.speaker import EncoderClassifier

    from mlprep.speaker.audio import load_audio
    from mlprep.speaker.backends import load_backend

    backend = load_backend("speechbrain", torch.device("cpu"), 4, source=str(tiny_ecapa), length_quantum_s=0.5)
    saved = torch.load(tiny_ecapa / "embedding_model.ckpt")  # loaded through from_hparams, hub path redirected
    assert all(torch.equal(v, backend.encoder.mods.embedding_model.state_dict()[k]) for k, v in saved.items())
    wavs = [load_audio(str(p), 16000, 0.5) for p in sorted(DEMO.rglob("utt*.*"))]
    prepared = [backend.prepare(w) for w in wavs]
    lengths = [p.shape[1] for p in prepared]
    assert len(set(lengths)) < len(lengths)  # some batches really hold several utterances
    assert all(n % 8000 == 0 and 0 <= len(w) - n < 8000 for n, w in zip(lengths, wavs))
    batched = backend.encode(prepared)
    reference = EncoderClassifier.from_hparams(source=str(tiny_ecapa), savedir=None,
                                               overrides={"pretrained_path": str(tiny_ecapa)})
    with torch.inference_mode():
        single = np.stack([reference.encode_batch(torch.from_numpy(p)).flatten().numpy() for p in prepared])
    single /= np.linalg.norm(single, axis=1, keepdims=True)
    assert batched.shape == (len(wavs), 24)
    assert ((batched * single).sum(axis=1)).min() > 1 - 1e-3


def test_speechbrain_shard_handles_bad_audio_and_its_config_is_checked(tmp_path, tiny_ecapa):
    from mlprep.config import ConfigError, check_config

    root = tmp_path / "corpus"
    shutil.copytree(DEMO / "studio", root / "studio")
    expected = _write_bad_audio(root / "x" / "bad")
    cfg = _cfg(corpus_dir=str(root), shards=1, min_utterances=1, backend="speechbrain", source=str(tiny_ecapa))
    out = _run_shard(tmp_path, cfg)
    failures = pd.read_parquet(out / "failures.parquet")
    assert dict(zip(failures["item_id"].str.rsplit("/", n=1).str[-1], failures["reason_code"])) == {
        k: v for k, v in expected.items() if v}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["items_ok"] == 13 and stats["backend"] == "speechbrain"
    assert np.load(out / "utterance_embeddings.npy").shape == (13, 24)
    schema = REPO / "config" / "schema.yaml"
    base = {**only("speaker_embed")}
    for source, ok in ((str(tmp_path / "nowhere"), False), ("speechbrain/spkrec-ecapa-voxceleb", True),
                       (str(tiny_ecapa), True)):
        config = {**base, "speaker_embed": {"corpus_dir": str(DEMO), "backend": "speechbrain", "source": source}}
        if ok:
            check_config(config, schema)
        else:
            with pytest.raises(ConfigError, match="speaker_embed.source"):
                check_config(config, schema)


def test_silence_trimming_equals_resemblyzers():
    from resemblyzer import audio, hparams

    from mlprep.speaker.audio import load_audio
    from mlprep.speaker.backends import trim_long_silences

    for path in sorted(DEMO.rglob("utt[01].*")):
        wav = audio.normalize_volume(load_audio(str(path), 16000, 0.5), -30, increase_only=True)
        wav = np.concatenate([np.zeros(16000, np.float32), wav, np.zeros(24000, np.float32), wav])  # long silences
        ours = trim_long_silences(wav, 16000, hparams.vad_window_length, hparams.vad_moving_average_width,
                                  hparams.vad_max_silence_length)
        reference = audio.trim_long_silences(wav)
        assert len(ours) < len(wav) and np.array_equal(ours, reference)


def test_mel_windows_made_on_the_device_equal_librosas_spectrogram():
    from resemblyzer import audio

    from mlprep.speaker.backends import ResemblyzerBackend, WindowedWave

    backend = ResemblyzerBackend(torch.device("cpu"))
    rng = np.random.default_rng(3)
    items = [WindowedWave((0.1 * rng.standard_normal(n)).astype(np.float32), np.array(starts))
             for n, starts in [(35123, [0, 60, 59]), (16000, [0]), (200 + 160 * 159, [0])]]
    windows = backend.mel_windows(items).numpy()
    assert windows.shape == (5, 160, 40)
    k = 0
    for item in items:  # many utterances in one pass, each window equal to its own utterance's frames
        reference = audio.wav_to_mel_spectrogram(item.wav)
        for start in item.starts:
            expected = reference[start : start + 160]
            np.testing.assert_allclose(windows[k][: len(expected)], expected, rtol=0, atol=1e-5 * reference.max())
            k += 1


def _write_bad_audio(folder: Path) -> dict[str, str]:
    """speaker 'bad' of dataset 'x': one file per problem -> the reason code expected (None: readable)."""
    folder.mkdir(parents=True)
    tone, rate = soundfile.read(DEMO / "studio" / "bruno" / "utt0.wav", dtype="float32")  # speech, 16 kHz
    soundfile.write(folder / "float.wav", tone, rate, subtype="FLOAT")
    soundfile.write(folder / "stereo24.wav", np.stack([tone, tone], 1), rate, subtype="PCM_24")
    soundfile.write(folder / "rate8k.flac", tone[::2], rate // 2)
    soundfile.write(folder / "silent.wav", np.zeros(len(tone), np.float32), rate)
    soundfile.write(folder / "short.wav", tone[: rate // 10], rate)
    nan = tone.copy()
    nan[100] = np.nan
    soundfile.write(folder / "nan.wav", nan, rate, subtype="FLOAT")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_text("not audio at all")
    soundfile.write(folder / "cut.wav", tone, rate, subtype="PCM_16")
    data = (folder / "cut.wav").read_bytes()
    (folder / "cut.wav").write_bytes(data[: len(data) // 2])
    return {"float": None, "stereo24": None, "rate8k": None, "silent": "silent", "short": "too_short",
            "nan": "bad_audio", "empty": "not_audio", "text": "not_audio", "cut": "truncated"}


def _run_shard(tmp_path: Path, cfg: dict) -> Path:
    lists = ShardLists(tmp_path / "lists", ["000-of-001"], LIST_COLUMNS)
    sync_lists(cfg, lists)
    out = tmp_path / "shard"
    embed_shard("000-of-001", lists.path("000-of-001"), cfg, "cpu", True, 2, out)
    return out


def test_every_kind_of_bad_audio_is_one_failure_with_its_code(tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(DEMO / "studio", root / "studio")
    expected = _write_bad_audio(root / "x" / "bad")
    out = _run_shard(tmp_path, _cfg(corpus_dir=str(root), shards=1, min_utterances=1))
    failures = pd.read_parquet(out / "failures.parquet")
    got = dict(zip(failures["item_id"].str.rsplit("/", n=1).str[-1], failures["reason_code"]))
    assert got == {k: v for k, v in expected.items() if v}
    assert set(failures["reason_code"]) <= set(REASON_CODES)
    speakers = pd.read_parquet(out / "speakers.parquet").set_index("speaker_key")
    assert speakers.loc["x/bad", "num_utterances"] == 3 and speakers.loc["x/bad", "failed_utterances"] == 6
    utterances = pd.read_parquet(out / "utterances.parquet")
    assert np.load(out / "utterance_embeddings.npy").shape == (len(utterances), 256)
    seconds = utterances.set_index("item_id").loc["x/bad/rate8k", "duration_s"]
    assert seconds == pytest.approx(soundfile.info(DEMO / "studio" / "bruno" / "utt0.wav").duration, abs=0.01)
    # where the readers' time went, failed utterances included: the two files not at 16 kHz were resampled
    stats = json.loads((out / "stats.json").read_text())
    rates = [soundfile.info(p).samplerate for p in sorted((root / "studio").rglob("*.wav"))]
    assert stats["resampled_utterances"] == 1 + sum(r != 16000 for r in rates) == 2
    assert set(stats["reader_seconds"]) == {"read", "decode", "resample", "prepare"}
    assert all(s >= 0 for s in stats["reader_seconds"].values()) and stats["reader_seconds"]["decode"] > 0


def test_speech_as_corpora_ship_it_mp3_m4a_ogg_opus_webm_is_read_and_embeds_as_its_wav(tmp_path):
    """Common Voice ships MP3, VoxCeleb2 M4A (AAC), recordings from browsers WebM (Opus): the layout lists them,
    the shard job decodes them (libsndfile for MP3, Ogg and Opus; PyAV, with the demuxer the first bytes name, for
    MP4 and Matroska) and their embeddings are the WAV's within what the lossy codec changes; a cut M4A and an MP4
    without audio are failures with their codes, from a file and from bytes (the service's path)."""
    import subprocess

    from mlprep.failures import ItemError
    from mlprep.speaker.audio import load_audio
    from mlprep.video.decode import ffmpeg_exe

    folder = tmp_path / "corpus" / "x" / "formats"
    folder.mkdir(parents=True)
    wav = folder / "wav.wav"
    shutil.copy(DEMO / "studio" / "bruno" / "utt0.wav", wav)
    for name, codec in (("mp3.mp3", "libmp3lame"), ("ogg.ogg", "libvorbis"), ("opus.opus", "libopus"),
                        ("m4a.m4a", "aac"), ("webm.webm", "libopus")):
        subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(wav), "-c:a", codec, "-b:a", "96k",
                        str(folder / name)], check=True)
    m4a = (folder / "m4a.m4a").read_bytes()
    (folder / "cut.m4a").write_bytes(m4a[: len(m4a) // 3])
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=32x32:duration=1",
                    str(folder / "video.m4a")], check=True)
    out = _run_shard(tmp_path, _cfg(corpus_dir=str(tmp_path / "corpus"), shards=1, min_utterances=1))
    failures = pd.read_parquet(out / "failures.parquet")
    assert dict(zip(failures["item_id"], failures["reason_code"])) == {"x/formats/cut": "truncated",
                                                                      "x/formats/video": "not_audio"}
    utterances = pd.read_parquet(out / "utterances.parquet")
    vectors = dict(zip(utterances["item_id"].str.rsplit("/", n=1).str[-1], np.load(out / "utterance_embeddings.npy")))
    assert set(vectors) == {"wav", "mp3", "ogg", "opus", "m4a", "webm"}
    for name, vector in vectors.items():
        cosine = float(vector @ vectors["wav"] / np.linalg.norm(vector) / np.linalg.norm(vectors["wav"]))
        assert cosine > 0.97, (name, cosine)
    seconds = utterances.set_index(utterances["item_id"].str.rsplit("/", n=1).str[-1])["duration_s"]
    assert (abs(seconds - seconds["wav"]) < 0.1).all(), seconds
    samples = load_audio(str(wav), 16000, 0.5)
    assert abs(len(load_audio(m4a, 16000, 0.5)) - len(samples)) < 1600
    for data, code in ((m4a[: len(m4a) // 3], "truncated"), ((folder / "video.m4a").read_bytes(), "not_audio"),
                       (b"\x00\x00\x00\x18ftypM4A " + bytes(64), "truncated"),
                       (b"\x1a\x45\xdf\xa3" + bytes(64), "truncated")):
        with pytest.raises(ItemError) as caught:
            load_audio(data, 16000, 0.5)
        assert caught.value.code == code, (code, caught.value)
    with pytest.raises(ItemError, match="more than the 1 s of audio accepted"):
        load_audio(m4a, 16000, 0.5, max_seconds=1)


def test_precomputed_embeddings_refuse_pickles_nan_and_wrong_lengths(tmp_path):
    root = tmp_path / "emb"
    spk = root / "ds" / "s1"
    spk.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        np.save(spk / f"ok{i}.npy", rng.standard_normal(32).astype(np.float32))
    np.save(spk / "row.npy", rng.standard_normal((1, 32)))  # [1, d] is accepted
    np.save(spk / "short.npy", rng.standard_normal(16))
    np.save(spk / "nan.npy", np.full(32, np.nan))
    np.save(spk / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(spk / "pickled.pkl", "wb") as handle:
        pickle.dump(rng.standard_normal(32), handle)
    cfg = _cfg(corpus_dir=str(root), input="embeddings", shards=1)
    out = _run_shard(tmp_path / "a", cfg)
    failures = pd.read_parquet(out / "failures.parquet")
    got = dict(zip(failures["item_id"].str.rsplit("/", n=1).str[-1], failures["reason_code"]))
    assert got == {"short": "wrong_dimension", "nan": "bad_embedding", "objects": "bad_embedding"}  # .pkl not listed
    assert pd.read_parquet(out / "speakers.parquet")["num_utterances"].tolist() == [4]
    trusted = _run_shard(tmp_path / "b", {**cfg, "trust_pickles": True})
    assert pd.read_parquet(trusted / "speakers.parquet")["num_utterances"].tolist() == [5]


# ---------------------------------------------------------------- the workflow


@pytest.mark.slow
def test_speaker_workflow_outputs_and_a_new_speaker_reruns_one_shard(tmp_path):
    work = tmp_path / "flow"
    shutil.copytree(DEMO, work / "speech")
    config = {"device": "cpu", **only("speaker_embed"),
              "speaker_embed": {"corpus_dir": str(work / "speech"), "shards": 4, "decode_workers": 1}}
    run_snakemake(work, config)
    out = work / "results" / "speaker_embed"
    table = pq.read_table(out / "speakers.parquet")
    vector_type = table.schema.field("embedding").type
    assert table.num_rows == 4 and vector_type.list_size == 256 and str(vector_type.value_type) == "float"
    speakers = table.to_pandas()
    assert speakers["num_utterances"].tolist() == [5, 5, 5, 5]
    emb = np.load(out / "speaker_embeddings.npy")
    assert emb.shape == (4, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert (out / "speaker_ids.txt").read_text().split() == speakers["speaker_key"].tolist()
    # an utterance is closest to its own speaker's embedding (the demo voices differ in pitch and speed)
    utts = pd.read_parquet(out / "utterances.parquet")
    nearest = speakers["speaker_key"].to_numpy()[(np.load(out / "utterance_embeddings.npy") @ emb.T).argmax(1)]
    assert (nearest == utts["speaker_key"].to_numpy()).all()
    with open(out / "speakers_pkl" / "studio" / "alice.pkl", "rb") as handle:
        record = pickle.load(handle)
    assert record["num_utterances"] == 5 and record["embedding"].shape == (256,) and set(record["embedding_stats"]) == {
        "mean", "std", "min", "max"}
    assert record["utterance_list"] == [f"studio/alice/utt{k}" for k in range(5)]  # plain lists, as the seed's
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["held_out"] == 4 and evaluation["top1"] >= 0.75 and 0 <= evaluation["eer"] <= 0.25
    assert (out / "eval.png").stat().st_size > 10_000
    # a new speaker: only its shard (and the gather) run again
    shutil.copytree(work / "speech" / "phone" / "dana", work / "speech" / "phone" / "erin")
    dry = run_snakemake(work, config, "-n")
    assert dry.stdout.count("rule speaker_embed_shard:") == 1, dry.stdout[-3000:]
    shard = list_corpus({**BASE_CFG, "corpus_dir": str(work / "speech")}, 4).frame.query(
        "speaker_id == 'erin'")["shard"].iloc[0]
    assert f"{shard:03d}-of-004" in dry.stdout
    assert speaker_keys(pd.Series(["a/b"]), pd.Series(["c"])).iloc[0] == "a%2Fb/c"


HOSTILE = {"studio/alice": ("../..", "/etc"), "studio/bruno": ("a/b", "x\x00y"), "phone/chen": ("日本語", "ünï ëx"),
           "phone/dana": ("C:\\tmp", "." * 300)}


def _hostile_manifest(root: Path) -> Path:
    """The demo corpus listed under ids that are paths, NUL, unicode and a 300-character name."""
    rows = []
    for folder, (dataset, speaker) in HOSTILE.items():
        for path in sorted((root / folder).iterdir()):
            rows.append({"dataset": dataset, "speaker_id": speaker, "utterance_id": f"../{path.stem}",
                         "path": str(path.relative_to(root))})
    manifest = root / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    return manifest


def _final_outputs(work: Path) -> dict:
    """Every final artefact of speaker_embed, in a form to compare: bytes, arrays, tables, records."""
    out = work / "results" / "speaker_embed"
    got = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if path.is_dir() or name.startswith(("shards", "lists", "logs", "benchmarks")):
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data.pop("shards", None)  # per-shard timings
            got[name] = data
        elif path.suffix == ".parquet":
            got[name] = pd.read_parquet(path)
        elif path.suffix == ".pkl":
            with open(path, "rb") as handle:
                got[name] = pickle.load(handle)
        elif path.suffix != ".png":
            got[name] = path.read_bytes()
    return got


def test_hostile_ids_stay_inside_results_and_a_killed_run_reruns_to_identical_outputs(tmp_path):
    runs = {}
    work = tmp_path / "work"  # both runs in one folder: outputs name absolute paths
    shutil.copytree(DEMO, work / "speech")
    manifest = _hostile_manifest(work / "speech")
    config = {"device": "cpu", **only("speaker_embed"),
              "speaker_embed": {"corpus_dir": str(work / "speech"), "manifest": str(manifest), "shards": 4,
                                "decode_workers": 0}}
    for name in ("clean", "killed"):
        if name == "killed":
            shutil.rmtree(work / "results")
            shutil.rmtree(work / ".snakemake")
            shards = work / "results" / "speaker_embed" / "shards"
            kill_mid_run(work, config, lambda: bool(list(shards.glob("*/stats.json"))), cores=1)
            assert not (work / "results" / "speaker_embed" / "speakers.parquet").exists()
        before = set(tmp_path.rglob("*"))
        run_snakemake(work, config)
        made = {p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()}
        outside = [p for p in made if not p.is_relative_to(work / "results") and not p.is_relative_to(
            work / ".snakemake") and p != work / "config.yaml"]
        assert outside == [], outside
        runs[name] = _final_outputs(work)

    clean, killed = runs["clean"], runs["killed"]
    assert sorted(clean) == sorted(killed)
    for name, value in clean.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(killed[name], value, obj=name)
        elif name.endswith(".pkl"):
            assert killed[name].keys() == value.keys()
            np.testing.assert_array_equal(killed[name].pop("embedding"), value.pop("embedding"))
            assert killed[name] == value, name
        else:
            assert killed[name] == value, name
    speakers, failures = clean["speakers.parquet"], clean["failures.parquet"]
    kept = [ids for ids in HOSTILE.values() if "\x00" not in ids[1]]  # a NUL id: a failure record per utterance
    assert sorted(zip(speakers["dataset"], speakers["speaker_id"])) == sorted(kept)
    assert (failures["reason_code"] == "bad_record").sum() == 5 and failures["reason"].str.contains("NUL").all()
    pickles = [n for n in clean if n.endswith(".pkl")]
    assert len(pickles) == 3 and all(n.startswith("speakers_pkl/") and ".." not in Path(n).parts for n in pickles)
    assert all(len(part.encode()) <= 255 for n in pickles for part in Path(n).parts)


def test_a_gather_with_no_speaker_left_writes_an_empty_table():
    """Every speaker skipped or failed: the speaker table is empty (the check then fails the run, saying why),
    not a crash on a zero-length embedding column."""
    from mlprep.speaker.speakers import SPEAKER_COLUMNS, speaker_schema
    from mlprep.speaker.steps import _speakers_table

    table = _speakers_table(pd.DataFrame({"speaker_key": pd.Series(dtype=str)}), np.zeros((0, 0), np.float32))
    assert table.num_rows == 0 and table.column_names == [*SPEAKER_COLUMNS, "embedding"]
    assert table.schema.remove(len(SPEAKER_COLUMNS)) == speaker_schema()  # the one schema, empty or not


def test_the_speaker_table_has_one_schema_whatever_the_shard_count(tmp_path):
    """Found on real data: a shard with no speaker wrote its statistics as float64 and its ids as `string`, so
    the gathered table's types depended on the shard count."""
    rng = np.random.default_rng(4)
    corpus = tmp_path / "corpus"
    for speaker in ("ann", "bob", "cy"):
        (corpus / "set" / speaker).mkdir(parents=True)
        for k in range(3):
            np.save(corpus / "set" / speaker / f"u{k}.npy", rng.standard_normal(16).astype(np.float32))
    schemas = {}
    for shards in (1, 8):
        work = tmp_path / f"shards{shards}"
        work.mkdir()
        config = {"device": "cpu", **only("speaker_embed"),
                  "speaker_embed": {"corpus_dir": str(corpus), "input": "embeddings", "shards": shards,
                                    "min_utterances": 1}}
        run_snakemake(work, config)
        out = work / "results" / "speaker_embed"
        shard_schemas = {pq.read_schema(p / "speakers.parquet") for p in (out / "shards").iterdir()}
        assert len(shard_schemas) == 1  # an empty shard's table has the others' schema
        schemas[shards] = (pq.read_schema(out / "speakers.parquet"), shard_schemas.pop())
        assert pq.read_table(out / "speakers.parquet").num_rows == 3
    assert schemas[1][0].equals(schemas[8][0]) and schemas[1][1].equals(schemas[8][1])
    assert str(schemas[8][0].field("embedding_mean").type) == "float"
    assert str(schemas[8][0].field("speaker_key").type) == "string"  # mlprep/tables.py: one type for text


def test_the_operating_threshold_sits_inside_the_gap_not_on_the_lowest_target_score():
    from mlprep.speaker.evaluate import verification_metrics

    # the case: targets 0.90-0.97, non-targets up to 0.78: far apart
    scores = np.array([0.9017306566, 0.93, 0.97, 0.78, 0.5, 0.2, 0.1])
    target = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    got = verification_metrics(scores, target)
    assert got["eer"] == 0 and got["separable"] and got["threshold_rule"] == "gap_middle"
    assert got["threshold"] == pytest.approx((0.9017306566 + 0.78) / 2)
    assert got["margin_to_targets"] == pytest.approx(got["margin_to_nontargets"]) and got["margin_to_targets"] > 0.06
    assert got["threshold"] < 0.9017306566 - 0.05  # a new recording a little below the lowest one seen passes
    assert got["threshold_at_eer"] < 0.9017306566 and got["threshold_at_eer"] > 0.78
    assert got["miss_rate"] == 0 and got["false_alarm_rate"] == 0
    assert (got["target_trials"], got["nontarget_trials"]) == (3, 4)
    # overlapping scores: the EER point, interpolated between the scores on either side of the crossing
    overlap = verification_metrics(np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1]), np.array([1, 1, 1, 0, 0, 0, 0], bool))
    assert overlap["threshold_rule"] == "eer" and not overlap["separable"]
    assert 0.4 < overlap["threshold"] < 0.8 and overlap["threshold"] not in (0.4, 0.7, 0.8)
    assert overlap["margin_to_targets"] < 0 and overlap["margin_to_nontargets"] < 0
    assert overlap["miss_rate"] == pytest.approx(1 / 3) and overlap["false_alarm_rate"] == pytest.approx(0.25)
    # a threshold set in the config is used as given, with its error rates
    fixed = verification_metrics(scores, target, threshold=0.95)
    assert fixed["threshold"] == 0.95 and fixed["threshold_rule"] == "config"
    assert fixed["miss_rate"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- containers (tars, parquet, object storage)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_a_container_sample_takes_its_ids_from_its_metadata_else_from_its_key(tmp_path):
    from mlprep.speaker.corpus import ids_from_key

    assert ids_from_key("vox/id10001/abc/00001", {}, "corpus", "-") == ("vox", "id10001", "abc/00001")
    assert ids_from_key("id10001/00001", {}, "corpus", "-") == ("corpus", "id10001", "00001")
    assert ids_from_key("103-1240-0000", {}, "corpus", "-") == ("corpus", "103", "103-1240-0000")
    assert ids_from_key("0001", {}, "corpus", "-") is None
    assert ids_from_key("0001", {"speaker": "s9", "dataset": "d"}, "corpus", "-") == ("d", "s9", "0001")
    wav = (DEMO / "phone" / "dana" / "utt0.wav").read_bytes()
    folder = tmp_path / "tars"
    folder.mkdir()
    _tar(folder / "a.tar", {
        "103-1240-0000.wav": wav,  # LibriSpeech's naming: speaker 103
        "0001.wav": wav, "0001.json": json.dumps({"speaker_id": "s9", "utterance_id": "u1"}).encode(),
        "0002.flac": wav,  # no speaker anywhere
        "0003.json": b"{}",  # a sample without audio
        "0004.wav": wav, "0004.json": b"[not json",
        "phone/dana/utt0.wav": wav,
    })
    _tar(folder / "b.tar", {"phone/dana/utt0.wav": wav})  # the same member again: the first is kept
    corpus = list_corpus(_cfg(corpus_dir=str(folder), input_format="webdataset"), 2, cache_folder=tmp_path / "c")
    assert corpus.frame["item_id"].tolist() == ["phone/dana/utt0", "tars/103/103-1240-0000", "tars/s9/u1"]
    assert set(corpus.frame["path"]) == {str(folder / "a.tar")}
    codes = sorted((f.reason_code, f.path.rsplit("#", 1)[-1]) for f in corpus.failures)
    assert codes == [("bad_record", "0002.flac"), ("bad_record", "0004.json"), ("bad_record", "0004.wav"),
                     ("duplicate_key", "phone/dana/utt0.wav"), ("missing", "0003.json")]
    assert all(set(f.reason_code) and f.reason_code in REASON_CODES for f in corpus.failures)
    with pytest.raises(Exception, match="input_format: webdataset reads audio"):
        list_corpus(_cfg(corpus_dir=str(folder), input_format="webdataset", input="embeddings"), 2)


def test_tars_parquet_and_a_bucket_of_the_speech_give_the_embeddings_of_the_files(tmp_path, s3_server):
    """The demo corpus as files, as webdataset tars (bad members beside it) and as parquet of `{bytes, path}` structs
    in a bucket of the real local S3 server: the same speakers and byte-identical embeddings and evaluation."""
    from mlprep.demo import pack_files

    runs = {}
    for form in ("files", "webdataset", "s3-parquet"):
        work = tmp_path / form
        work.mkdir()
        corpus = str(DEMO)
        if form == "webdataset":
            corpus = str(work / "data" / "tars")
            pack_files(DEMO, corpus, "webdataset", per_container=6)
            _tar(work / "data" / "tars" / "bad.tar", {"nospeaker.wav": b"RIFF", "phone/zed/junk.wav": b"not audio",
                                                     "../../outside.wav": b"evil"})
            (work / "data" / "tars" / "junk.tar").write_bytes(b"not a tar" * 100)
        elif form == "s3-parquet":
            pack_files(DEMO, s3_server.root / "bucket" / "speech", "parquet", per_container=6, struct="audio")
            corpus = "s3://bucket/speech"
        config = {"device": "cpu", **only("speaker_embed"), "object_storage": s3_server.storage,
                  "speaker_embed": {"corpus_dir": corpus, "input_format": form.removeprefix("s3-"), "shards": 2,
                                    "decode_workers": 1}}
        run_snakemake(work, config)
        runs[form] = work / "results" / "speaker_embed"
        assert [p for p in work.rglob("*") if p.is_file() and p.relative_to(work).parts[0] not in
                ("results", ".snakemake", "data", "config.yaml")] == []
    for form in ("webdataset", "s3-parquet"):
        for name in ("speaker_embeddings.npy", "utterance_embeddings.npy", "speaker_ids.txt", "eval.json"):
            assert (runs[form] / name).read_bytes() == (runs["files"] / name).read_bytes(), (form, name)
    utterances = pd.read_parquet(runs["webdataset"] / "utterances.parquet")
    assert utterances["path"].str.contains(r"\.tar#", regex=True).all()
    failures = pd.read_parquet(runs["webdataset"] / "failures.parquet")
    assert sorted(failures["reason_code"]) == ["bad_container", "bad_record", "not_audio", "unsafe_path"]
    assert failures["path"].str.endswith("bad.tar#phone/zed/junk.wav").any()
    assert len(pd.read_parquet(runs["s3-parquet"] / "failures.parquet")) == 0
