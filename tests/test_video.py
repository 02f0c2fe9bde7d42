"""video_frames: sampling, the three decoder backends, failure paths, the watchdog, and workflow runs."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_snakemake

from mlprep.config import only
from mlprep.demo import write_clip
from mlprep.failures import FailureLog, ItemError
from mlprep.ids import shard_of
from mlprep.video.decode import BACKENDS, ClipError, extract_clip, uniform_indices
from mlprep.video.extract import ExtractSettings, extract_items
from mlprep.video.pairs import read_pairs, split_of
from mlprep.watchdog import CallTimeoutError, Watchdog


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    made = {
        "plain": write_clip(d / "plain.mp4", 4, 25, (320, 180), gop=25),
        "long_gop": write_clip(d / "long_gop.mp4", 6, 30, (426, 240), gop=90, source="testsrc2"),
        "odd": write_clip(d / "odd.mp4", 3, 24, (250, 130), gop=12, source="smptebars"),
        "red": write_clip(d / "red.mp4", 0.5, 10, (160, 120), source="color=c=red"),
        "audio_longer": write_clip(d / "audio_longer.mkv", 2, 25, (320, 180), gop=25, audio_seconds=4),
        "mpegts": write_clip(d / "mpegts.ts", 3, 25, (320, 180), gop=25, source="testsrc2"),
    }
    data = bytearray(made["plain"].read_bytes())  # moov at the end: corrupt the tail of the frame data
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    cut = mdat + 4 + int((moov - mdat) * 0.6)
    data[cut : moov - 8] = bytes(moov - 8 - cut)
    (d / "corrupt_tail.mp4").write_bytes(bytes(data))
    made["corrupt_tail"] = d / "corrupt_tail.mp4"
    (d / "zero.mp4").write_bytes(b"")
    made["zero"] = d / "zero.mp4"
    (d / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    made["text"] = d / "text.mp4"
    full = made["plain"].read_bytes()
    (d / "truncated.mp4").write_bytes(full[: len(full) // 10])
    made["truncated"] = d / "truncated.mp4"
    return made


@pytest.fixture(scope="module")
def audio_only(tmp_path_factory) -> Path:
    import subprocess

    from mlprep.video.decode import ffmpeg_exe

    path = tmp_path_factory.mktemp("audio") / "audio_only.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac",
                    str(path)], check=True)
    return path


def test_uniform_indices():
    assert uniform_indices(0, 99, 16).tolist() == np.linspace(0, 99, 16).astype(int).tolist()
    assert uniform_indices(0, 99, 16)[[0, -1]].tolist() == [0, 99]
    short = uniform_indices(0, 4, 16)
    assert len(short) == 16 and set(short.tolist()) == {0, 1, 2, 3, 4} and np.all(np.diff(short) >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_count_shape_and_indices(clips, backend):
    clip = extract_clip(clips["plain"], 16, 256, 160, backend)
    assert clip.frames.shape == (16, 160, 256, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == np.linspace(0, 99, 16).astype(int).tolist()
    assert clip.fps == 25 and clip.duration == pytest.approx(4.0) and not clip.repeated
    assert clip.source_frames == 100 == clip.container_frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_red_clip_gives_red_rgb_frames(clips, backend):
    clip = extract_clip(clips["red"], 16, 64, 48, backend)
    mean = clip.frames.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 230 and mean[1] < 20 and mean[2] < 20  # RGB order, not BGR
    assert clip.repeated and clip.source_frames == 5 and len(clip.frames) == 16
    assert sorted(set(clip.indices)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["plain", "long_gop", "odd", "audio_longer", "mpegts"])
def test_backends_agree(clips, name):
    results = {b: extract_clip(clips[name], 16, 256, 160, b) for b in BACKENDS}
    reference = results["decord"]
    for backend, clip in results.items():
        assert clip.indices == reference.indices, backend
        diff = np.abs(clip.frames.astype(int) - reference.frames)
        assert diff.mean() < 1.0 and diff.max() <= 16, (backend, diff.mean(), diff.max())


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
@pytest.mark.parametrize("name", ["plain", "long_gop", "corrupt_tail"])
def test_hwaccel_cuda_gives_the_cpu_frames_or_says_why_not(clips, name, backend, monkeypatch):
    """NVDEC frames equal ffmpeg's CPU frames exactly (checked on a GPU by bench/device_check.sh); without a
    usable GPU, as here, every clip is decoded on the CPU with the same note, whatever came before it."""
    import mlprep.video.decode as decode

    monkeypatch.setattr(decode, "_nvdec_missing", None)
    cpu = extract_clip(clips[name], 16, 256, 160, backend)
    for _ in range(2):  # the first clip finds NVDEC missing, the next ones skip it: the same note either way
        gpu = extract_clip(clips[name], 16, 256, 160, backend, hwaccel="cuda")
        assert gpu.indices == cpu.indices and np.array_equal(gpu.frames, cpu.frames)
        if decode._nvdec_missing is not None and name != "corrupt_tail":  # (its note is about its broken tail)
            assert gpu.note.startswith("NVDEC unavailable (") and "0x" not in gpu.note, gpu.note


@pytest.mark.parametrize("name", ["plain", "long_gop", "odd"])
def test_frames_that_leave_the_decoder_as_nv12_convert_to_the_cpu_frames(clips, name):
    """NVDEC hands its frames back as nv12, a CPU decoder as the stream's yuv420p: the same samples, laid out
    differently. Both go through one conversion to RGB (PyAV's rgb_frame, ffmpeg's as_stream_format), so the
    frames are equal; FFmpeg's direct nv12 -> RGB path is not (the 3-5 levels measured on an H200)."""
    import av
    import ffmpeg

    from mlprep.video.decode import _ffmpeg_frames, as_stream_format, ffmpeg_exe, probe, rgb_frame

    info = probe(clips[name])
    assert info.pix_fmt == "yuv420p"
    direct = []
    with av.open(str(clips[name])) as container:
        for frame in container.decode(container.streams.video[0]):
            nv12 = frame.reformat(format="nv12")
            assert np.array_equal(rgb_frame(nv12, info.pix_fmt), rgb_frame(frame, info.pix_fmt))
            direct.append(np.abs(nv12.to_ndarray(format="rgb24").astype(int) - rgb_frame(frame, info.pix_fmt)).max())
    assert max(direct) > 2  # what the shared conversion removes

    indices = np.array([0, 7, 30])
    cpu, _ = _ffmpeg_frames(clips[name], indices, info, 1, None)
    select = "+".join(f"eq(n,{i})" for i in indices)
    for shared in (True, False):
        video = ffmpeg.input(str(clips[name])).video.filter("format", "nv12").filter("select", select)
        video = as_stream_format(video, info) if shared else video
        raw, _ = video.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough").run(
            cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True, quiet=True)
        frames = np.frombuffer(raw, np.uint8).reshape(cpu.shape)
        assert np.array_equal(frames, cpu) == shared, shared


