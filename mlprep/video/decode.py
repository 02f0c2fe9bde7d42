"""Frame sampling and decoding: probe the stream, pick uniformly spaced frames, decode only those.

The probe demuxes the stream without decoding it (cheap) to learn each frame's timestamp and the
keyframes. Frame i means the i-th frame in presentation order, for every backend. When a backend
cannot deliver a frame the container lists (a truncated or corrupt tail: the container
over-reports its frame count), the frames that do decode are counted and the sample is redrawn
over them, so a clip still yields exactly `num_frames` frames, and its record says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import av
import cv2
import numpy as np

from mlprep.failures import ItemError

BACKENDS = ("decord", "pyav", "ffmpeg")
IDENTITY = (1, 0, 0, 1)


class ClipError(ItemError):
    """A clip that cannot give frames (not a video, no video stream, empty window, nothing decodes)."""


class ShortStreamError(ItemError):
    """The stream ended (or broke) before a frame the container lists."""

    def __init__(self, message: str):
        super().__init__("truncated", message)


@dataclass(frozen=True)
class StreamInfo:
    pts: np.ndarray  # presentation timestamps of the frames, sorted
    keyframe_pts: np.ndarray
    time_base: float
    fps: float
    width: int
    height: int
    container_frames: int  # what the container header claims (0 when it does not say)
    pix_fmt: str = ""  # the stream's own pixel format (what a CPU decoder gives), '' when not known
    display: tuple[int, int, int, int] = IDENTITY  # how the file says to show its frames (display_matrix)
    by_count: bool = False  # the stamps are in decoding order (AVI): frame i is the decoder's i-th frame out

    @property
    def n_frames(self) -> int:
        return len(self.pts)

    def seconds(self) -> np.ndarray:
        return (self.pts - self.pts[0]) * self.time_base if len(self.pts) else np.zeros(0)

    def truncated(self, n: int) -> StreamInfo:
        pts = self.pts[:n]
        return dataclasses.replace(self, pts=pts, keyframe_pts=self.keyframe_pts[self.keyframe_pts <= pts[-1]])


@dataclass
class ClipFrames:
    frames: np.ndarray  # uint8 [num_frames, height, width, 3] RGB
    indices: list[int]  # source frame index of each frame
    fps: float
    duration: float  # seconds covered by the sampled window
    source_frames: int  # frames that actually decode in the window's stream
    container_frames: int
    repeated: bool  # fewer source frames than num_frames: some repeat
    note: str = ""


def _container_kind(path) -> str | None:
    """The container a file's first bytes announce (MP4/MOV, Matroska/WebM, AVI, MPEG-TS: the transport stream's
    sync byte every 188 bytes, or 192 in M2TS; MPEG-PS: the program stream's pack header), if any."""
    with open(path, "rb") as handle:
        head = handle.read(4 + 3 * 192)
    if head[4:8] == b"ftyp":
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    for offset, stride in ((0, 188), (4, 192)):
        if len(head) > offset + 2 * stride and all(head[offset + k * stride] == 0x47 for k in range(3)):
            return "MPEG-TS"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG-PS"
    return None


def probe(path) -> StreamInfo:
    try:
        container = av.open(str(path))
    except FileNotFoundError as err:
        raise ClipError("missing", "clip file not found") from err
    except av.FFmpegError as err:
        kind = _container_kind(path)
        if kind:  # the header is right but the rest cannot be read: a download or copy cut short
            raise ClipError("truncated", f"starts as {kind} but cannot be read (cut short?): {err}") from err
        raise ClipError("not_a_video", f"not a readable video: {err}") from err
    with container:
        if not container.streams.video:
            raise ClipError("no_video_stream", "no video stream")
        stream = container.streams.video[0]
        pts, keys, in_order, first_key = [], [], True, None
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0 or stamp is None:
                    continue
                if not packet.is_discard:  # (an edit list's cut: decoded to reach the frames shown, never shown)
                    in_order = in_order and (not pts or stamp > pts[-1])
                    pts.append(stamp)
                if packet.is_keyframe:  # a seek may need one that is cut
                    keys.append(stamp)
                    first_key = first_key or packet
        except av.FFmpegError:
            pass  # a broken tail: keep the packets read so far
        if not pts:
            raise ClipError("no_frames", "video stream holds no frames")
        rate = stream.average_rate or stream.guessed_rate
        time_base = float(stream.time_base)
        pts_sorted = np.unique(np.asarray(pts, dtype=np.int64))
        fps = float(rate) if rate else (len(pts_sorted) - 1) / max((pts_sorted[-1] - pts_sorted[0]) * time_base, 1e-9)
        # AVI has no presentation times: where the decoder reorders frames but their stamps rise in decoding order,
        # the stamps carry the order the frames were stored in, not shown in, and the frames are placed by count.
        # (Elsewhere a stream may declare reordering it does not use; its stamps are presentation times.)
        by_count = bool(container.format.name == "avi" and in_order and stream.codec_context.has_b_frames)
        return StreamInfo(pts_sorted, np.unique(np.asarray(keys or pts[:1], dtype=np.int64)), time_base, fps,
                          stream.codec_context.width, stream.codec_context.height, int(stream.frames or 0),
                          stream.codec_context.pix_fmt or "", _keyframe_facts(stream, first_key)[0], by_count)


