"""Wire formats of the service: frame images (JPEG/PNG via OpenCV) and streamed PCM audio.

Frames travel as encoded RGB images; audio chunks as raw little-endian PCM16 or float32 mono at
any sample rate, converted to the library's time base (float32 mono 16 kHz) by a *streaming*
resampler (libsoxr), so any chunking of the same audio gives the same samples.
"""

from __future__ import annotations

import cv2
import numpy as np
import soxr

from avatar.errors import InvalidInput
from avatar.timebase import AUDIO_RATE
from avatar_service import avatar_pb2 as pb

#: the library's audio rate (Hz); every frame covers 640 samples at this rate (25 fps)
SAMPLE_RATE = AUDIO_RATE
DEFAULT_JPEG_QUALITY = 90


def encode_frame(frame: np.ndarray, fmt: int = pb.IMAGE_FORMAT_JPEG, jpeg_quality: int = 0) -> bytes:
    """Encode one RGB frame.

    Args:
        frame: uint8 [H, W, 3] RGB.
        fmt: ``pb.IMAGE_FORMAT_JPEG`` or ``pb.IMAGE_FORMAT_PNG`` (lossless).
        jpeg_quality: 1..100; 0 means :data:`DEFAULT_JPEG_QUALITY`.

    Raises:
        InvalidInput: unknown format or quality outside 0..100.
    """
    bgr = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR)
    if fmt == pb.IMAGE_FORMAT_PNG:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif fmt == pb.IMAGE_FORMAT_JPEG:
        if not 0 <= jpeg_quality <= 100:
            raise InvalidInput(f"jpeg_quality must be 1..100 (0 = {DEFAULT_JPEG_QUALITY}), got {jpeg_quality}")
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality or DEFAULT_JPEG_QUALITY])
    else:
        raise InvalidInput(f"unknown image format {fmt}; use IMAGE_FORMAT_JPEG or IMAGE_FORMAT_PNG")
    if not ok:  # OpenCV only fails here on an impossible image shape
        raise InvalidInput(f"could not encode a frame of shape {frame.shape}")
    return buf.tobytes()


def decode_frame(data: bytes) -> np.ndarray:
    """Decode a JPEG/PNG frame from the service into uint8 [H, W, 3] RGB.

    Raises:
        InvalidInput: the bytes are not an image.
    """
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidInput("frame bytes are not a JPEG/PNG image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class PcmDecoder:
    """Raw PCM chunks (any size, any rate) -> float32 mono 16 kHz, streaming.

    Chunks may split a sample: leftover bytes wait for the next chunk. Resampling uses libsoxr's
    stateful ``ResampleStream`` (HQ), so the output does not depend on how the audio was chunked.

    Args:
        encoding: ``pb.AudioFormat.ENCODING_PCM16`` (int16 LE) or ``ENCODING_FLOAT32`` (float32 LE).
        sample_rate: input rate in Hz (0 = 16000); 8000..192000.

    Raises:
        InvalidInput: unknown encoding or unsupported rate.
    """

    def __init__(self, encoding: int, sample_rate: int):
        if encoding == pb.AudioFormat.ENCODING_PCM16:
            self.dtype, self.scale = np.dtype("<i2"), 1.0 / 32768.0
        elif encoding == pb.AudioFormat.ENCODING_FLOAT32:
            self.dtype, self.scale = np.dtype("<f4"), 1.0
        else:
            raise InvalidInput(f"unknown audio encoding {encoding}; use ENCODING_PCM16 or ENCODING_FLOAT32")
        self.sample_rate = sample_rate or SAMPLE_RATE
        if not 8000 <= self.sample_rate <= 192000:
            raise InvalidInput(f"audio sample_rate must be 8000..192000 Hz, got {self.sample_rate}")
        self._rest = b""
        self._resampler = (
            None
            if self.sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        )

    def push(self, data: bytes) -> np.ndarray:
        """Decode one chunk; returns float32 [n] at 16 kHz (possibly empty).

        Raises:
            InvalidInput: float32 samples that are not finite.
        """
        data = self._rest + data
        usable = len(data) - len(data) % self.dtype.itemsize
        self._rest = data[usable:]
        x = np.frombuffer(data[:usable], self.dtype).astype(np.float32) * np.float32(self.scale)
        if not np.isfinite(x).all():
            raise InvalidInput("audio chunk contains NaN or infinite samples; send float32 in [-1, 1]")
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=False)
        return x

    def finish(self) -> np.ndarray:
        """Flush the resampler at end of audio; returns the last float32 [n] samples at 16 kHz."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def encode_pcm(x: np.ndarray, encoding: int) -> bytes:
    """float32 mono samples in [-1, 1] -> raw little-endian bytes in ``encoding`` (``ENCODING_PCM16``:
    clipped and scaled by 32767; ``ENCODING_FLOAT32``: as they are)."""
    if encoding == pb.AudioFormat.ENCODING_PCM16:
        return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    if encoding == pb.AudioFormat.ENCODING_FLOAT32:
        return np.asarray(x, "<f4").tobytes()
    raise InvalidInput(f"unknown audio encoding {encoding}; use ENCODING_PCM16 or ENCODING_FLOAT32")