def _every_frame(path: Path) -> dict[int, np.ndarray]:
    """Each frame of the clip by its pts, from a decoder of its own reading the file from the start."""
    import av

    with av.open(str(path)) as container:
        return {f.pts: f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])}


def test_a_process_keeps_one_decoder_per_kind_of_stream_and_drops_one_whose_clip_failed(clips, monkeypatch):
    """PyAV's decoders are kept across clips (on NVDEC: one CUDA context and one hardware decoder per lane, not one
    per clip). A kept decoder, flushed, gives every clip the frames a decoder of its own gives, whatever it decoded
    before, and seeking back inside a clip; clips of one kind (codec, extradata, threads, device) share it whatever
    their content, length or container; the two kinds used last are kept; one whose clip raised is not reused."""
    import mlprep.video.decode as decode
    from mlprep.video.decode import KeptDecoders, ShortStreamError, probe, read_pyav

    kept = KeptDecoders(size=2)
    monkeypatch.setattr(decode, "KEPT_DECODERS", kept)
    truth = {name: _every_frame(clips[name]) for name in ("plain", "audio_longer", "odd", "long_gop")}
    order = [("plain", 1), ("audio_longer", 1), ("odd", 2), ("plain", 2), ("long_gop", 3), ("plain", 3),
             ("odd", 4), ("long_gop", 5)]
    for step, (name, opened) in enumerate(order):
        info = probe(clips[name])
        wanted = np.unique(np.r_[uniform_indices(0, info.n_frames - 1, 5), step % 3 + 1])
        frames = read_pyav(clips[name], wanted, info)
        assert kept.opened == opened, (step, name)
        for frame, pts in zip(frames, info.pts[wanted]):
            assert np.array_equal(frame, truth[name][int(pts)]), (step, name, int(pts))
        backwards = wanted[::-1].copy()  # each wanted frame behind the last: a seek and a flush every time
        assert np.array_equal(read_pyav(clips[name], backwards, info), frames[::-1])
    info = probe(clips["plain"])  # (evicted by now) a frame past the clip's end: its decoder raises, is dropped
    one_too_many = decode.StreamInfo(np.r_[info.pts, info.pts[-1] + 1000], info.keyframe_pts, info.time_base,
                                     info.fps, info.width, info.height, info.container_frames, info.pix_fmt)
    with pytest.raises(ShortStreamError):
        read_pyav(clips["plain"], np.array([0, len(one_too_many.pts) - 1]), one_too_many)
    assert kept.opened == 6
    for _ in range(2):
        read_pyav(clips["plain"], np.array([0, 3]), info)
        assert kept.opened == 7  # a new decoder, then kept


def test_a_clip_whose_demuxer_seeks_past_the_keyframe_asked_for_still_gives_every_frame(clips):
    """MPEG-TS seeks by decoding time and lands on the keyframe after the one asked for (or past the end) when asked
    for its presentation time: PyAV's reader then found no frame at the time wanted and the whole clip failed. A
    seek that lands past the frame wanted is made again from earlier; every frame, in any order, is the frame a
    decoder of its own gives."""
    from mlprep.video.decode import probe, read_pyav

    truth, info = _every_frame(clips["mpegts"]), probe(clips["mpegts"])
    assert len(info.keyframe_pts) == 3 and len(truth) == info.n_frames == 75
    every = np.arange(info.n_frames)
    for wanted in (np.unique(uniform_indices(0, info.n_frames - 1, 16)), every, every[::-1], every[::-1][::7]):
        frames = read_pyav(clips["mpegts"], wanted, info)
        for frame, pts in zip(frames, info.pts[wanted]):
            assert np.array_equal(frame, truth[int(pts)]), int(pts)


def test_decord_does_not_read_transport_or_program_streams_where_it_misplaces_frames(clips, tmp_path):
    """decord seeks a GOP late in MPEG-TS, M2TS and MPEG-PS files and fills in with the nearest frames it has, so
    the default backend gave other frames than asked for, silently: such clips are read with PyAV (the frames a
    decoder of their own gives) and their note says why; other containers are decord's as before."""
    import subprocess

    from mlprep.video.decode import _container_kind, decord_misplaces, ffmpeg_exe, probe, resize_frames

    made = {"MPEG-TS": clips["mpegts"]}
    for kind, name, args in (("MPEG-TS", "m2ts.m2ts", ["-c:v", "libx264", "-f", "mpegts", "-mpegts_m2ts_mode", "1"]),
                             ("MPEG-PS", "ps.mpg", ["-c:v", "mpeg2video", "-f", "mpeg"])):
        made[f"{kind} {name}"] = tmp_path / name
        subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=160x96:rate=25:"
                        "duration=2", *args, "-g", "25", "-pix_fmt", "yuv420p", str(tmp_path / name)], check=True)
    for kind, path in made.items():
        clip = extract_clip(path, 8, 64, 40, "decord")
        assert clip.note == f"decord misplaces frames in {kind.split()[0]}; frames read with PyAV", clip.note
        truth, pts = _every_frame(path), probe(path).pts
        expected = resize_frames(np.stack([truth[int(pts[i])] for i in clip.indices]), 64, 40)
        assert np.array_equal(clip.frames, expected), kind
    for name in ("plain", "audio_longer", "odd"):
        assert decord_misplaces(_container_kind(clips[name])) is None
        assert extract_clip(clips[name], 8, 64, 40, "decord").note == ""