def display_matrix(frame) -> tuple[int, int, int, int]:
    """The orientation a decoded frame's display matrix gives (phone clips recorded upright are stored on their side
    with a matrix that turns them): FFmpeg's matrix shows the pixel at (x, y) at (a x + c y, b x + d y); here its
    (a, b, c, d) as signs. Only turns by right angles and mirrorings are kept; the identity where the frame has no
    matrix or another angle (which would need the frame cut or filled)."""
    for data in frame.side_data:
        if data.type.name == "DISPLAYMATRIX":
            a, b, _, c, d = np.frombuffer(bytes(data), np.int32)[:5]
            signs = tuple(int(np.sign(v)) for v in (a, b, c, d))
            a, b, c, d = signs
            if (a and d and not b and not c) or (b and c and not a and not d):
                return signs
    return IDENTITY


def _first_keyframe(container, stream) -> tuple[tuple[int, int, int, int], bool]:
    """(display_matrix of the stream's first keyframe, whether an edit list cuts that keyframe): the keyframe
    decoded on one thread by the container's own decoder (the matrix comes with the stream's parameters, or in
    H.264/HEVC with the bitstream; a kept decoder sees only the latter). The identity where it does not decode."""
    try:
        packet = next((p for p in container.demux(stream) if p.is_keyframe and p.size), None)
    except Exception:  # noqa: BLE001 - a stream that will not say: the reads that follow report what is wrong
        packet = None
    return _keyframe_facts(stream, packet)


def _keyframe_facts(stream, packet) -> tuple[tuple[int, int, int, int], bool]:
    """_first_keyframe's answer from the keyframe `packet` (the probe keeps the first one it demuxes)."""
    if packet is None:
        return IDENTITY, False
    try:
        decoder = stream.codec_context
        decoder.thread_count = 1
        cut = packet.is_discard  # (the decoder drops a cut packet's frame, matrix and all: a bare copy)
        frames = [*decoder.decode(av.Packet(bytes(packet)) if cut else packet), *decoder.decode(None)]
        return (display_matrix(frames[0]) if frames else IDENTITY), cut
    except Exception:  # noqa: BLE001 - a stream that will not say: the reads that follow report what is wrong
        return IDENTITY, False


def upright(frames: np.ndarray, display: tuple[int, int, int, int]) -> np.ndarray:
    """[n, H, W, 3] frames as decoded, turned and mirrored as their display matrix says to show them (what
    ffmpeg's own autorotation gives; checked against it)."""
    if display == IDENTITY:
        return frames
    a, b, c, d = display
    if a == 0:  # x shown along y and y along x: transposed
        frames, flip_rows, flip_columns = frames.swapaxes(1, 2), b < 0, c < 0
    else:
        flip_rows, flip_columns = d < 0, a < 0
    return np.ascontiguousarray(frames[:, ::-1 if flip_rows else 1, ::-1 if flip_columns else 1])


def decord_turns(display: tuple[int, int, int, int]) -> int:
    """Quarter turns anticlockwise decord gives a clip of this display matrix: it applies the matrix's rotation
    angle (FFmpeg's av_display_rotation_get) and ignores a mirroring."""
    a, b, _, _ = display
    return round(-math.degrees(math.atan2(b, a)) / 90) % 4


