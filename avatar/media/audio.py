"""Audio decoding and resampling to the product's time base: 16 kHz mono float32 in [-1, 1].

Any container/codec FFmpeg reads (wav, mp3, m4a/aac, flac, ogg, the audio track of an mp4/mov/mkv)
is decoded with PyAV, down-mixed to mono (mean of channels) and resampled with soxr ("HQ" preset)
in a streaming fashion, so memory stays bounded by the output size.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile
import soxr

from avatar.errors import InvalidInput, InvalidMedia, NoAudio, ResourceLimit
from avatar.media.video import _TRUNCATION_TOLERANCE_S, _indexed, _open, _stream_duration_s
from avatar.timebase import AUDIO_RATE


def _to_float(frame: av.AudioFrame, mono: bool = True) -> np.ndarray:
    """Decoded audio frame -> float32 mono [n], or [C, n] with ``mono=False`` (integer formats
    scaled to [-1, 1]; more than 2 channels are down-mixed to mono either way)."""
    x = frame.to_ndarray()
    if x.dtype.kind in "iu":
        if x.dtype == np.uint8:
            x = (x.astype(np.float32) - 128.0) / 128.0
        else:
            x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    else:
        x = x.astype(np.float32, copy=False)
    channels = len(frame.layout.channels)
    x = x.reshape(channels, -1) if frame.format.is_planar else x.reshape(-1, channels).T  # [C, n]
    if mono or channels > 2:
        x = x.mean(axis=0, keepdims=True) if channels > 1 else x
        return x[0] if mono else x
    return x


def load_audio_native(path: str | Path, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path`` at its own rate and channels (what a rendered MP4
    muxes back, so the output sounds like the input).

    Returns:
        (float32 ``[C, T]`` in [-1, 1] with C = 1 or 2 (more channels are down-mixed to mono), the
        decoded sample rate in Hz).
    Raises:
        as :func:`load_audio`.
    """
    return _decode(path, None, max_seconds, mono=False)