def _made_clip(path: Path, *codec_args: str) -> Path:
    import subprocess

    from mlprep.video.decode import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x96:rate=10:"
                    "duration=2", *codec_args, "-g", "10", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def test_a_codec_outside_the_kept_ones_is_decoded_by_the_containers_own_decoder_on_the_device_asked_for(
        tmp_path, clips, monkeypatch):
    """MPEG-4 part 2 (its decoder reads the container's codec tag) is not given a kept decoder: the CPU decodes it
    with the container's, and asked for NVDEC its container is opened with the device, so that the same decoder
    runs there (here, with no GPU, that fails as NVDEC unavailable, and the clip is decoded on the CPU). A clip of
    a kept kind is opened without the device: its kept decoder makes the device's decoder."""
    import mlprep.video.decode as decode
    from mlprep.video.decode import KeptDecoders, NoGpuDecoder, clip_container, probe, resize_frames

    path = _made_clip(tmp_path / "mpeg4.avi", "-c:v", "mpeg4")
    kept = KeptDecoders()
    monkeypatch.setattr(decode, "KEPT_DECODERS", kept)
    monkeypatch.setattr(decode, "_nvdec_missing", None)
    cpu = extract_clip(path, 6, 64, 40, "pyav")
    assert kept.opened == 0 and cpu.note == ""
    truth, pts = _every_frame(path), probe(path).pts  # the frames of a decoder of its own, resized as the job does
    assert np.array_equal(cpu.frames, resize_frames(np.stack([truth[int(pts[i])] for i in cpu.indices]), 64, 40))
    with pytest.raises(NoGpuDecoder, match="cannot open a cuda device"):
        with clip_container(path, "cuda"):
            pass
    with clip_container(clips["plain"], "cuda") as container:
        assert not container.streams.video[0].codec_context.is_hwaccel
    gpu = extract_clip(path, 6, 64, 40, "pyav", hwaccel="cuda")
    assert np.array_equal(gpu.frames, cpu.frames) and kept.opened == 0
    assert gpu.note.startswith("NVDEC unavailable (PyAV cannot open a cuda device"), gpu.note


def test_av1_clips_get_a_kept_decoder_and_nvdec_gets_ffmpegs_own_av1_decoder(tmp_path, monkeypatch):
    """PyAV decodes AV1 with libdav1d, a CPU-only decoder: a kind is told by the format's name, not the decoder's,
    so AV1 clips are kept like the other kinds (they were taken for an unknown codec and NVDEC refused them), and
    on a device the decoder is FFmpeg's own `av1`, the one with NVDEC."""
    import av

    import mlprep.video.decode as decode
    from mlprep.video.decode import KeptDecoders, device_codec, probe, read_pyav

    path = _made_clip(tmp_path / "av1.mp4", "-c:v", "libsvtav1", "-svtav1-params", "log-level=0")
    kept = KeptDecoders()
    monkeypatch.setattr(decode, "KEPT_DECODERS", kept)
    monkeypatch.setattr(decode, "_nvdec_missing", None)
    info, truth = probe(path), _every_frame(path)
    for wanted in (np.arange(info.n_frames), np.arange(info.n_frames)[::-3]):
        frames = read_pyav(path, wanted, info)
        assert all(np.array_equal(f, truth[int(p)]) for f, p in zip(frames, info.pts[wanted]))
    assert kept.opened == 1
    dav1d, h264 = av.Codec("libdav1d", "r"), av.Codec("h264", "r")
    assert device_codec(dav1d, "cuda").name == "av1" and device_codec(dav1d, None) is dav1d
    assert device_codec(h264, "cuda") is h264
    gpu = extract_clip(path, 6, 64, 40, "pyav", hwaccel="cuda")
    assert gpu.note.startswith("NVDEC unavailable (PyAV cannot open a cuda device"), gpu.note
    assert np.array_equal(gpu.frames, extract_clip(path, 6, 64, 40, "pyav").frames)


ORIENTATIONS = {  # ffmpeg's options that write a display matrix: (the matrix's signs, the frames shown transposed)
    "none": ([], (1, 0, 0, 1)),
    "turned 90": (["-display_rotation", "90"], (0, -1, 1, 0)),
    "turned 180": (["-display_rotation", "180"], (-1, 0, 0, -1)),
    "turned 270": (["-display_rotation", "270"], (0, 1, -1, 0)),
    "mirrored": (["-display_hflip"], (-1, 0, 0, 1)),
    "upside down": (["-display_vflip"], (1, 0, 0, -1)),
    "turned 90, mirrored": (["-display_rotation", "90", "-display_hflip"], (0, -1, -1, 0)),
}


@pytest.fixture(scope="module")
def turned_clips(tmp_path_factory):
    """A 160x96 clip as a phone stores one recorded on its side: the same frames, with a display matrix."""
    import subprocess

    from mlprep.video.decode import ffmpeg_exe

    folder = tmp_path_factory.mktemp("turned")
    plain = _made_clip(folder / "plain.mp4", "-c:v", "libx264")
    made = {}
    for k, (name, (options, _)) in enumerate(ORIENTATIONS.items()):
        made[name] = folder / f"clip{k}.mp4"
        subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", *options, "-i", str(plain), "-c", "copy",
                        str(made[name])], check=True)
    return made


