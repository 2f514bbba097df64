"""Video probing, constant-frame-rate decoding and H.264/AAC MP4 encoding (PyAV / FFmpeg).

The product's time base is 25 fps video (``avatar/timebase.py``). Sources come at 30, 29.97,
24 fps or a variable frame rate; :func:`iter_video_frames` resamples them by presentation timestamp
so that output frame ``i`` shows the source frame on screen at ``t = i / fps`` seconds, one frame at
a time (a 5-minute clip is never held in RAM).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from avatar.errors import InvalidInput, InvalidMedia

log = logging.getLogger(__name__)

#: a decoded video stream may end this much earlier than its declared duration before the file is
#: considered truncated (container durations are rounded; the last frame's own duration is unknown)
_TRUNCATION_TOLERANCE_S = 0.25


@dataclass
class MediaInfo:
    """What :func:`probe` learns about a media file without decoding it all.

    Attributes:
        path: the probed file.
        container: FFmpeg demuxer name, e.g. ``"mov,mp4,m4a,3gp,3g2,mj2"`` or ``"wav"``.
        duration_s: container duration in seconds (longest stream).
        has_video / has_audio: whether a video / audio stream exists.
        fps: average source frame rate in Hz (None without video).
        width, height: displayed frame size in pixels (None without video), i.e. after the
            display rotation of phone videos, as :func:`iter_video_frames` yields them.
        n_frames: estimated number of source video frames (None without video).
        audio_rate: audio sample rate in Hz (None without audio).
        audio_channels: number of audio channels (None without audio).
        video_duration_s: duration of the video stream alone in seconds (None without video); this
            is what :func:`count_resampled_frames` uses, since audio may run longer than video.
    """

    path: str
    container: str
    duration_s: float
    has_video: bool
    has_audio: bool
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    n_frames: int | None = None
    audio_rate: int | None = None
    audio_channels: int | None = None
    video_duration_s: float | None = None


def _open(path: str | Path) -> av.container.InputContainer:
    """Open ``path`` for reading; every failure becomes :class:`InvalidMedia` naming the file."""
    path = Path(path)
    if not path.exists():
        raise InvalidMedia(f"{path}: file not found; check the path")
    if path.is_dir():
        raise InvalidMedia(f"{path}: is a directory, not a media file; pass a video or audio file")
    if path.stat().st_size == 0:
        raise InvalidMedia(f"{path}: file is empty (0 bytes); re-export or re-download it")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InvalidMedia(
            f"{path}: not a readable media file or truncated/corrupt ({e}); "
            "re-export it as MP4 (H.264/AAC) or WAV and try again"
        ) from e


def _stream_duration_s(stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    return None


def probe(path: str | Path) -> MediaInfo:
    """Read container/stream metadata and check that the file decodes to its end.

    The check decodes the first video/audio frame and the frames after a seek to ~1 s before the
    end, so truncated files whose index survived (e.g. "faststart" MP4s cut short) are caught here
    rather than deep inside a pipeline stage; cost is independent of the clip length.

    Args:
        path: any file FFmpeg can demux (mp4, mov, mkv, webm, wav, mp3, m4a, ...).

    Returns:
        :class:`MediaInfo`.

    Raises:
        InvalidMedia: the file is missing, empty, a directory, not a media file, has no audio or
            video stream, or is truncated/corrupt (decoding errors).
    """
    path = Path(path)
    with _open(path) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        if v is None and a is None:
            raise InvalidMedia(f"{path}: contains neither a video nor an audio stream; pass a video or audio file")
        duration = float(c.duration / av.time_base) if c.duration else 0.0
        info = MediaInfo(
            path=str(path),
            container=c.format.name,
            duration_s=duration,
            has_video=v is not None,
            has_audio=a is not None,
        )
        if v is not None:
            rate = v.average_rate or v.guessed_rate or v.base_rate
            info.fps = float(rate) if rate else None
            info.width, info.height = int(v.codec_context.width), int(v.codec_context.height)
            info.video_duration_s = _stream_duration_s(v) or duration
            if v.frames:
                info.n_frames = int(v.frames)
            elif info.fps:
                info.n_frames = int(round(info.video_duration_s * info.fps))
            if not info.width or not info.height:
                raise InvalidMedia(f"{path}: video stream has no frame size; the file is corrupt, re-export it")
        if a is not None:
            info.audio_rate = int(a.codec_context.sample_rate or a.rate or 0) or None
            info.audio_channels = int(a.codec_context.channels) if a.codec_context.channels else None
        if not info.duration_s:
            info.duration_s = max(info.video_duration_s or 0.0, _stream_duration_s(a) or 0.0) if a or v else 0.0
        _check_decodes(c, path, info)
    return info


def _indexed(c) -> bool:
    """Whether the container declares stream durations from an index/header (MP4/MOV, Matroska/
    WebM, WAV), so a stream ending early means truncation. Raw MP3/AAC/OGG durations are estimated
    from the bitrate and may be off by seconds, so they are not checked."""
    names = set(c.format.name.split(","))
    return bool(names & {"mov", "mp4", "matroska", "webm", "wav", "avi"})


def _check_decodes(c, path: Path, info: MediaInfo) -> None:
    """Decode the head and the tail of each stream; raise InvalidMedia on errors or a missing tail."""
    for stream in c.streams.video[:1] + c.streams.audio[:1]:
        kind = stream.type
        end = _stream_duration_s(stream) or info.duration_s
        try:
            got_head = False
            for frame in c.decode(stream):
                got_head = True
                if kind == "video" and int(round(frame.rotation or 0)) % 180 == 90:
                    info.width, info.height = info.height, info.width  # report the displayed size
                break
            if not got_head:
                raise InvalidMedia(
                    f"{path}: the {kind} stream has no decodable frames; the file is corrupt, re-export it"
                )
            if end > 2.0 and stream.time_base and _indexed(c):
                target = int((end - 1.0) / stream.time_base) + (stream.start_time or 0)
                c.seek(target, stream=stream, backward=True, any_frame=False)
                last_t = None
                for frame in c.decode(stream):
                    if frame.time is not None:
                        last_t = frame.time
                start = float((stream.start_time or 0) * stream.time_base)
                if last_t is None or last_t - start < end - 0.5:
                    raise InvalidMedia(
                        f"{path}: the {kind} stream stops before its declared end ({end:.2f} s); the file "
                        "is truncated, copy or download it again"
                    )
            c.seek(0)
        except av.FFmpegError as e:
            raise InvalidMedia(f"{path}: {kind} stream fails to decode ({e}); the file is corrupt, re-export it") from e


def count_resampled_frames(info: MediaInfo, fps: float = 25) -> int:
    """Number of frames :func:`iter_video_frames` yields: ``round(video_duration_s * fps)``.

    Raises:
        InvalidMedia: ``info`` has no video stream.
    """
    if not info.has_video:
        raise InvalidMedia(f"{info.path}: has no video stream; pass a video file")
    duration = info.video_duration_s if info.video_duration_s else info.duration_s
    return int(round(duration * fps))


def _crop_resize(img: np.ndarray, crop: tuple[int, int, int] | None, size: int | tuple[int, int] | None) -> np.ndarray:
    if crop is not None:
        x0, y0, side = (int(v) for v in crop)
        h, w = img.shape[:2]
        if x0 >= 0 and y0 >= 0 and x0 + side <= w and y0 + side <= h:
            img = img[y0 : y0 + side, x0 : x0 + side]
        else:  # part of the square lies outside the frame: fill it with black
            out = np.zeros((side, side, 3), np.uint8)
            sx0, sy0 = max(x0, 0), max(y0, 0)
            sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
            if sx1 > sx0 and sy1 > sy0:
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
            img = out
    if size is not None:
        wh = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
        if (img.shape[1], img.shape[0]) != wh:
            img = cv2.resize(img, wh, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """Decoded frame -> uint8 RGB [H, W, 3], upright (the display-matrix rotation of phone videos
    is applied; ``frame.rotation`` is in degrees counter-clockwise)."""
    img = frame.to_ndarray(format="rgb24")
    k = int(round((frame.rotation or 0) / 90)) % 4
    return np.rot90(img, k) if k else img


def iter_video_frames(
    path: str | Path,
    fps: float = 25,
    crop: tuple[int, int, int] | None = None,
    size: int | tuple[int, int] | None = None,
) -> Iterator[np.ndarray]:
    """Decode a video resampled to a constant ``fps`` by presentation timestamp.

    Output frame ``i`` is the source frame displayed at ``t = i / fps`` seconds after the first
    frame's timestamp (the latest source frame with ``pts <= t``, with a 1 ms tolerance). Works for
    any constant (30, 29.97, 24, 25) or variable source frame rate: frames are dropped or repeated as
    needed. Exactly :func:`count_resampled_frames` frames are yielded; if the stream ends early the
    file is truncated and :class:`InvalidMedia` is raised, except within 0.25 s of the declared end,
    where the last frame is repeated. Frames are decoded one at a time (bounded memory); source
    frames that are never shown are not converted to RGB.

    Args:
        path: video file.
        fps: output frame rate in Hz.
        crop: optional square ``(x0, y0, side)`` in source pixels, applied first; parts of the square
            outside the image are filled with black (0, 0, 0).
        size: optional output size in pixels (``int`` for square, or ``(W, H)``), resized with
            ``cv2.INTER_AREA`` after cropping.

    Yields:
        uint8 RGB frames ``[H, W, 3]``.

    Raises:
        InvalidMedia: missing/unreadable file, no video stream, decoding errors, truncated file.
        InvalidInput: ``fps <= 0`` or a non-positive crop side.
    """
    if not fps or fps <= 0:
        raise InvalidInput(f"fps must be > 0, got {fps}")
    if crop is not None and int(crop[2]) <= 0:
        raise InvalidInput(f"crop side must be > 0 pixels, got crop={crop}")
    info = probe(path)
    if not info.has_video:
        raise InvalidMedia(f"{path}: has no video stream; pass a video file")
    n_out = count_resampled_frames(info, fps)
    step = Fraction(fps).limit_denominator(1_000_000)
    eps = 1e-3
    with _open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = None
        prev_frame = None
        prev_img = None  # RGB of prev_frame after crop/resize, computed lazily
        i = 0
        try:
            for frame in c.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if t0 is None:
                    t0 = t
                t -= t0
                # emit output frames i whose time i/fps falls before this source frame
                while i < n_out and float(i / step) < t - eps:
                    if prev_frame is None:  # before the first frame: show the first frame
                        break
                    if prev_img is None:
                        prev_img = _crop_resize(_to_rgb(prev_frame), crop, size)
                    yield prev_img
                    i += 1
                if i >= n_out:
                    break
                prev_frame, prev_img = frame, None
        except av.FFmpegError as e:
            raise InvalidMedia(
                f"{path}: video fails to decode at output frame {i} ({e}); the file is corrupt, re-export it"
            ) from e
        if prev_frame is None:
            raise InvalidMedia(f"{path}: the video stream has no decodable frames; the file is corrupt, re-export it")
        last_t = float(prev_frame.pts * stream.time_base) - (t0 or 0.0)
        src_dt = 1.0 / info.fps if info.fps else 0.04
        missing_s = (n_out / fps) - (last_t + src_dt)
        if i < n_out and missing_s > _TRUNCATION_TOLERANCE_S:
            raise InvalidMedia(
                f"{path}: video ends at {last_t + src_dt:.2f} s but declares {n_out / fps:.2f} s; "
                "the file is truncated, copy or download it again"
            )
        while i < n_out:
            if prev_img is None:
                prev_img = _crop_resize(_to_rgb(prev_frame), crop, size)
            yield prev_img
            i += 1


class VideoWriter:
    """Write RGB frames as an H.264 (libx264, yuv420p) MP4 with optional AAC audio muxed in.

    Used as a context manager; the file is written to a hidden temp file beside ``path`` and
    renamed to ``path`` only when the ``with`` block exits without an exception, so an error never
    leaves a partial MP4 at ``path``. The MP4 is "faststart" (index first: streams over HTTP).

    Audio (float32 ``[T]`` mono or ``[C, T]`` with C = 1 or 2 channels, in [-1, 1] at ``audio_rate`` Hz) is interleaved with the video as
    frames are written and the rest is flushed on close; all of it is written, so the audio may run
    longer than the video if it is longer than ``n_frames / fps``.

    Args:
        path: output ``.mp4`` path (parent directories are created).
        fps: frame rate in Hz.
        size: ``(W, H)`` in pixels, both even (yuv420p).
        audio: optional waveform to mux.
        audio_rate: its sample rate in Hz.
        crf: x264 constant rate factor (0 lossless .. 51 worst; 18-23 is visually good).

    Attributes:
        n_frames: frames written so far.

    Raises:
        InvalidInput: odd/non-positive size, a frame of the wrong shape/dtype, bad audio array.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float = 25,
        size: tuple[int, int] = (512, 512),
        audio: np.ndarray | None = None,
        audio_rate: int = 16000,
        crf: int = 20,
    ):
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0 or w % 2 or h % 2:
            raise InvalidInput(f"video size must be positive and even (yuv420p), got {w}x{h}")
        if not fps or fps <= 0:
            raise InvalidInput(f"fps must be > 0, got {fps}")
        if audio is not None:
            audio = np.asarray(audio)
            audio = audio[None] if audio.ndim == 1 else audio
            if audio.ndim != 2 or audio.shape[0] not in (1, 2) or not np.issubdtype(audio.dtype, np.floating):
                raise InvalidInput(
                    f"audio must be a float array [T] or [channels (1 or 2), T], got {audio.dtype} {audio.shape}"
                )
            audio = np.clip(audio.astype(np.float32), -1.0, 1.0)
        self.path = Path(path)
        self.fps = fps
        self.size = (w, h)
        self.audio = audio
        self.audio_rate = int(audio_rate)
        self.crf = int(crf)
        self.n_frames = 0
        self._audio_pos = 0
        self._container = None
        self._tmp: Path | None = None

    def __enter__(self) -> "VideoWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.{os.getpid()}.", suffix=".tmp.mp4", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
        rate = Fraction(self.fps).limit_denominator(1001 * 1000)
        self._vstream = self._container.add_stream("libx264", rate=rate)
        self._vstream.width, self._vstream.height = self.size
        self._vstream.pix_fmt = "yuv420p"
        self._vstream.options = {"crf": str(self.crf)}
        self._astream = None
        if self.audio is not None and self.audio.shape[1]:
            self._astream = self._container.add_stream("aac", rate=self.audio_rate)
            self._astream.layout = "mono" if len(self.audio) == 1 else "stereo"
        return self

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 RGB frame ``[H, W, 3]`` (H, W as given by ``size``).

        Raises:
            InvalidInput: wrong shape or dtype.
        """
        if self._container is None:
            raise InvalidInput("VideoWriter.write called outside its `with` block")
        frame = np.asarray(frame)
        w, h = self.size
        if frame.dtype != np.uint8 or frame.shape != (h, w, 3):
            raise InvalidInput(f"frame must be uint8 [{h}, {w}, 3] RGB, got {frame.dtype} {list(frame.shape)}")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self.n_frames
        for packet in self._vstream.encode(vf):
            self._container.mux(packet)
        self.n_frames += 1
        self._write_audio(int(round(self.n_frames / self.fps * self.audio_rate)))

    def _write_audio(self, until: int | None) -> None:
        if self._astream is None:
            return
        n = self.audio.shape[1]
        end = n if until is None else min(until, n)
        block = 4096
        while self._audio_pos < end:
            stop = min(end, self._audio_pos + block)
            chunk = np.ascontiguousarray(self.audio[:, self._audio_pos : stop])
            af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._astream.layout.name)
            af.sample_rate = self.audio_rate
            af.pts = self._audio_pos
            af.time_base = Fraction(1, self.audio_rate)
            for packet in self._astream.encode(af):
                self._container.mux(packet)
            self._audio_pos = stop

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.n_frames == 0:
                    raise InvalidInput(f"{self.path}: no frames were written; nothing to save")
                self._write_audio(None)
                for packet in self._vstream.encode(None):
                    self._container.mux(packet)
                if self._astream is not None:
                    for packet in self._astream.encode(None):
                        self._container.mux(packet)
            self._container.close()
            self._container = None
            if exc_type is None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
                os.replace(self._tmp, self.path)
        finally:
            if self._container is not None:
                try:
                    self._container.close()
                except av.FFmpegError:
                    pass
                self._container = None
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()