def frame_window(info: StreamInfo, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last frame index whose time lies in [start, end) (the whole clip by default)."""
    seconds = info.seconds()
    first = 0 if start is None else int(np.searchsorted(seconds, start, "left"))
    last = info.n_frames - 1 if end is None else int(np.searchsorted(seconds, end, "left")) - 1
    if first > last:
        raise ClipError("empty_window", f"window [{start}, {end}) s holds no frames (clip lasts {seconds[-1]:.2f} s)")
    return first, last


def uniform_indices(first: int, last: int, num_frames: int) -> np.ndarray:
    """num_frames indices spread evenly from first to last inclusive; they repeat when the window is short."""
    return np.linspace(first, last, num_frames).astype(np.int64)


def ffmpeg_exe() -> str:
    """The ffmpeg binary: $MLPREP_FFMPEG, else one on PATH, else the one imageio-ffmpeg ships."""
    found = os.environ.get("MLPREP_FFMPEG") or shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def decord_misplaces(kind: str | None) -> str | None:
    """Why decord must not read a clip of this container kind (_container_kind), or None: in MPEG-TS (and M2TS)
    and MPEG-PS files its seeks land a GOP late and it fills the gap with copies of the frames nearest, so frame i
    comes back as a later frame, or the last one, with only a log line to say so (every sampled frame of a 3 s
    H.264 clip, measured)."""
    return f"decord misplaces frames in {kind}" if kind in ("MPEG-TS", "MPEG-PS") else None


def decord_display(path, kind: str | None) -> tuple[tuple[int, int, int, int], str | None]:
    """(the display matrix of a clip decord reads, why decord must not read it or None), read by PyAV from MP4/MOV
    and Matroska files, the containers with a matrix and edit lists of their own: decord turns its frames itself
    but says nothing of the matrix, and it shows the frames an edit list cuts (a clip cut from a longer one
    without re-encoding starts with the cut part of its first GOP: 33 frames of 117 in a test), so every frame
    index after them would be off."""
    if kind not in ("MP4/MOV", "Matroska/WebM"):
        return IDENTITY, None
    try:
        with av.open(str(path)) as container:
            display, cut = _first_keyframe(container, container.streams.video[0])
    except (av.FFmpegError, IndexError):  # (decord read it: a broken header is its to report)
        return IDENTITY, None
    return display, "decord shows the frames an edit list cuts" if cut else None


class DecordMisplaces(RuntimeError):
    """decord would give other frames than asked for: the clip is read with PyAV, and its note says why."""


def open_decord(path, threads: int = 1):
    """A decord reader and the stream facts it knows (timestamps, keyframes) without a separate probe."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
    n = len(reader)
    if n == 0:
        raise ClipError("no_frames", "video stream holds no frames")
    seconds = reader.get_frame_timestamp(range(n))[:, 0]
    if not (np.isfinite(seconds).all() and (np.diff(seconds) > 0).all() and abs(seconds[0]) < 1e6):
        # (H.264 in AVI: every frame at -3.7e17 s, and frames sampled by index came back misplaced, 12 of 16)
        raise DecordMisplaces("decord does not know where this clip's frames are")
    micro = np.round(seconds * 1e6).astype(np.int64)
    keys = micro[np.asarray(reader.get_key_indices(), dtype=np.int64)] if n else micro[:1]
    info = StreamInfo(micro, np.unique(keys), 1e-6, float(reader.get_avg_fps()), 0, 0, n)
    return reader, info


def read_decord(path, indices: np.ndarray, info: StreamInfo, threads: int = 1, hwaccel=None, reader=None):
    if reader is None:
        reader, _ = open_decord(path, threads)
    if int(indices[-1]) >= len(reader):
        raise ShortStreamError(f"decord sees {len(reader)} frames, frame {int(indices[-1])} wanted")
    return reader.get_batch([int(i) for i in indices]).asnumpy()


class NoGpuDecoder(RuntimeError):
    """The GPU decoder could not start at all here (no GPU, no driver): not a fault of the clip."""


class NvdecRefused(RuntimeError):
    """A stream that NVDEC is not used for here: its clip is decoded on the CPU, and its note says why."""


# Codecs whose decoder needs nothing from the container but the extradata (all else is in the bitstream), so that
# one decoder can take the packets of any clip of the same kind: the codecs NVDEC decodes in today's data sets.
# (MPEG-4 part 2 is not among them: its decoder reads the container's codec tag to work around old encoders.)
# Named as FFmpeg names the format (`canonical_name`), not the decoder: AV1's decoder is libdav1d.
REUSABLE_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})