def _shown(path: Path) -> np.ndarray:
    """Every frame of the clip as ffmpeg shows it (its own autorotation applies the display matrix)."""
    import subprocess

    from mlprep.video.decode import ffmpeg_exe

    raw = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], check=True, capture_output=True).stdout
    frames = np.frombuffer(raw, np.uint8)
    return frames.reshape(20, -1, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clips_with_a_display_matrix_give_their_frames_upright_with_every_backend(turned_clips, backend):
    """Phone clips are stored on their side with a display matrix that turns them upright: PyAV gave them as
    stored, decord turned them (but did not mirror), and ffmpeg's backend turned them and then read the turned
    frames with the stored width and height, so every frame came back scrambled, without an error. Every backend
    now gives the frames as ffmpeg shows them, turned and mirrored."""
    from mlprep.video.decode import probe, resize_frames

    for name, (_, signs) in ORIENTATIONS.items():
        path = turned_clips[name]
        assert probe(path).display == signs, name
        shown = _shown(path).reshape(20, *((160, 96) if signs[0] == 0 else (96, 160)), 3)
        clip = extract_clip(path, 6, 80, 48, backend)
        expected = resize_frames(shown[clip.indices], 80, 48).astype(int)
        diff = np.abs(clip.frames.astype(int) - expected)
        if backend == "decord":  # its own colour conversion (test_backends_agree's bound)
            assert diff.mean() < 1.0 and diff.max() <= 16, (name, diff.mean(), diff.max())
        else:
            assert diff.max() == 0, (name, diff.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_clip_cut_without_re_encoding_gives_the_frames_its_edit_list_shows(tmp_path, backend):
    """A clip cut from a longer one with `-ss ... -c copy` starts with the part of its first GOP before the cut,
    which an edit list says not to show: the probe counted those frames, so PyAV and ffmpeg waited for a frame
    that never came and the clip failed, and decord, which shows them, gave each sampled frame as one that many
    frames earlier (or from before the cut).
    Every backend now gives the frames ffmpeg shows (decord's clips of this kind are read with PyAV, noted)."""
    import subprocess

    from mlprep.video.decode import ffmpeg_exe, probe, resize_frames

    long = _made_clip(tmp_path / "long.mp4", "-c:v", "libx264", "-bf", "3")
    path = tmp_path / "cut.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-ss", "0.55", "-i", str(long), "-c", "copy",
                    str(path)], check=True)
    raw = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-fps_mode", "passthrough", "-f",
                          "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    shown = np.frombuffer(raw, np.uint8).reshape(-1, 96, 160, 3)
    assert probe(path).n_frames == len(shown) < 20  # (the file holds all 20, from the keyframe before the cut)
    clip = extract_clip(path, 8, 80, 48, backend)
    assert clip.indices[-1] == len(shown) - 1
    diff = np.abs(clip.frames.astype(int) - resize_frames(shown[clip.indices], 80, 48))
    assert diff.max() == 0, diff.max()
    assert clip.note == ("decord shows the frames an edit list cuts; frames read with PyAV" if backend == "decord"
                         else ""), clip.note


@pytest.mark.parametrize("backend", BACKENDS)
def test_h264_in_avi_gives_the_frames_ffmpeg_shows(tmp_path, backend):
    """AVI stores no presentation times: PyAV stamps H.264's frames in the order they are stored, so with B-frames
    the frame wanted never came by its stamp and the clip failed, and decord, which has no timestamps for them
    (every frame at -3.7e17 s), gave 12 of 16 sampled frames wrong, with or without B-frames. Frames are now placed
    by count where their stamps cannot place them, decord's clips without timestamps are read with PyAV (noted), and
    every backend gives the frames ffmpeg shows, in any order asked for."""
    import dataclasses
    import subprocess

    from mlprep.video.decode import ShortStreamError, ffmpeg_exe, probe, read_pyav, resize_frames

    for b_frames in ("3", "0"):
        path = _made_clip(tmp_path / f"bf{b_frames}.avi", "-c:v", "libx264", "-bf", b_frames)
        raw = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-fps_mode", "passthrough", "-f",
                              "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
        shown = np.frombuffer(raw, np.uint8).reshape(-1, 96, 160, 3)
        info = probe(path)
        assert info.n_frames == len(shown) == 20 and info.by_count == (b_frames != "0")
        clip = extract_clip(path, 8, 80, 48, backend)
        assert np.array_equal(clip.frames, resize_frames(shown[clip.indices], 80, 48)), b_frames
        note = "decord does not know where this clip's frames are; frames read with PyAV"
        assert clip.note == (note if backend == "decord" else ""), clip.note
        if backend == "pyav":
            for wanted in (np.arange(20)[::-1], np.array([19]), np.array([3, 2, 17])):
                assert np.array_equal(read_pyav(path, wanted, info), shown[wanted])
        if backend == "pyav" and info.by_count:  # (a frame past the clip's end, as a cut tail leaves it)
            with pytest.raises(ShortStreamError, match="20 frames decode, frame 20 wanted"):
                read_pyav(path, np.array([20]), dataclasses.replace(info, pts=np.r_[info.pts, info.pts[-1] + 1]))