def load_audio(path: str | Path, sr: int = AUDIO_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream of ``path`` to mono float32 at ``sr`` Hz.

    Args:
        path: audio or video file (wav, mp3, m4a/aac, flac, the audio of an mp4, ...).
        sr: output sample rate in Hz (default 16 kHz, the product's audio time base).
        max_seconds: longest audio accepted. Decoding stops as soon as more than this has been
            decoded (and a longer declared duration is refused before decoding), so memory stays
            bounded by ``max_seconds * sr`` samples whatever the file holds (a few KB of FLAC can
            declare hours of silence). None = no limit.

    Returns:
        float32 ``[T]`` in [-1, 1] (clipped), mono (mean of the source channels), ``T ~=
        duration_s * sr``.

    Raises:
        NoAudio: the file has no audio stream or it decodes to zero samples.
        InvalidMedia: the file is missing, empty, not a media file, or fails to decode.
        ResourceLimit: the audio is longer than ``max_seconds``.
    """
    if sr <= 0:
        raise InvalidInput(f"sample rate must be > 0 Hz, got {sr}")
    return _decode(path, sr, max_seconds, mono=True)[0]


def _decode(path: str | Path, sr: int | None, max_seconds: float | None, mono: bool) -> tuple[np.ndarray, int]:
    """:func:`load_audio` (``sr`` Hz, mono [T]) and :func:`load_audio_native` (``sr`` None, [C, T])."""
    path = Path(path)
    if sr is not None and sr <= 0:
        raise InvalidInput(f"sample rate must be > 0 Hz, got {sr}")
    if max_seconds is not None and not max_seconds > 0:
        raise InvalidInput(f"max_seconds must be > 0, got {max_seconds}")

    def too_long() -> ResourceLimit:
        return ResourceLimit(f"the audio is longer than the limit of {max_seconds:g} s; split it into shorter parts")

    with _open(path) as c:
        if not c.streams.audio:
            raise NoAudio(
                f"{path}: has no audio stream; pass a file with speech audio (or the separate "
                ".wav that goes with this silent video)"
            )
        stream = c.streams.audio[0]
        declared = _stream_duration_s(stream) if _indexed(c) else None
        if max_seconds is not None and declared and declared > max_seconds + _TRUNCATION_TOLERANCE_S:
            raise too_long()
        rate_in = None
        rs = None
        out: list[np.ndarray] = []
        n_in = n_out = 0
        try:
            for frame in c.decode(stream):
                if frame.samples == 0:
                    continue
                if rate_in is None:
                    rate_in = int(frame.sample_rate)
                    sr = rate_in if sr is None else sr
                    channels = 1 if mono or len(frame.layout.channels) > 2 else len(frame.layout.channels)
                    rs = (
                        soxr.ResampleStream(rate_in, sr, channels, dtype="float32", quality="HQ")
                        if rate_in != sr
                        else None
                    )
                elif int(frame.sample_rate) != rate_in:
                    raise InvalidMedia(
                        f"{path}: audio sample rate changes mid-stream ({rate_in} -> {frame.sample_rate} Hz); "
                        "re-export it at one rate"
                    )
                n_in += frame.samples
                if max_seconds is not None and n_in > max_seconds * rate_in:  # before converting it
                    raise too_long()
                x = _to_float(frame, mono=channels == 1).reshape(channels, -1)
                out.append(
                    (rs.resample_chunk(np.ascontiguousarray(x.T)).T if rs is not None else x).reshape(channels, -1)
                )
                n_out += out[-1].shape[1]
                if max_seconds is not None and n_out > max_seconds * sr:
                    raise too_long()
        except av.FFmpegError as e:
            raise InvalidMedia(f"{path}: audio fails to decode ({e}); the file is corrupt, re-export it") from e
        if rs is not None:
            out.append(rs.resample_chunk(np.zeros((0, channels), np.float32), last=True).T.reshape(channels, -1))
    wav = np.concatenate(out, axis=1) if out else np.zeros((1, 0), np.float32)
    if mono:
        wav = wav[0]
    if wav.size == 0:
        raise NoAudio(f"{path}: the audio stream decodes to zero samples; pass a file with speech audio")
    if declared and wav.shape[-1] / sr < declared - _TRUNCATION_TOLERANCE_S:
        raise InvalidMedia(
            f"{path}: audio ends at {wav.shape[-1] / sr:.2f} s but declares {declared:.2f} s; the file is "
            "truncated, copy or download it again"
        )
    return np.clip(wav, -1.0, 1.0).astype(np.float32, copy=False), int(sr)


def resample_audio(x: np.ndarray, sr_in: int, sr_out: int = AUDIO_RATE) -> np.ndarray:
    """Resample a raw waveform (e.g. PCM received over gRPC) to mono float32 at ``sr_out`` Hz.

    Args:
        x: ``[T]`` mono or ``[T, C]`` multi-channel (soundfile layout), float in [-1, 1] or int16.
        sr_in: its sample rate in Hz.
        sr_out: output sample rate in Hz.

    Returns:
        float32 ``[round(T * sr_out / sr_in)]`` in [-1, 1] (soxr "HQ").

    Raises:
        InvalidInput: wrong rank/dtype, non-finite samples or non-positive rates.
        NoAudio: zero samples.
    """
    x = np.asarray(x)
    if sr_in <= 0 or sr_out <= 0:
        raise InvalidInput(f"sample rates must be > 0 Hz, got {sr_in} -> {sr_out}")
    if x.ndim not in (1, 2):
        raise InvalidInput(f"audio must be [T] or [T, channels], got shape {list(x.shape)}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise InvalidInput(f"audio must be float (in [-1, 1]) or int16 PCM, got {x.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.size == 0:
        raise NoAudio("the audio has zero samples; send speech audio")
    if not np.all(np.isfinite(x)):
        raise InvalidInput("audio contains NaN or infinite samples")
    if sr_in != sr_out:
        x = soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)
    return np.clip(x, -1.0, 1.0)


def write_wav(path: str | Path, x: np.ndarray, sr: int = AUDIO_RATE) -> None:
    """Write float audio ``[T]`` or ``[T, C]`` in [-1, 1] as 16-bit PCM WAV (soundfile).

    Raises:
        InvalidInput: not a float array of rank 1 or 2.
    """
    x = np.asarray(x)
    if x.ndim not in (1, 2) or not np.issubdtype(x.dtype, np.floating):
        raise InvalidInput(f"audio must be float [T] or [T, C], got {x.dtype} {list(x.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.clip(x, -1.0, 1.0), int(sr), subtype="PCM_16")
