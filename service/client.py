"""Python client of the avatar gRPC service (``avatar.v1.AvatarService``).

Example::

    from avatar_service.client import AvatarClient
    with AvatarClient("localhost:50051", token="...") as c:
        call = c.render("acosta", "speech.wav", {"emotion": "happy"}, image_format="png")
        for frame in call:            # Frame(index, timestamp_s, image uint8 [S,S,3] RGB)
            ...
        print(call.header.total_frames, call.summary.render_s)

Errors come back as :class:`grpc.RpcError` (``.code()``, ``.details()``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Iterator

import grpc
import numpy as np

from avatar_service import avatar_pb2 as pb
from avatar_service import avatar_pb2_grpc as pb_grpc
from avatar_service.codec import SAMPLE_RATE, decode_frame

FORMATS = {"jpeg": pb.IMAGE_FORMAT_JPEG, "png": pb.IMAGE_FORMAT_PNG}
_OPTIONAL = ("emotion_strength", "blink", "blink_rate", "temperature", "head_speed", "head_amplitude")


#: put this in StreamRender's ``chunks`` to interrupt (barge-in): drop the queued audio, back to idle
INTERRUPT = "interrupt"


@dataclasses.dataclass
class Frame:
    """One decoded frame: ``image`` uint8 [S, S, 3] RGB; ``timestamp_s`` = index / fps; ``received`` =
    ``time.monotonic()`` at arrival (client-side latency measurements). StreamRender frames also have
    ``audio`` (float32 mono, this frame's 40 ms at ``header.output_audio.sample_rate``) and ``idle``
    (an idle frame: the server inserted silence because no audio arrived)."""

    index: int
    timestamp_s: float
    image: np.ndarray
    received: float
    audio: np.ndarray | None = None
    idle: bool = False


def decode_pcm(data: bytes, encoding: int) -> np.ndarray:
    """Raw little-endian PCM16 / float32 bytes -> float32 samples in [-1, 1]."""
    if encoding == pb.AudioFormat.ENCODING_PCM16:
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    return np.frombuffer(data, "<f4").astype(np.float32)


def options_msg(options: dict | None) -> pb.RenderOptions:
    """{name: value} of :class:`avatar.api.RenderOptions` fields -> proto RenderOptions (None values are left unset).

    Raises:
        ValueError: unknown option names.
    """
    msg = pb.RenderOptions()
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key not in pb.RenderOptions.DESCRIPTOR.fields_by_name:
            raise ValueError(
                f"unknown render option {key!r}; valid: {sorted(pb.RenderOptions.DESCRIPTOR.fields_by_name)}"
            )
        setattr(msg, key, value)
    return msg


def _info(msg: pb.AvatarInfo) -> dict:
    return {"name": msg.name, "size": msg.size, "fps": msg.fps, "created": msg.created, "metrics": dict(msg.metrics)}


def job_dict(job: pb.Job) -> dict:
    """proto Job -> plain dict (state as its name, e.g. ``"RUNNING"``)."""
    return {
        "job_id": job.job_id,
        "avatar": job.avatar,
        "state": pb.Job.State.Name(job.state).removeprefix("STATE_"),
        "stage": job.stage,
        "progress": job.progress,
        "message": job.message,
        "error_code": job.error_code,
        "error": job.error,
        "queue_position": job.queue_position,
        "created_unix": job.created_unix,
        "finished_unix": job.finished_unix,
    }


class FrameCall:
    """Iterator over the decoded frames of a Render or StreamRender call.

    Attributes:
        header: the RenderHeader / StreamHeader (available after the first frame or :meth:`wait_header`).
        summary: the RenderSummary / StreamSummary (after iteration ends).
        interrupts: StreamRender's ``Interrupted`` answers, with ``received`` (monotonic) as
            ``(message, received)`` pairs.
    """

    def __init__(self, call, decode: bool = True):
        self._call = call
        self._decode = decode
        self.header = None
        self.summary = None
        self.interrupts: list = []

    def __iter__(self) -> Iterator[Frame]:
        for resp in self._call:
            kind = resp.WhichOneof("kind")
            if kind == "header":
                self.header = resp.header
            elif kind == "frame":
                f = resp.frame
                image = decode_frame(f.image) if self._decode else f.image
                audio = decode_pcm(f.audio, self.header.output_audio.encoding) if f.audio else None
                yield Frame(int(f.index), float(f.timestamp_s), image, time.monotonic(), audio, f.idle)
            elif kind == "summary":
                self.summary = resp.summary
            elif kind == "interrupted":
                self.interrupts.append((resp.interrupted, time.monotonic()))

    def cancel(self) -> None:
        """Cancel the call; the server stops rendering."""
        self._call.cancel()


class AvatarClient:
    """A connection to the service.

    Args:
        target: ``host:port``.
        token: API token (sent as ``authorization: Bearer <token>``).
        tls_ca: PEM file of the CA (or self-signed cert) to trust; None = plaintext.
        max_message_mb: largest message accepted/sent (must cover Render's audio upload).
    """

    def __init__(
        self, target: str, token: str | None = None, tls_ca: str | Path | None = None, max_message_mb: int = 64
    ):
        opts = [
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
        ]
        if tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.AvatarServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AvatarClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # avatars -----------------------------------------------------------------------------------
    def list_avatars(self, timeout: float | None = 30) -> list[dict]:
        """Info dicts (name, size, fps, created, metrics) of the server's avatars."""
        return [
            _info(a)
            for a in self.stub.ListAvatars(pb.ListAvatarsRequest(), metadata=self.metadata, timeout=timeout).avatars
        ]

    def get_avatar(self, name: str, timeout: float | None = 30) -> dict:
        """Info dict of avatar ``name`` (NOT_FOUND if unknown)."""
        return _info(self.stub.GetAvatar(pb.GetAvatarRequest(name=name), metadata=self.metadata, timeout=timeout))

    # rendering ---------------------------------------------------------------------------------
    def render(
        self,
        avatar: str,
        audio: bytes | str | Path,
        options: dict | None = None,
        image_format: str = "jpeg",
        jpeg_quality: int = 0,
        timeout: float | None = None,
        decode: bool = True,
    ) -> FrameCall:
        """Render a whole audio file (bytes or path of wav/mp3/...); iterate the result for frames."""
        data = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
        req = pb.RenderRequest(
            avatar=avatar,
            audio=data,
            options=options_msg(options),
            encoding=pb.FrameEncoding(format=FORMATS[image_format], jpeg_quality=jpeg_quality),
        )
        return FrameCall(self.stub.Render(req, metadata=self.metadata, timeout=timeout), decode)

    def stream(
        self,
        avatar: str,
        chunks: Iterable,
        options: dict | None = None,
        sample_rate: int = SAMPLE_RATE,
        encoding: str = "float32",
        image_format: str = "jpeg",
        jpeg_quality: int = 0,
        realtime: bool = True,
        timeout: float | None = None,
        decode: bool = True,
        end: bool = True,
        idle_frames: bool | None = None,
        output_rate: int | None = None,
        output_encoding: str | None = None,
        frame_audio: bool | None = None,
        block: int | None = None,
        nerf_right: int | None = None,
    ) -> FrameCall:
        """Real-time session. ``chunks`` yields audio (float32 arrays, or raw bytes already in
        ``encoding``), dicts of mid-stream option changes (``{"emotion": "happy"}``) or
        :data:`INTERRUPT` (barge-in); it is consumed lazily, so a generator can pace the audio. ``end``
        sends EndOfAudio afterwards. ``idle_frames`` (default: as ``realtime``): idle frames while no
        audio arrives. ``output_rate`` / ``output_encoding``: the frames' audio (default: as the input);
        ``frame_audio=False``: none. ``block`` (frames per motion block, 1..64) and ``nerf_right`` (frames
        of NeRF look-ahead, 0..W//2): low-latency session settings, None = the server's defaults (8 and
        W//2); ``header.lookahead_s`` (seconds) reports the result. Bad values end the call with
        INVALID_ARGUMENT (a :class:`grpc.RpcError` raised while iterating)."""
        encodings = {"float32": pb.AudioFormat.ENCODING_FLOAT32, "pcm16": pb.AudioFormat.ENCODING_PCM16}
        enc = encodings[encoding]

        def requests():
            cfg = pb.StreamConfig(
                avatar=avatar,
                audio_format=pb.AudioFormat(encoding=enc, sample_rate=sample_rate),
                options=options_msg(options),
                realtime=realtime,
                encoding=pb.FrameEncoding(format=FORMATS[image_format], jpeg_quality=jpeg_quality),
            )
            if idle_frames is not None:
                cfg.idle_frames = idle_frames
            if frame_audio is not None:
                cfg.frame_audio = frame_audio
            if block is not None:
                cfg.block = block
            if nerf_right is not None:
                cfg.nerf_right = nerf_right
            if output_rate is not None or output_encoding is not None:
                cfg.output_audio.CopyFrom(
                    pb.AudioFormat(
                        encoding=encodings[output_encoding or encoding], sample_rate=output_rate or sample_rate
                    )
                )
            yield pb.StreamRenderRequest(config=cfg)
            for chunk in chunks:
                if isinstance(chunk, str) and chunk == INTERRUPT:
                    yield pb.StreamRenderRequest(interrupt=pb.Interrupt())
                    continue
                if isinstance(chunk, dict):
                    yield pb.StreamRenderRequest(options_update=pb.OptionsUpdate(**chunk))
                    continue
                if isinstance(chunk, np.ndarray):
                    chunk = (
                        chunk.astype("<f4")
                        if enc == pb.AudioFormat.ENCODING_FLOAT32
                        else (np.clip(chunk, -1, 1) * 32767).astype("<i2")
                    ).tobytes()
                yield pb.StreamRenderRequest(audio=pb.AudioChunk(data=chunk))
            if end:
                yield pb.StreamRenderRequest(end_of_audio=pb.EndOfAudio())

        return FrameCall(self.stub.StreamRender(requests(), metadata=self.metadata, timeout=timeout), decode)

    # onboarding --------------------------------------------------------------------------------
    def onboard(
        self,
        video: str | Path,
        name: str,
        preset: str = "cpu-small",
        overwrite: bool = False,
        chunk_mb: int = 1,
        timeout: float | None = None,
    ) -> dict:
        """Upload ``video`` and queue onboarding; returns the job dict (see :func:`job_dict`)."""
        video = Path(video)

        def requests():
            yield pb.OnboardRequest(
                metadata=pb.OnboardMetadata(name=name, preset=preset, overwrite=overwrite, filename=video.name)
            )
            with open(video, "rb") as f:
                while block := f.read(chunk_mb << 20):
                    yield pb.OnboardRequest(video_chunk=block)

        return job_dict(self.stub.Onboard(requests(), metadata=self.metadata, timeout=timeout))

    def get_job(self, job_id: str, timeout: float | None = 30) -> dict:
        return job_dict(self.stub.GetJob(pb.JobRequest(job_id=job_id), metadata=self.metadata, timeout=timeout))

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[dict]:
        """Job dicts on every change until the job finishes."""
        for job in self.stub.WatchJob(pb.JobRequest(job_id=job_id), metadata=self.metadata, timeout=timeout):
            yield job_dict(job)

    def cancel_job(self, job_id: str, timeout: float | None = 30) -> dict:
        return job_dict(self.stub.CancelJob(pb.JobRequest(job_id=job_id), metadata=self.metadata, timeout=timeout))

    def list_jobs(self, avatar: str = "", limit: int = 0, timeout: float | None = 30) -> list[dict]:
        """Jobs of the server's store (past ones too), newest first; ``avatar`` filters by name."""
        resp = self.stub.ListJobs(
            pb.ListJobsRequest(avatar=avatar, limit=limit), metadata=self.metadata, timeout=timeout
        )
        return [job_dict(j) for j in resp.jobs]