def _device_settings(hwaccel: str):
    from av.codec.hwaccel import HWAccel

    # is_hw_owned: decoded frames stay in GPU memory (the many a sample skips never leave it; a wanted one is copied
    # to the host by rgb_frame's reformat); it implies the GPU's primary CUDA context (the one torch uses) instead of
    # a context of the decoder's own. No software fallback: a stream NVDEC refuses must say so, not decode on the
    # CPU unannounced.
    return HWAccel(device_type=hwaccel, allow_software_fallback=False, is_hw_owned=True)


def device_codec(codec, hwaccel: str | None):
    """The decoder of `codec`'s format that decodes on `hwaccel`: the stream's own where it can, else FFmpeg's native
    decoder of the same format (AV1: libdav1d, the decoder PyAV picks, is CPU-only; FFmpeg's `av1` drives NVDEC)."""
    if not hwaccel or any(c.device_type.name == hwaccel for c in codec.hardware_configs):
        return codec
    native = av.Codec(codec.canonical_name, "r")
    return native if any(c.device_type.name == hwaccel for c in native.hardware_configs) else codec


@contextmanager
def clip_container(path, hwaccel: str | None = None):
    """The clip's container, for demuxing. Asked for a device, a clip of a codec outside REUSABLE_CODECS is opened
    again with it, so that the container's own decoder, made for this clip, decodes on the device (MPEG-2, MPEG-4
    part 2, VC-1: a device context and a decoder for each such clip, as all clips had before decoders were kept)."""
    container = av.open(str(path))
    try:
        codec = container.streams.video[0].codec_context.codec
        if hwaccel and codec.canonical_name not in REUSABLE_CODECS:
            container.close()
            try:
                container = av.open(str(path), hwaccel=_device_settings(hwaccel))
            except av.FFmpegError as err:
                raise NoGpuDecoder(f"PyAV cannot open a {hwaccel} device: {err}") from err
            except RuntimeError as err:  # PyAV: "no stream is compatible" with the device
                raise NvdecRefused(f"{codec.name} has no {hwaccel} decoder here") from err
        yield container
    finally:
        container.close()


class KeptDecoders:
    """The PyAV decoders this process keeps between clips, the last `size` kinds of stream it decoded (a kind: the
    codec, its extradata, the codec threads and the hardware device): a clip of a kind seen before is decoded by
    the same decoder, flushed, instead of one opened for it. On NVDEC that keeps one CUDA context and one hardware
    decoder for a lane's clips: a decoder opened per clip retained the GPU's context (created anew whenever no other
    decoder of the process held it) and made an NVDEC session for each, every clip. A decoder whose clip raised is
    dropped, not reused. Kept decoders hold their frame pools (a 1080p H.264 CPU decoder 10-25 MB), hence a small
    `size`."""

    def __init__(self, size: int = 2):
        self.size = size
        self.opened = 0  # decoders opened by this process (a test reads it)
        self._kept: OrderedDict[tuple, av.codec.CodecContext] = OrderedDict()

    @contextmanager
    def decoder(self, stream, threads: int, hwaccel: str | None):
        """A decoder for `stream`'s packets: a kept one of its kind, flushed, or a new one; kept again afterwards
        unless the block raised. A stream of a codec outside REUSABLE_CODECS is decoded by the container's own
        decoder (on the device when clip_container opened the container with it)."""
        params = stream.codec_context
        if params.codec.canonical_name not in REUSABLE_CODECS:
            params.thread_count = threads
            yield params
            return
        codec = device_codec(params.codec, hwaccel)
        key = (codec.name, bytes(params.extradata or b""), threads, hwaccel)
        context = self._kept.pop(key, None)
        if context is None:
            context = self._open(codec, params.extradata, threads, hwaccel)
        yield context
        context.flush_buffers()
        self._kept[key] = context
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def _open(self, codec, extradata, threads: int, hwaccel: str | None):
        try:
            context = av.CodecContext.create(codec, "r", hwaccel=_device_settings(hwaccel) if hwaccel else None)
        except av.FFmpegError as err:
            raise NoGpuDecoder(f"PyAV cannot open a {hwaccel} device: {err}") from err
        if hwaccel and not context.is_hwaccel:  # PyAV makes a CPU decoder where the format has none for the device
            raise NvdecRefused(f"{codec.name} has no {hwaccel} decoder here")
        if extradata:
            context.extradata = extradata
        context.thread_count = threads
        self.opened += 1
        return context