def test_hwaccel_cuda_needs_a_backend_that_has_it(tmp_path):
    from mlprep.config import ConfigError, load_schema, validate

    schema = load_schema(Path(__file__).resolve().parents[1] / "config" / "schema.yaml")
    with pytest.raises(ConfigError, match="video_frames.backend"):
        validate({"video_frames": {"hwaccel": "cuda", "backend": "decord"}}, schema)
    for backend in ("pyav", "ffmpeg"):
        validate({"video_frames": {"hwaccel": "cuda", "backend": backend}}, schema)
    for backend in BACKENDS:  # auto chooses per shard, the CPU where the backend has no GPU decoder
        validate({"video_frames": {"hwaccel": "auto", "backend": backend}}, schema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hwaccel_auto_decodes_where_it_is_faster_and_says_why(clips, backend, monkeypatch):
    """`hwaccel: auto` without a GPU, as here: the shard's frames are the CPU's, no clip carries a note, and the
    shard's choice says why (NVDEC unavailable; decord has none). The choice itself, over a GPU decoder that
    cannot run here: NVDEC is taken when it was faster on the last trial clip, the CPU when it was slower or
    its frames were more than 2 levels off, and the trial clips keep the CPU's frames."""
    import mlprep.video.decode as decode
    from mlprep.video.extract import DecoderChoice
    from mlprep.video.pairs import ClipItem

    monkeypatch.setattr(decode, "_nvdec_missing", None)
    items = [ClipItem(f"c{k}", "t", name, str(clips[name]), None, None, "train", 0)
             for k, name in enumerate(["plain", "long_gop", "text", "odd", "plain"])]
    settings = {h: ExtractSettings(num_frames=4, width=64, height=40, backend=backend, hwaccel=h)
                for h in (None, "auto")}
    cpu, _ = extract_items(items, settings[None], FailureLog(True))
    choice: dict = {}
    auto, index = extract_items(items, settings["auto"], FailureLog(True), choice=choice)
    assert [r["id"] for r in auto] == [r["id"] for r in cpu] == ["c0", "c1", "c3", "c4"]
    assert all(np.array_equal(a["frames"], c["frames"]) and not a["note"] for a, c in zip(auto, cpu))
    assert choice["hwaccel"] == "auto" and choice["decoder"] == "cpu" and not choice["trials"]
    why = "decord has no GPU decoder" if backend == "decord" else "NVDEC unavailable ("
    assert choice["reason"].startswith(why), choice

    frames = extract_clip(clips["plain"], 4, 64, 40, "pyav")

    def trial(nvdec_s: float, off_by: int):
        calls = []

        def run(hwaccel):
            calls.append(hwaccel)
            if hwaccel == "cuda":
                time.sleep(nvdec_s)
                return frames.__class__(**{**frames.__dict__, "frames": np.clip(frames.frames.astype(int) + off_by,
                                                                                  0, 255).astype(np.uint8)})
            time.sleep(0.02)
            return frames

        chooser = DecoderChoice("pyav")
        out = [chooser.decode(run) for _ in range(4)]
        assert all(o.frames is frames.frames for o in out[:2])  # the trial clips keep the CPU's frames
        return chooser.summary(), calls

    summary, calls = trial(0.0, 1)
    assert summary["decoder"] == "nvdec" and calls == [None, "cuda", None, "cuda", "cuda", "cuda"]
    assert len(summary["trials"]) == 2 and summary["trials"][-1]["max_abs_diff"] == 1
    summary, calls = trial(0.05, 0)
    assert summary["decoder"] == "cpu" and calls[-2:] == [None, None] and "CPU was faster" in summary["reason"]
    summary, calls = trial(0.0, 3)
    assert summary["decoder"] == "cpu" and "by 3 levels" in summary["reason"]
    assert calls == [None, "cuda", None, None, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_samples_inside_start_end(clips, backend):
    clip = extract_clip(clips["long_gop"], 8, 128, 80, backend, start=1.0, end=3.0)
    assert clip.indices[0] == 30 and clip.indices[-1] == 89  # 30 fps: [1 s, 3 s) is frames 30..89
    assert clip.duration == pytest.approx(2.0)
    with pytest.raises(ClipError, match="holds no frames"):
        extract_clip(clips["plain"], 8, 128, 80, backend, start=10.0, end=12.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_reported_frame_count_still_gives_num_frames(clips, backend):
    clip = extract_clip(clips["corrupt_tail"], 16, 128, 80, backend)
    assert len(clip.frames) == 16
    assert clip.container_frames == 100 and clip.source_frames < 100
    assert max(clip.indices) == clip.source_frames - 1
    assert "decode" in clip.note


def test_audio_longer_than_video_samples_the_video_only(clips):
    clip = extract_clip(clips["audio_longer"], 16, 128, 80, "decord")
    assert max(clip.indices) == 49 and clip.duration == pytest.approx(2.0)


@pytest.mark.parametrize("name, code", [("zero", "not_a_video"), ("text", "not_a_video"), ("truncated", "truncated")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_files_raise_with_their_reason_code(clips, name, code, backend):
    with pytest.raises(ClipError) as caught:
        extract_clip(clips[name], 16, 128, 80, backend)
    assert caught.value.code == code


def test_no_video_stream_raises(audio_only):
    with pytest.raises(ClipError, match="no video stream") as caught:
        extract_clip(audio_only, 16, 128, 80, "decord")
    assert caught.value.code == "no_video_stream"


def _sleepy_decoder(path, *args):
    if Path(path).name == "hang.mp4":
        time.sleep(60)
    return extract_clip(path, *args)


def _crashing_decoder(path, *args):
    import os

    os._exit(3)


def test_clips_decode_after_this_process_has_used_opencvs_threads(clips):
    """Found in the full suite: once cv2 had run on several threads in the process (a test resizing frames), every
    watchdog child's decode hung until its timeout, since OpenCV's pool does not survive a fork. The watchdog
    leaves no pool to inherit."""
    import cv2

    from mlprep.video.pairs import ClipItem

    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    cv2.GaussianBlur(cv2.resize(frame, (256, 160), interpolation=cv2.INTER_AREA), (0, 0), 3)  # the pool started
    items = [ClipItem(f"c{k}", "t", "plain.mp4", str(clips["plain"]), None, None, "train", 0) for k in range(3)]
    try:
        for job_threads in (1, 2):
            failures = FailureLog(True)
            settings = ExtractSettings(4, 64, 40, "pyav", None, 10.0, job_threads)
            records, _ = extract_items(items, settings, failures)
            assert len(records) == 3 and not failures.records, [f.reason for f in failures.records]
    finally:
        cv2.setNumThreads(threads)


def test_watchdog_kills_a_hanging_call_and_goes_on():
    with Watchdog(timeout=1.0) as dog:
        started = time.perf_counter()
        with pytest.raises(CallTimeoutError):
            dog.call(time.sleep, 30)
        assert time.perf_counter() - started < 10
        assert dog.call(sum, [1, 2, 3]) == 6
        with pytest.raises(ItemError, match="ZeroDivisionError") as caught:
            dog.call(divmod, 1, 0)
        assert caught.value.code == "decode_error"


def test_calls_one_after_another_run_in_the_lane_freed_last():
    """`hwaccel: auto` times its trial clips one after another: they must meet the decoders one process keeps, not
    a cold one in each lane."""
    import os

    from mlprep.video.extract import DecodeLanes

    lanes = DecodeLanes(3, 10.0)
    try:
        pids = [lanes.call(os.getpid) for _ in range(4)]
        assert len(set(pids)) == 1 and pids[0] != os.getpid()
        busy = [lanes._free.get() for _ in range(2)]  # two lanes taken: the next call gets the third
        assert lanes.call(os.getpid) not in pids
        for watchdog in busy:
            lanes._free.put(watchdog)
    finally:
        lanes.close()


def test_shard_records_hangs_crashes_and_broken_files_and_finishes(clips, tmp_path):
    from mlprep.video.pairs import ClipItem

    hang = tmp_path / "hang.mp4"
    hang.write_bytes(clips["plain"].read_bytes())

    def item(name, path):
        return ClipItem(name, f"text of {name}", Path(path).name, str(path), None, None, "train", 0)

    items = [item("ok1", clips["plain"]), item("hang", hang), item("zero", clips["zero"]),
             item("missing", tmp_path / "missing.mp4"), item("ok2", clips["odd"])]
    failures = FailureLog(True)
    settings = ExtractSettings(num_frames=4, width=64, height=40, backend="decord", timeout_s=2.0)
    records, index = extract_items(items, settings, failures, decode=_sleepy_decoder)
    assert [r["id"] for r in records] == ["ok1", "ok2"]
    assert {f.item_id for f in failures.records} == {"hang", "zero", "missing"}
    hang_failure = next(f for f in failures.records if f.item_id == "hang")
    assert hang_failure.reason_code == "decoder_timeout" and hang_failure.path == str(hang)
    assert "no answer within" in hang_failure.reason
    codes = {f.item_id: f.reason_code for f in failures.records}
    assert codes == {"hang": "decoder_timeout", "zero": "not_a_video", "missing": "missing"}
    assert index["status"].tolist() == ["ok", "failed", "failed", "failed", "ok"]
    crashed = FailureLog(True)
    extract_items(items[:1], settings, crashed, decode=_crashing_decoder)
    assert crashed.records[0].reason_code == "decoder_crash" and "died" in crashed.records[0].reason
    with pytest.raises(Exception, match="zero.mp4"):
        extract_items(items[2:3], settings, FailureLog(False))


def _meeting_decoder(path, *args):
    """extract_clip, once another lane's process has begun a clip too (else it fails after 20 s); the record's note
    says which process decoded it with how many codec threads."""
    import dataclasses
    import os

    meet = Path(os.environ["MLPREP_TEST_MEET"])
    (meet / f"{os.getpid()}-{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + 20
    while len({p.name.split("-")[0] for p in meet.iterdir()}) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("no other clip was being decoded")
        time.sleep(0.005)
    return dataclasses.replace(extract_clip(path, *args), note=f"{os.getpid()} x{args[6]}")


def test_a_job_of_two_threads_decodes_two_clips_at_once_and_writes_them_in_order(clips, tmp_path, monkeypatch):
    """threads: 2 decodes in two lanes (watchdog processes), one codec thread each, both at once (the decoder here
    waits for the other lane); records and failure rows keep the items' order, frames those of one thread; a
    hanging clip times out in its lane while the other goes on; with continue_on_error off the first failure
    stops the shard without waiting on the clips in flight."""
    from mlprep.video.pairs import ClipItem

    hang = tmp_path / "hang.mp4"
    hang.write_bytes(clips["plain"].read_bytes())
    names = ["plain", "zero", "odd", "long_gop", "plain", "text", "odd"]
    items = [ClipItem(f"c{k}", "t", name, str(clips[name]), None, None, "train", 0) for k, name in enumerate(names)]
    one = ExtractSettings(num_frames=4, width=64, height=40, backend="pyav", timeout_s=30.0)
    two = ExtractSettings(num_frames=4, width=64, height=40, backend="pyav", timeout_s=30.0, threads=2)
    expected, expected_index = extract_items(items, one, FailureLog(True))
    meet = tmp_path / "meet"
    meet.mkdir()
    monkeypatch.setenv("MLPREP_TEST_MEET", str(meet))
    records, index = extract_items(items, two, FailureLog(True), decode=_meeting_decoder)
    assert [r["id"] for r in records] == [r["id"] for r in expected] == ["c0", "c2", "c3", "c4", "c6"]
    assert all(np.array_equal(a["frames"], b["frames"]) for a, b in zip(records, expected))
    assert index["clip_id"].tolist() == [f"c{k}" for k in range(len(names))]
    assert index["status"].tolist() == expected_index["status"].tolist()
    assert index["reason_code"].tolist() == expected_index["reason_code"].tolist()
    lanes = {r["note"] for r in records}
    assert len(lanes) == 2 and all(note.endswith(" x1") for note in lanes), lanes

    with_hang = [ClipItem("hang", "t", "hang.mp4", str(hang), None, None, "train", 0), *items[:3]]
    short = ExtractSettings(num_frames=4, width=64, height=40, backend="decord", timeout_s=2.0, threads=2)
    failures = FailureLog(True)
    records, index = extract_items(with_hang, short, failures, decode=_sleepy_decoder)
    assert [r["id"] for r in records] == ["c0", "c2"] and index["clip_id"].tolist() == ["hang", "c0", "c1", "c2"]
    assert [f.reason_code for f in failures.records] == ["decoder_timeout", "not_a_video"]

    started = time.perf_counter()
    with pytest.raises(Exception, match="zero.mp4"):
        extract_items([items[1], with_hang[0]], ExtractSettings(4, 64, 40, "decord", None, 120.0, 2),
                      FailureLog(False), decode=_sleepy_decoder)
    assert time.perf_counter() - started < 30  # the other lane's hang (60 s) was killed, not waited out


# ---------------------------------------------------------------- pairs


@pytest.mark.parametrize(
    "data",
    [
        [{"clip": "a.mp4", "text": "hello"}],
        {"pairs": [{"video_path": "a.mp4", "caption": "hello", "id": "a"}]},
        {"a": {"video": "a.mp4", "transcript": "hello"}},
        [["a.mp4", "hello"]],
        [{"vid": "a", "text": "hello"}],  # bare id + clip_ext
    ],
)
def test_pairs_accept_the_documented_shapes(tmp_path, data):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "p.json").write_text(json.dumps(data))
    catalog = read_pairs(tmp_path / "p.json", tmp_path, {"train": 2})
    assert catalog.failures == []
    [item] = catalog.items
    assert (item.clip_id, item.text, Path(item.path).name, item.split) == ("a", "hello", "a.mp4", "train")


def test_pairs_record_every_problem(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    data = [
        {"clip": "a.mp4", "text": "ok", "start": 1, "end": 2},
        {"clip": "a.mp4", "text": "dup"},
        {"clip": "missing.mp4", "text": "x"},
        {"clip": "../../etc/passwd", "text": "x", "id": "evil"},
        {"clip": "/abs/path.mp4", "text": "x", "id": "abs"},
        {"clip": "a.mp4", "id": "b", "text": "x", "start": 3, "end": 1},
        {"clip": "a.mp4", "id": "c"},
        {"text": "no clip"},
        42,
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    catalog = read_pairs(tmp_path / "p.json", tmp_path, {"train": 2})
    assert [(i.clip_id, i.start, i.end) for i in catalog.items] == [("a", 1.0, 2.0)]
    reasons = {f.item_id: f.reason for f in catalog.failures}
    assert "duplicate" in reasons["a"] and "not found" in reasons["missing"]
    assert "escapes" in reasons["evil"] and "must be relative" in reasons["abs"]
    assert "not after start" in reasons["b"] and "no text" in reasons["c"]
    assert len(catalog.failures) == 8


def test_splits_are_seeded_hash_stable_and_near_the_ratio():
    ids = [f"clip{i}" for i in range(4000)]
    val = [i for i in ids if split_of(i, 1, "train_val", 0.2) == "val"]
    assert 0.17 < len(val) / len(ids) < 0.23
    assert val == [i for i in ids if split_of(i, 1, "train_val", 0.2) == "val"]
    assert val != [i for i in ids if split_of(i, 2, "train_val", 0.2) == "val"]
    assert all(split_of(i, 1, "all_train", 0.2) == "train" for i in ids[:50])


# ---------------------------------------------------------------- workflow


def _video_config(workdir: Path, **overrides) -> dict:
    video = {
        "enabled": True,
        "pairs": str(workdir / "data" / "train_pairs.json"),
        "clips_dir": str(workdir / "data" / "clips"),
        "num_frames": 8,
        "width": 64,
        "height": 40,
        "split_mode": "train_val",
        "val_ratio": 0.3,
        "shards": {"train": 2, "val": 1},
        "timeout_s": 30,
    }
    video.update(overrides)
    return {"seed": 3, "continue_on_error": True, "device": "cpu", **only("video_frames"), "video_frames": video}


def _write_video_data(workdir: Path, clips: dict[str, Path], names: list[str]) -> None:
    data = workdir / "data"
    (data / "clips").mkdir(parents=True, exist_ok=True)
    pairs = []
    for name in names:
        source = clips.get(name.split("-")[0]) or clips["plain"]
        (data / "clips" / f"{name}.mp4").write_bytes(source.read_bytes())
        pairs.append({"clip": f"{name}.mp4", "text": f"pair {name}"})
    (data / "train_pairs.json").write_text(json.dumps(pairs))


def _load_pkls(workdir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((workdir / "results" / "video_frames").glob("*/*.pkl")):
        with open(path, "rb") as handle:
            for record in pickle.load(handle):
                out[record["id"]] = record
    return out


GOOD = ["plain-1", "plain-2", "odd-1", "long_gop-1", "red-1", "plain-3", "odd-2", "plain-4"]


@pytest.mark.slow
def test_video_workflow_end_to_end(tmp_path, clips):
    _write_video_data(tmp_path, clips, [*GOOD, "zero-1", "text-1", "truncated-1"])
    pairs = json.loads((tmp_path / "data" / "train_pairs.json").read_text())
    pairs.append({"clip": "nope.mp4", "text": "missing"})
    (tmp_path / "data" / "train_pairs.json").write_text(json.dumps(pairs))
    run_snakemake(tmp_path, _video_config(tmp_path, webdataset="npy"))
    out = tmp_path / "results" / "video_frames"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips_ok"] == 8 and summary["clips_failed"] == 4 and summary["frames"] == 64
    assert summary["failures_by_code"] == {"not_a_video": 2, "truncated": 1, "missing": 1}
    assert json.loads((out / "check.json").read_text())["failed_share"] == pytest.approx(4 / 12, abs=1e-6)
    assert set(summary["splits"]) == {"train", "val"} and summary["splits"]["val"]["clips_ok"] > 0
    records = _load_pkls(tmp_path)
    assert sorted(records) == sorted(GOOD)
    for record in records.values():
        assert record["frames"].shape == (8, 40, 64, 3) and record["frames"].dtype == np.uint8
        assert record["text"] == f"pair {record['id']}" and len(record["frame_indices"]) == 8
    assert records["red-1"]["repeated"] and records["red-1"]["frames"][..., 0].mean() > 230
    failures = pd.read_parquet(out / "failures.parquet")
    assert sorted(failures["item_id"]) == ["nope", "text-1", "truncated-1", "zero-1"]
    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == 11 and set(index["status"]) == {"ok", "failed"}
    assert (out / "contact_sheet.png").stat().st_size > 1000
    # the same clips as webdataset tars beside the pkls: every sample's frames, text and id as in the pkl
    samples = _webdataset_samples(sorted(out.glob("*/*.tar")))
    assert sorted(s["json"]["id"] for s in samples.values()) == sorted(GOOD)
    for key, sample in samples.items():
        record = records[sample["json"]["id"]]
        assert np.array_equal(sample["npy"], record["frames"]) and sample["txt"] == record["text"]
        assert sample["json"]["frame_indices"] == list(record["frame_indices"]) and "." not in key


@pytest.mark.slow
def test_clips_in_tars_and_in_a_bucket_give_the_frames_of_the_files(tmp_path, clips, s3_server):
    """The same clips as files, as webdataset tars named by a pairs file (with a bad container and members beside
    them), as parquet of bytes, and as tars in a bucket of the real local S3 server with no pairs file (texts from
    the samples' .txt): the same records, frames byte for byte; every bad container or member one failure record.
    The containers' jobs run with 2 threads: their members go to two decode lanes at once, each its own scratch
    file."""
    import io
    import tarfile

    from mlprep.demo import pack_files

    names = ["plain-1", "odd-1", "red-1", "plain-2", "plain-3"]
    runs = {}
    for form in ("files", "webdataset", "parquet", "s3-webdataset"):
        work = tmp_path / form
        _write_video_data(work, clips, names)
        overrides = {}
        if form == "webdataset":
            pack_files(work / "data" / "clips", work / "data" / "tars", "webdataset", per_container=2)
            with tarfile.open(work / "data" / "tars" / "bad.tar", "w") as archive:
                for name, data in (("../escape.mp4", b"evil"), ("junk-1.mp4", b"not a video at all")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
            (work / "data" / "tars" / "cut.tar").write_bytes((work / "data" / "tars" / "00000.tar").read_bytes()[:700])
            pairs = json.loads((work / "data" / "train_pairs.json").read_text())
            pairs += [{"clip": "junk-1", "text": "junk"}, {"clip": "gone-1.mp4", "text": "gone"}]
            (work / "data" / "train_pairs.json").write_text(json.dumps(pairs))
            overrides = {"clips_dir": str(work / "data" / "tars"), "input_format": "webdataset"}
        elif form == "parquet":  # an `mp4` column of bytes, a `key` column of the clips' names
            pack_files(work / "data" / "clips", work / "data" / "parquet", "parquet", per_container=3)
            overrides = {"clips_dir": str(work / "data" / "parquet"), "input_format": "parquet"}
        elif form == "s3-webdataset":
            bucket = s3_server.root / "bucket" / "clips"
            bucket.mkdir(parents=True)
            with tarfile.open(bucket / "00000.tar", "w") as archive:
                for name in names:
                    for member, data in ((f"{name}.mp4", (work / "data" / "clips" / f"{name}.mp4").read_bytes()),
                                         (f"{name}.txt", f"pair {name}".encode())):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        archive.addfile(info, io.BytesIO(data))
            overrides = {"clips_dir": "s3://bucket/clips", "input_format": "webdataset", "pairs": None}
        config = _video_config(work, **overrides)
        config["object_storage"] = s3_server.storage
        lanes = () if form == "files" else ("--set-threads", "video_extract_shard=2")  # members in two lanes
        run_snakemake(work, config, *lanes)
        runs[form] = _load_pkls(work)
        assert [p for p in work.rglob("*") if p.is_file() and p.relative_to(work).parts[0] not in
                ("results", ".snakemake", "data", "config.yaml")] == []
    assert sorted(runs["files"]) == sorted(names)
    for form in ("webdataset", "parquet", "s3-webdataset"):
        assert sorted(runs[form]) == sorted(names), form
        for clip_id, record in runs["files"].items():
            other = runs[form][clip_id]
            assert other["text"] == record["text"] and np.array_equal(other["frames"], record["frames"]), clip_id
            assert list(other["frame_indices"]) == list(record["frame_indices"])
    failures = pd.read_parquet(tmp_path / "webdataset" / "results" / "video_frames" / "failures.parquet")
    codes = dict(zip(failures["item_id"].where(failures["item_id"] != "", failures["path"]), failures["reason_code"]))
    assert codes.pop("junk-1") == "not_a_video" and codes.pop("gone-1") == "missing"
    assert sorted(codes.values()) == ["truncated", "unsafe_path"], codes  # cut.tar breaks off in its first member
    assert failures["path"].str.endswith("bad.tar#junk-1.mp4").any()


def _webdataset_samples(tars: list[Path]) -> dict[str, dict]:
    """key -> {extension: decoded value} of every sample in `tars`, read as webdataset does (key: the member's
    name up to the first dot of its file name)."""
    import io
    import tarfile

    from PIL import Image

    out: dict[str, dict] = {}
    for tar in tars:
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                data = archive.extractfile(member).read()
                value = {"npy": lambda d: np.load(io.BytesIO(d), allow_pickle=False), "txt": bytes.decode,
                         "json": json.loads}.get(ext, lambda d: np.asarray(Image.open(io.BytesIO(d))))(data)
                out.setdefault(key, {})[ext] = value
    return out


def test_frame_shards_as_webdataset_jpegs_decode_to_the_frames(tmp_path):
    from mlprep.video.extract import write_webdataset

    y, x = np.mgrid[0:40, 0:64]
    base = np.stack([np.stack([np.stack([(x * 4 + 40 * k) % 256, y * 6, np.full_like(x, 60 * t)], -1)  # smooth
                               for t in range(4)]) for k in range(3)]).astype(np.uint8)
    records = [{"id": f"clip/{k}.mp4", "text": f"text {k}", "frames": base[k], "fps": 25.0,
                "frame_indices": np.arange(4), "duration": 1.0, "start": None, "end": float("nan"),
                "source_frames": 25, "container_frames": 25, "repeated": False, "note": ""} for k in range(3)]
    write_webdataset(records, tmp_path / "a.tar", "val/001-of-004", "jpg")
    first = (tmp_path / "a.tar").read_bytes()
    write_webdataset(records, tmp_path / "a.tar", "val/001-of-004", "jpg")
    assert (tmp_path / "a.tar").read_bytes() == first  # no time or owner in the members: reproducible
    samples = _webdataset_samples([tmp_path / "a.tar"])
    assert sorted(samples) == ["val-00001-000000", "val-00001-000001", "val-00001-000002"]
    for k, key in enumerate(sorted(samples)):
        sample = samples[key]
        frames = np.stack([sample[f"frame{i:02d}.jpg"] for i in range(4)])
        assert frames.shape == (4, 40, 64, 3) and np.abs(frames.astype(int) - base[k]).mean() < 4
        assert sample["txt"] == f"text {k}" and sample["json"]["id"] == f"clip/{k}.mp4"
        assert sample["json"]["end"] is None and sample["json"]["frame_indices"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_video_resume_and_incremental(tmp_path, clips):
    clean = tmp_path / "clean"
    _write_video_data(clean, clips, GOOD)
    run_snakemake(clean, _video_config(clean))

    work = tmp_path / "work"
    _write_video_data(work, clips, GOOD)
    config = _video_config(work)
    first = "results/video_frames/train/000-of-002.pkl"
    run_snakemake(work, config, first)  # an interrupted run: one shard finished
    done = work / first
    mtime = done.stat().st_mtime_ns
    run_snakemake(work, config)
    assert done.stat().st_mtime_ns == mtime  # not redone
    a, b = _load_pkls(clean), _load_pkls(work)
    assert sorted(a) == sorted(b)
    for clip_id in a:
        np.testing.assert_array_equal(a[clip_id]["frames"], b[clip_id]["frames"])

    # adding pairs reruns only the shards the new clips land in
    before = {p: p.stat().st_mtime_ns for p in (work / "results" / "video_frames").glob("*/*.pkl")}
    pairs = json.loads((work / "data" / "train_pairs.json").read_text())
    for name in ["plain-new1", "odd-new2"]:
        (work / "data" / "clips" / f"{name}.mp4").write_bytes(clips[name.split("-")[0]].read_bytes())
        pairs.append({"clip": f"{name}.mp4", "text": f"pair {name}"})
    (work / "data" / "train_pairs.json").write_text(json.dumps(pairs))
    expected = set()
    for name in ["plain-new1", "odd-new2"]:
        split = split_of(name, 3, "train_val", 0.3)
        count = {"train": 2, "val": 1}[split]
        expected.add(f"{split}/{shard_of(name, count):03d}-of-{count:03d}.pkl")
    run_snakemake(work, config)
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = {f"{p.parent.name}/{p.name}" for p in before if after[p] != before[p]}
    assert changed == expected
    assert {"plain-new1", "odd-new2"} <= set(_load_pkls(work))