KEPT_DECODERS = KeptDecoders()


def _decoded(container, stream, decoder):
    """`decoder`'s frames of the stream's packets from the container's position on (flushed at its end)."""
    for packet in container.demux(stream):
        yield from decoder.decode(packet)


def _frames_from(container, stream, decoder, info: StreamInfo, keyframe: int, target: int, back: int = 0):
    """The decoder's frames from the keyframe `keyframe` (at or before `target`) on. Demuxers seek by decoding
    timestamps, and some only roughly: MPEG-TS lands on the keyframe after the one asked for when asked for its
    presentation time (its decoding time is a few frames earlier), or past the end, which skipped the frames wanted.
    A seek that gives no frame at or before `target` is made again from earlier and earlier, down to before the
    stream's start. Returns the frames and how far before the keyframe the seek that gave them asked: the clip's
    next seek starts there (`back`), and lands at once."""
    step = int(info.pts[1] - info.pts[0]) if info.n_frames > 1 else 1
    while True:
        container.seek(keyframe - back, stream=stream, backward=True, any_frame=False)
        decoder.flush_buffers()
        frames = _decoded(container, stream, decoder)
        first = next(frames, None)
        landed = first is not None and (first.pts is None or first.pts <= target)
        if landed or keyframe - back < info.pts[0]:
            return (frames if first is None else itertools.chain([first], frames)), back
        back = max(2 * back, 4 * step)


def rgb_frame(frame, pix_fmt: str) -> np.ndarray:
    """A decoded frame as RGB through the one conversion every decoder shares: a frame that leaves its decoder in
    another layout than the stream's own (NVDEC hands back nv12 / p010) is first re-laid out in the stream's
    format (a lossless move of the same samples), then converted to RGB as the CPU decoder's frames are. FFmpeg's
    direct nv12 -> RGB conversion interpolates chroma differently (up to 81 levels apart on the demo's clips)."""
    if pix_fmt and frame.format.name != pix_fmt:
        frame = frame.reformat(format=pix_fmt)
    return frame.to_ndarray(format="rgb24")


def read_pyav(path, indices: np.ndarray, info: StreamInfo, threads: int = 1, hwaccel=None, reader=None):
    """Seek to the keyframe before each wanted frame only when that is ahead of the decoder: exact and minimal.
    The container only demuxes; the decoder is the process's kept one for the stream's kind (KeptDecoders).
    `hwaccel='cuda'`: decoded on NVDEC, the frames left on the GPU but the wanted ones, which are copied to the
    host and converted as the CPU's (rgb_frame)."""
    out = []
    with clip_container(path, hwaccel) as container:
        stream = container.streams.video[0]
        with KEPT_DECODERS.decoder(stream, threads, hwaccel) as codec:
            if info.by_count:
                return _by_count(_decoded(container, stream, codec), indices, info.pix_fmt)
            decoder, position, back = None, None, 0
            for target in info.pts[indices]:
                keyframe = info.keyframe_pts[max(0, np.searchsorted(info.keyframe_pts, target, "right") - 1)]
                if decoder is None or position is None or position >= target or keyframe > position:
                    decoder, back = _frames_from(container, stream, codec, info, int(keyframe), int(target), back)
                found = None
                for frame in decoder:
                    position = frame.pts
                    if frame.pts is None or frame.pts < target:
                        continue
                    if frame.pts == target:
                        found = rgb_frame(frame, info.pix_fmt)
                    break
                if found is None:
                    raise ShortStreamError(f"frame at pts {int(target)} did not decode")
                out.append(found)
    return np.stack(out)


def _by_count(frames, indices: np.ndarray, pix_fmt: str) -> np.ndarray:
    """The frames `indices` of a stream whose stamps cannot place them (StreamInfo.by_count): decoded from the start,
    frame i being the decoder's i-th frame out, as ffmpeg counts them; no seeks, so the whole clip up to the last
    frame wanted is decoded (as the ffmpeg backend always does)."""
    wanted, found, count = set(int(i) for i in indices), {}, 0
    for count, frame in enumerate(frames, 1):
        if count - 1 in wanted:
            found[count - 1] = rgb_frame(frame, pix_fmt)
            if len(found) == len(wanted):
                return np.stack([found[int(i)] for i in indices])
    raise ShortStreamError(f"{count} frames decode, frame {max(wanted)} wanted")


def read_ffmpeg(path, indices: np.ndarray, info: StreamInfo, threads: int = 1, hwaccel=None, reader=None):
    """ffmpeg's select filter over an ffmpeg binary (`hwaccel='cuda'`: decoded on NVDEC, see read_nvdec)."""
    return _ffmpeg_frames(path, indices, info, threads, hwaccel)[0]


def as_stream_format(video, info: StreamInfo):
    """ffmpeg's frames in the stream's own pixel format before the conversion to RGB (see rgb_frame): NVDEC's
    frames come down as nv12; a CPU decoder's are in that format already, and ffmpeg adds no step for them."""
    return video.filter("format", info.pix_fmt) if info.pix_fmt else video


def _ffmpeg_frames(path, indices: np.ndarray, info: StreamInfo, threads: int, hwaccel: str | None):
    """(frames, ffmpeg's warnings) for the frames `indices`, decoded by an ffmpeg binary."""
    import ffmpeg

    select = "+".join(f"eq(n,{int(i)})" for i in indices)
    # noautorotate: frames as decoded, like every backend's (extract_clip turns them upright)
    source = ffmpeg.input(str(path), threads=threads, noautorotate=None, **({"hwaccel": hwaccel} if hwaccel else {}))
    stream = as_stream_format(source.video.filter("select", select), info).output(
        "pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough", threads=threads
    ).global_args("-loglevel", "warning")
    try:
        raw, err = stream.run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True, quiet=True)
    except ffmpeg.Error as err:
        stderr = err.stderr.decode(errors="replace")
        failure = ShortStreamError(f"ffmpeg failed: {stderr[-300:]}")
        failure.stderr = stderr
        raise failure from err
    frames = np.frombuffer(raw, np.uint8)
    count = len(frames) // (info.width * info.height * 3)
    if count != len(indices):
        raise ShortStreamError(f"ffmpeg gave {count} of {len(indices)} frames")
    return frames.reshape(count, info.height, info.width, 3), err.decode(errors="replace")


# ffmpeg's words when it cannot use the GPU at all (no driver, no device) or falls back to its CPU decoder
_NO_DEVICE = ("Cannot load libcuda", "Could not dynamically load CUDA", "Device creation failed",
              "No device available", "Hardware device setup failed")
_SOFTWARE_FALLBACK = ("Failed setup for format cuda", "hwaccel initialisation returned error",
                      "Hardware is lacking required capabilities", "Your platform doesn't support hardware")
_nvdec_missing: str | None = None  # set once NVDEC proved unavailable in this process: later clips skip it


def _first_line(text: str, words) -> str:
    """The first line of ffmpeg's log holding one of `words`, without its `[CUDA @ 0x...]` address prefix."""
    line = next((line for line in text.splitlines() if any(w in line for w in words)), "")
    return re.sub(r"\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*", "", line).strip()


def read_nvdec(path, indices: np.ndarray, info: StreamInfo, backend: str, threads: int = 1) -> tuple[np.ndarray, str]:
    """(frames, note): the frames decoded on NVDEC (PyAV's CUDA hwaccel, or ffmpeg's `-hwaccel cuda`), the same
    frames as the CPU decoders give (H.264/HEVC decoding is exact; NVDEC's nv12 frames are re-laid out in the
    stream's own format first, so the conversion to RGB is the CPU's, step for step). Where the GPU decoder
    refuses the stream, or there is no GPU, the clip is decoded on the CPU by the same backend and the note says
    so; a clip the CPU cannot decode either raises the CPU's error."""
    global _nvdec_missing
    read = READERS[backend]
    if _nvdec_missing is not None:
        return read(path, indices, info, threads=threads), f"NVDEC unavailable ({_nvdec_missing}); decoded on the CPU"
    try:
        if backend == "ffmpeg":
            frames, warnings = _ffmpeg_frames(path, indices, info, threads, "cuda")
            fallback = _first_line(warnings, _SOFTWARE_FALLBACK)
            return frames, f"NVDEC refused the stream ({fallback}); ffmpeg decoded it on the CPU" if fallback else ""
        return read(path, indices, info, threads=threads, hwaccel="cuda"), ""
    except Exception as err:  # noqa: BLE001 - which it was, the CPU decode below tells
        text = getattr(err, "stderr", None) or str(err)
        reason = _first_line(text, _NO_DEVICE + _SOFTWARE_FALLBACK) or _first_line(text, [""]) or type(err).__name__
        frames = read(path, indices, info, threads=threads)  # raises when the stream itself is broken
        if isinstance(err, NoGpuDecoder) or any(w in reason for w in _NO_DEVICE):
            _nvdec_missing = reason
            return frames, f"NVDEC unavailable ({reason}); decoded on the CPU"
        return frames, f"NVDEC refused the stream ({reason}); decoded on the CPU"


READERS = {"decord": read_decord, "pyav": read_pyav, "ffmpeg": read_ffmpeg}


def count_decodable(path) -> int:
    """Frames that decode, in order, until the first error (the slow path for broken clips)."""
    n = 0
    with av.open(str(path)) as container:
        try:
            for _ in container.decode(video=0):
                n += 1
        except av.FFmpegError:
            pass
    return n


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-averaging resize (no aliasing when shrinking), the same for every backend."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def extract_clip(
    path,
    num_frames: int,
    width: int,
    height: int,
    backend: str = "decord",
    start: float | None = None,
    end: float | None = None,
    threads: int = 1,
    hwaccel: str | None = None,
) -> ClipFrames:
    """Exactly num_frames uniformly spaced RGB frames of the clip (or its [start, end) window), resized."""
    cv2.setNumThreads(threads)
    reader, misplaced = None, None
    if backend == "decord":
        try:
            kind = _container_kind(path)
        except OSError:  # (the probe says what is wrong with the file)
            kind = None
        misplaced = decord_misplaces(kind)
    if backend == "decord" and not misplaced:
        display, misplaced = decord_display(path, kind)
    if backend == "decord" and not misplaced:
        try:
            reader, info = open_decord(path, threads)
            info = dataclasses.replace(info, display=display)
        except Exception as err:  # noqa: BLE001 - let PyAV say what is wrong, or take the slow path below
            reader, info = None, probe(path)
            misplaced = str(err) if isinstance(err, DecordMisplaces) else None
    else:
        info = probe(path)
    first, last = frame_window(info, start, end)
    indices = uniform_indices(first, last, num_frames)
    wanted = np.unique(indices)
    read, note = READERS[backend], ""
    if backend == "decord" and reader is None:  # PyAV probed it: read it with PyAV (same frames)
        read, note = read_pyav, f"{misplaced or 'decord cannot open the clip'}; frames read with PyAV"
    try:
        if hwaccel == "cuda":
            frames, note = read_nvdec(path, wanted, info, backend, threads)
        else:
            frames = read(path, wanted, info, threads=threads, hwaccel=hwaccel, reader=reader)
        if read is read_decord:  # decord turned them by the matrix's angle already (not mirroring): as decoded again
            frames = np.rot90(frames, -decord_turns(info.display), axes=(1, 2))
        frames = upright(frames, info.display)
        source = last - first + 1
    except Exception as err:  # noqa: BLE001 - any decoder error: see whether the tail is broken
        decodable = count_decodable(path)
        if reader is not None:  # decord's timestamps; the slow path below reads with PyAV's
            info = probe(path)
        if decodable >= info.n_frames:
            raise
        if decodable <= first:
            raise ClipError("truncated", f"only {decodable} frames decode, none in the window ({err})") from err
        last = min(last, decodable - 1)
        indices = uniform_indices(first, last, num_frames)
        wanted = np.unique(indices)
        frames = upright(read_pyav(path, wanted, info.truncated(decodable), threads=threads), info.display)
        source = last - first + 1
        note = f"container lists {info.n_frames} frames but {decodable} decode; sampled over those"
    frames = resize_frames(frames, width, height)[np.searchsorted(wanted, indices)]
    seconds = info.seconds()
    duration = float(seconds[last] - seconds[first] + 1 / info.fps) if info.fps else 0.0
    return ClipFrames(
        frames=np.ascontiguousarray(frames),
        indices=[int(i) for i in indices],
        fps=info.fps,
        duration=round(duration, 4),
        source_frames=int(source),
        container_frames=info.container_frames or info.n_frames,
        repeated=bool(source < num_frames),
        note=note,
    )
