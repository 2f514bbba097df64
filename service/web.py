"""The browser console of ``avatar serve --web PORT``: an aiohttp app beside the gRPC server.

It serves one plain HTML/JS page (``service/web_static``, no build step) and a small JSON API over
the same store, job manager, avatar cache, render slots and bearer tokens as the gRPC service
(:class:`avatar_service.server.AvatarServicer`):

========================================  ======== ==================================================
``GET  /``                                 -        the page
``GET  /api/avatars``                      render   avatar list (info dicts)
``GET  /api/avatars/{name}/preview.png``   render   first rendered frame (silence, still head), cached
``POST /api/render``                       render   multipart ``avatar``, ``audio`` file, ``options``
                                                    (JSON) -> ``video/mp4`` with the audio muxed in
``POST /api/onboard``                      onboard  multipart ``name``, ``preset``, ``overwrite``,
                                                    ``video`` file -> the job (202)
``GET  /api/jobs/{id}``                    onboard  the job (state, stage, progress, message)
``POST /api/jobs/{id}/cancel``             onboard  cancel it
``POST /api/webrtc/offer``                 render   JSON ``avatar``, ``sdp``, ``type``, ``options``,
                                                    ``block``, ``nerf_right`` (low latency, optional) ->
                                                    the answer, a session id and its ``lookahead_s``
``GET  /api/webrtc/{sid}/stats``           render   live session statistics (fps, first-frame stages)
``POST /api/webrtc/{sid}/interrupt``       render   barge-in: drop the queued audio, back to idle frames
``POST /api/webrtc/{sid}/close``           render   end it
========================================  ======== ==================================================

Auth: ``Authorization: Bearer <token>`` on every ``/api`` call (the page keeps the token in
``sessionStorage``); missing -> 401, unknown token or missing scope -> 403 (``admin`` allows all).
The page and its static files need no token.

Live WebRTC session (:class:`LiveSession`): the browser sends one audio track (microphone or a
file); aiortc decodes it (Opus, 48 kHz); it is mixed to mono and resampled to 16 kHz (libsoxr,
streaming) and handed to the StreamRender pacer (:mod:`avatar_service.stream`) on a render thread, which
drives a :class:`avatar.api.StreamSession` one frame at a time: idle frames once the speech pauses,
interrupt (barge-in) through ``POST /api/webrtc/{sid}/interrupt``, the server's ``max_idle_s``.
Each frame leaves together with its own 40 ms of the timeline's audio: the video
track releases frame ``i`` no earlier than ``t0 + i / 25`` (``t0`` re-anchored when a frame is
late, like a playout buffer after a stall) and hands the frame's audio to the outgoing audio track,
which plays it in 20 ms packets (silence when it has none). Both tracks carry wall-clock RTP
timestamps and share one MediaStream, so the browser keeps them in sync. When the renderer is
slower than real time (this CPU) the video runs at the render rate, the audio is heard in 40 ms
pieces per frame, and input audio beyond ``max_backlog_s`` of unrendered audio is dropped (counted
in the stats) so the latency stays bounded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fractions
import hmac
import json
import logging
import queue
import ssl
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import av
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatar.errors import AvatarError, InvalidInput, InvalidMedia, NoAudio, OutputExists, ResourceLimit
from avatar.timebase import AUDIO_RATE, SAMPLES_PER_FRAME
from avatar.timebase import FPS as _FPS

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("web_static")
FPS = float(_FPS)
#: HTTP status of each AvatarError.grpc_code
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "CANCELLED": 499,
    "INTERNAL": 500,
}
#: render options a browser may set (no server paths such as emotion_video)
WEB_OPTIONS = (
    "emotion",
    "emotion_strength",
    "still",
    "blink",
    "blink_rate",
    "temperature",
    "seed",
    "size",
    "head_speed",
    "head_amplitude",
)
_TOKENS = web.AppKey("tokens", dict)
_SERVICER = web.AppKey("servicer", object)
_WEB = web.AppKey("web", object)


# ---- auth -------------------------------------------------------------------------------------
def scopes_for(tokens: dict[str, frozenset[str]], token: str) -> frozenset[str] | None:
    """The scopes of ``token`` (constant-time compare against every known token), or None if unknown."""
    found = None
    for known, scopes in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found = scopes
    return found


def require(request: web.Request, scope: str) -> str:
    """Check the request's bearer token has ``scope`` (or ``admin``); returns the token.

    Raises:
        web.HTTPUnauthorized: no ``Authorization: Bearer`` header. web.HTTPForbidden: unknown token
        or the scope is missing.
    """
    from avatar_service.auth import bearer_token

    token = bearer_token([("authorization", request.headers.get("Authorization", ""))])
    if token is None:
        raise _http(
            web.HTTPUnauthorized,
            "missing credentials: send 'Authorization: Bearer <token>' (enter the token at the top of the page)",
        )
    scopes = scopes_for(request.app[_TOKENS], token)
    if scopes is None:
        raise _http(web.HTTPForbidden, "unknown token: ask the server operator for a valid API token")
    if scope not in scopes and "admin" not in scopes:
        raise _http(web.HTTPForbidden, f"this token lacks the '{scope}' scope")
    return token


def _http(cls, message: str):
    return cls(text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler):
    """AvatarError -> JSON error with its HTTP status; anything else -> 500 with a request id."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except AvatarError as e:
        status = HTTP_STATUS.get(e.grpc_code, 500)
        return web.json_response({"error": request.app[_SERVICER].scrub(str(e)), "code": e.grpc_code}, status=status)
    except Exception:
        rid = uuid.uuid4().hex[:12]
        log.exception("web request %s %s failed (request id %s)", request.method, request.path, rid)
        return web.json_response({"error": f"internal error; quote request id {rid} to the operator"}, status=500)


# ---- helpers ------------------------------------------------------------------------------------
def parse_options(raw: str | dict | None, native: int):
    """Browser render options (JSON text or dict of :data:`WEB_OPTIONS`) -> validated RenderOptions,
    ``size`` capped at the avatar's ``native`` size.

    Raises:
        InvalidInput: not JSON, unknown names or bad values.
    """
    from avatar.api import RenderOptions
    from avatar_service.server import cap_size

    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise InvalidInput(f"render options must be a JSON object: {e}") from e
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise InvalidInput("render options must be a JSON object")
    bad = set(raw) - set(WEB_OPTIONS)
    if bad:
        raise InvalidInput(f"unknown render option(s) {sorted(bad)}; valid: {list(WEB_OPTIONS)}")
    raw = {k: v for k, v in raw.items() if v is not None and v != ""}
    return cap_size(RenderOptions().updated(**raw), native)


async def _spool_part(part, spool: Path, suffix: str, limit: int, what: str) -> tuple[Path, int]:
    """Write a multipart file part to a new file in ``spool`` (at most ``limit`` bytes).

    Raises:
        ResourceLimit: the part exceeds ``limit``. InvalidMedia: it is empty.
    """
    fd, tmp = tempfile.mkstemp(dir=spool, suffix=suffix)
    path, size = Path(tmp), 0
    try:
        with open(fd, "wb") as f:
            while chunk := await part.read_chunk(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise ResourceLimit(f"the {what} exceeds this server's upload limit of {limit >> 20} MB")
                f.write(chunk)
        if size == 0:
            raise InvalidMedia(f"the uploaded {what} is empty")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size


async def _form(request: web.Request, file_field: str, spool: Path, limit: int, what: str) -> tuple[dict, Path | None]:
    """Read a multipart form: text fields -> dict, the ``file_field`` part -> a spooled file.

    Raises:
        InvalidInput: not multipart. ResourceLimit / InvalidMedia: as :func:`_spool_part`.
    """
    from avatar_service.server import upload_suffix

    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("send multipart/form-data")
    fields, path = {}, None
    reader = await request.multipart()
    try:
        while (part := await reader.next()) is not None:
            if part.name == file_field and part.filename is not None:
                if path is not None:
                    raise InvalidInput(f"send one '{file_field}' file")
                path, _ = await _spool_part(part, spool, upload_suffix(part.filename), limit, what)
            elif part.name:
                text = b""
                while chunk := await part.read_chunk(4096):
                    text += chunk
                    if len(text) > 65536:
                        raise InvalidInput(f"form field {part.name[:32]!r} is too long (64 KiB at most)")
                fields[part.name] = text.decode("utf-8", "replace")
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)
        raise
    return fields, path


def job_dict(job, scrub) -> dict:
    """A JobRecord as JSON for the page (server paths scrubbed; no video path)."""
    d = dataclasses.asdict(job)
    d.pop("video", None)
    d["message"], d["error"] = scrub(d["message"]), scrub(d["error"])
    return d


def encode_png(frame: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB -> PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))
    if not ok:
        raise AvatarError("cannot encode the preview image")
    return buf.tobytes()


# ---- live WebRTC session ------------------------------------------------------------------------
class SessionClosed(Exception):
    """Raised inside a live session's render thread once the session was closed."""


class _Timed:
    """Wraps a callable: adds its wall time to ``stats[key]`` (seconds), counts calls in
    ``stats[key + "_calls"]``, and records the first call's duration in ``stats["first_" + key]`` and
    its end (``time.monotonic()``) in ``marks[key]``. Raises :class:`SessionClosed` before the call
    once ``stop`` is set (so a closed session stops within one frame's work); passes each result to
    ``on_result(args, result)`` if given."""

    def __init__(self, fn, stats: dict, marks: dict, key: str, stop: threading.Event, on_result=None):
        self.fn, self.stats, self.marks, self.key, self.stop = fn, stats, marks, key, stop
        self.on_result = on_result

    def __call__(self, *a, **kw):
        if self.stop.is_set():
            raise SessionClosed
        t = time.perf_counter()
        try:
            out = self.fn(*a, **kw)
        finally:
            dt = time.perf_counter() - t
            self.stats[self.key] = self.stats.get(self.key, 0.0) + dt
            self.stats[self.key + "_calls"] = self.stats.get(self.key + "_calls", 0) + 1
            if self.key not in self.marks:
                self.stats["first_" + self.key] = dt
                self.marks[self.key] = time.monotonic()
        if self.on_result is not None:
            self.on_result(a, out)
        return out


class MonoResampler:
    """aiortc/PyAV audio frames (any rate, layout, sample format) -> float32 mono 16 kHz, streaming
    (libsoxr ``ResampleStream``, so the output does not depend on the packetisation)."""

    def __init__(self):
        self._rate = None
        self._rs = None

    def __call__(self, frame) -> np.ndarray:
        """One ``av.AudioFrame`` -> float32 [n] at 16 kHz (possibly empty)."""
        import soxr

        x = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        elif x.dtype == np.int32:
            x = x.astype(np.float32) / 2147483648.0
        else:
            x = x.astype(np.float32)
        x = x.reshape(-1, channels).mean(axis=1) if frame.format.is_packed else x.reshape(channels, -1).mean(axis=0)
        if frame.sample_rate != self._rate:
            self._rate = frame.sample_rate
            self._rs = (
                None
                if self._rate == AUDIO_RATE
                else soxr.ResampleStream(self._rate, AUDIO_RATE, 1, dtype="float32", quality="HQ")
            )
        return np.ascontiguousarray(x if self._rs is None else self._rs.resample_chunk(x, last=False), np.float32)


class LiveSession:
    """One browser's live avatar: audio in -> :class:`StreamSession` -> synchronised video + audio out.

    Args:
        sid: session id. avatar: loaded :class:`avatar.api.Avatar`. options: RenderOptions.
        loop: the aiohttp event loop. max_backlog_s: unrendered input audio (seconds, beyond the
            engine's lookahead) above which new input audio is dropped. max_audio_s: audio after
            which the session ends itself. on_end: called once when the render thread stops.
        block / nerf_right: the StreamSession's frames per motion block and frames of NeRF look-ahead
            (None = the library defaults; :func:`avatar_service.server.stream_latency_args` validates a client's).

    Raises:
        InvalidInput: ``block`` / ``nerf_right`` out of range.

    Attributes:
        stats: counters and first-frame stage timings (see :meth:`snapshot`).
    """

    def __init__(
        self,
        sid: str,
        avatar,
        options,
        loop: asyncio.AbstractEventLoop,
        max_backlog_s: float,
        max_audio_s: float,
        on_end=None,
        max_idle_s: float = 600.0,
        block: int | None = None,
        nerf_right: int | None = None,
    ):
        from avatar_service.server import open_stream
        from avatar_service.stream import Pacer, PacerConfig

        self.sid = sid
        self.avatar = avatar
        self.loop = loop
        self.session = open_stream(avatar, options, block, nerf_right)
        self.lookahead_s = self.session.lookahead_s
        self.size = options.size or avatar.size
        self.max_backlog = int(max_backlog_s * AUDIO_RATE)
        self.max_audio = int(max_audio_s * AUDIO_RATE)
        # the session's block and right context (derived from the avatar's models, StreamSession.latency)
        self._block, self._ctx_right = self.session.latency.block, self.session.latency.ctx_right
        self.stats: dict = {
            "frames_rendered": 0,
            "frames_sent": 0,
            "idle_frames": 0,
            "interrupts": 0,
            "audio_in_s": 0.0,
            "audio_dropped_s": 0.0,
            "state": "new",
            "error": "",
        }
        self.t: dict[str, float] = {"created": time.monotonic()}  # first-frame stage marks (monotonic s)
        # per-stage timing of the first frame: wrap this session's own engines (instance attributes)
        self._stop = threading.Event()
        self.session.motion.block = _Timed(self.session.motion.block, self.stats, self.t, "motion_s", self._stop)
        self.session.frames.frame = _Timed(self.session.frames.frame, self.stats, self.t, "nerf_s", self._stop)
        # the StreamRender pacer (service/stream.py): paced frames with their audio, idle frames once the
        # speech pauses (not before the first audio, so the first-frame stages keep their meaning), interrupt
        self.pacer = Pacer(
            self.session,
            PacerConfig(
                fps=FPS,
                realtime=True,
                idle=True,
                out_rate=AUDIO_RATE,
                start_grace_s=float("inf"),
                idle_limit_s=max_idle_s,
            ),
        )
        self.pc = RTCPeerConnection()
        self.video = FrameTrack(self)
        self.audio_out = PlayoutAudioTrack(self)
        self._inbox: queue.Queue = queue.Queue()
        self._frames: asyncio.Queue = asyncio.Queue()
        self._queued = 0  # input samples in _inbox, not yet given to the pacer
        self._accepted = 0  # input samples accepted for rendering
        self._on_end = on_end
        self._ended = False
        self._thread = threading.Thread(target=self._render_loop, name=f"web-live-{sid}", daemon=True)
        self._consumer: asyncio.Task | None = None

    # -- audio in (event loop) --
    async def consume(self, track) -> None:
        """Read the browser's audio track until it ends; queue 16 kHz mono audio for the render thread."""
        resample = MonoResampler()
        try:
            while True:
                frame = await track.recv()
                pcm = resample(frame)
                if not pcm.size:
                    continue
                self.t.setdefault("audio_in", time.monotonic())
                self.stats["audio_in_s"] += pcm.size / AUDIO_RATE
                backlog = self._queued + max(0, self.session.samples - self.session.frames_emitted * SAMPLES_PER_FRAME)
                if backlog > self.max_backlog + self.lookahead_s * AUDIO_RATE:
                    self.stats["audio_dropped_s"] += pcm.size / AUDIO_RATE
                    continue
                if self._accepted + pcm.size > self.max_audio:
                    self.stats["error"] = "the session reached this server's audio limit; start a new one"
                    break
                self._accepted += pcm.size
                self._queued += pcm.size
                self._inbox.put(pcm)
        except MediaStreamError:
            pass
        finally:
            self._inbox.put(None)

    # -- render thread --
    def _receive(self, timeout: float):
        """The pacer's events: input audio, the end of the browser's track, interrupts."""
        from avatar_service import stream

        try:
            item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None
        if item is None:
            return stream.End()
        if isinstance(item, str):  # INTERRUPT
            return stream.Interrupt()
        self._queued -= item.size
        self._fed += item.size
        if "lookahead_filled" not in self.t and self._fed >= (self._block + self._ctx_right) * SAMPLES_PER_FRAME:
            self.t["lookahead_filled"] = time.monotonic()  # the audio motion block 0 of the speech needs
        return stream.Audio(item)

    def _render_loop(self) -> None:
        from avatar_service.stream import IdleLimitReached, Interrupted

        self._fed = 0
        try:
            for out in self.pacer.run(self._receive, lambda: not self._stop.is_set()):
                if isinstance(out, Interrupted):
                    self.stats["interrupts"] += 1
                    continue
                self.stats["frames_rendered"] += 1
                self.stats["idle_frames"] = self.pacer.stats["idle_frames"]
                self.loop.call_soon_threadsafe(self._frames.put_nowait, (out.index, out.image, out.audio, out.idle))
        except IdleLimitReached as e:
            self.stats["error"] = str(e)
        except SessionClosed:
            pass
        except RuntimeError as e:
            if not self.loop.is_closed():  # else: the server stopped under us
                log.exception("live session %s failed", self.sid)
                self.stats["error"] = f"render failed: {type(e).__name__}: {e}"
        except Exception as e:  # report on the page, never kill the server
            log.exception("live session %s failed", self.sid)
            self.stats["error"] = f"render failed: {type(e).__name__}: {e}"
        finally:
            self.stats["state"] = "ended"
            if self._on_end:
                self._on_end()
            if not self.loop.is_closed():
                try:
                    self.loop.call_soon_threadsafe(self._frames.put_nowait, None)
                except RuntimeError:
                    pass

    def interrupt(self) -> None:
        """Barge-in: drop the audio and frames not yet shown; the avatar goes back to idle frames."""
        self._inbox.put("interrupt")

    def start(self, track) -> None:
        """Start the render thread and the consumer of the browser's audio ``track``."""
        self._thread.start()
        self._consumer = asyncio.ensure_future(self.consume(track))

    async def close(self) -> None:
        """Stop everything (idempotent): peer connection, consumer, and the render thread (within
        one frame's work; waited for up to 10 s, so its render slot is free when this returns)."""
        if self._ended:
            return
        self._ended = True
        self._stop.set()
        self._inbox.put(None)
        if self._consumer is not None:
            self._consumer.cancel()
        await self.pc.close()
        self.video.stop()
        self.audio_out.stop()
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self.stats["state"] = "closed"

    def snapshot(self) -> dict:
        """JSON-able statistics: counters, fps, and the first frame's stages in seconds.

        ``stages`` (seconds; None until reached): ``connect`` (offer received -> ICE connected),
        ``lookahead_wait`` (first input audio -> enough audio for motion block 0), ``motion`` (block 0's
        audio features + generator + postnet), ``nerf`` (frame 0's NeRF render), ``pacing_send``
        (frame 0 rendered -> handed to the video encoder), ``audio_in_to_frame_out``
        (first input audio -> frame 0 handed to the encoder: all of the above but ``connect``).
        """
        s = dict(self.stats)
        t = self.t
        s["lookahead_s"] = self.lookahead_s
        s["block"], s["nerf_right"] = self._block, self.session.latency.nerf_right
        s["size"] = self.size
        s["avatar"] = self.avatar.name

        def span(a, b):
            return round(t[b] - t[a], 4) if a in t and b in t else None

        s["stages"] = {
            "connect": span("created", "connected"),
            "lookahead_wait": span("audio_in", "lookahead_filled"),
            "motion": round(s["first_motion_s"], 4) if "first_motion_s" in s else None,
            "nerf": round(s["first_nerf_s"], 4) if "first_nerf_s" in s else None,
            "pacing_send": span("nerf_s", "first_frame_sent"),
            "audio_in_to_frame_out": span("audio_in", "first_frame_sent"),
        }
        if "nerf_s" in t and s["frames_rendered"] > 1:
            s["render_fps"] = round((s["frames_rendered"] - 1) / max(time.monotonic() - t["nerf_s"], 1e-6), 2)
        if "first_frame_sent" in t and s["frames_sent"] > 1:
            s["send_fps"] = round((s["frames_sent"] - 1) / max(time.monotonic() - t["first_frame_sent"], 1e-6), 2)
        for k in ("audio_in_s", "audio_dropped_s", "motion_s", "nerf_s", "first_motion_s", "first_nerf_s"):
            if k in s:
                s[k] = round(s[k], 3)
        return s


class FrameTrack(MediaStreamTrack):
    """Outgoing video: the session's frames, paced at 25 fps from a re-anchored origin; each
    release hands the frame's 40 ms of audio to the outgoing audio track."""

    kind = "video"

    def __init__(self, live: LiveSession):
        super().__init__()
        self.live = live
        self._t0 = None
        self._clock0 = time.monotonic()

    async def recv(self):
        item = await self.live._frames.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        i, frame, audio, idle = item
        now = time.monotonic()
        if self._t0 is None or now > self._t0 + i / FPS + 1.0 / FPS:
            self._t0 = now - i / FPS  # first frame, or late: re-anchor the playout
        due = self._t0 + i / FPS
        if due > now:
            await asyncio.sleep(due - now)
        self.live.audio_out.feed(audio)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = int((time.monotonic() - self._clock0) * 90000)
        vf.time_base = fractions.Fraction(1, 90000)
        st = self.live.stats
        st["frames_sent"] += 1
        if not idle:
            self.live.t.setdefault("first_frame_sent", time.monotonic())
        return vf


class PlayoutAudioTrack(MediaStreamTrack):
    """Outgoing audio: 20 ms packets of 16 kHz mono at real-time pace; the audio of the frames
    released so far, silence when there is none."""

    kind = "audio"
    PACKET = 320

    def __init__(self, live: LiveSession):
        super().__init__()
        self._buf: collections.deque = collections.deque()
        self._have = 0
        self._start = None
        self._n = 0

    def feed(self, pcm: np.ndarray) -> None:
        """Queue float32 16 kHz samples for playout."""
        self._buf.append(pcm)
        self._have += pcm.size

    def _take(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        k = 0
        while k < n and self._buf:
            head = self._buf[0]
            m = min(n - k, head.size)
            out[k : k + m] = head[:m]
            k += m
            if m == head.size:
                self._buf.popleft()
            else:
                self._buf[0] = head[m:]
        self._have -= k
        return out

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n * self.PACKET / AUDIO_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        pcm = np.clip(self._take(self.PACKET) * 32767.0, -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._n * self.PACKET
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._n += 1
        return frame


# ---- the app --------------------------------------------------------------------------------------
class WebApp:
    """The aiohttp application over a running gRPC servicer's store, jobs, cache and slots.

    Args:
        servicer: :class:`avatar_service.server.AvatarServicer` (store, cache, jobs, spool, limits, scrub).
        tokens: {token: scopes} (the gRPC server's).
        max_backlog_s: live sessions drop input audio beyond this much unrendered audio (seconds).
    """

    def __init__(self, servicer, tokens: dict[str, frozenset[str]], max_backlog_s: float = 2.0):
        self.servicer = servicer
        self.cfg = servicer.cfg
        self.max_backlog_s = max_backlog_s
        self.connect_timeout_s = 30.0  # a live session whose ICE does not connect by then is closed
        self.sessions: dict[str, LiveSession] = {}
        self._previews: dict[tuple[str, str], bytes] = {}
        limit = max(self.cfg.max_video_mb, self.cfg.max_message_mb) * (1 << 20)
        self.app = web.Application(middlewares=[_errors], client_max_size=limit)
        self.app[_TOKENS] = dict(tokens)
        self.app[_SERVICER] = servicer
        self.app[_WEB] = self
        r = self.app.router
        r.add_get("/", self.index)
        r.add_get("/favicon.ico", self.favicon)
        r.add_static("/static/", STATIC, show_index=False)
        r.add_get("/api/info", self.info)
        r.add_get("/api/avatars", self.avatars)
        r.add_get("/api/avatars/{name}/preview.png", self.preview)
        r.add_post("/api/render", self.render)
        r.add_post("/api/onboard", self.onboard)
        r.add_get("/api/jobs/{job_id}", self.job)
        r.add_post("/api/jobs/{job_id}/cancel", self.cancel_job)
        r.add_post("/api/webrtc/offer", self.offer)
        r.add_get("/api/webrtc/{sid}/stats", self.live_stats)
        r.add_post("/api/webrtc/{sid}/interrupt", self.live_interrupt)
        r.add_post("/api/webrtc/{sid}/close", self.live_close)
        self.app.on_shutdown.append(self._shutdown)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _shutdown(self, _app) -> None:
        for live in list(self.sessions.values()):
            await live.close()
        self.sessions.clear()

    # -- pages --
    async def index(self, request: web.Request) -> web.StreamResponse:
        """The console page."""
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def favicon(self, request: web.Request) -> web.Response:
        """No icon (204), so browsers do not log a 404."""
        return web.Response(status=204)

    async def info(self, request: web.Request) -> web.Response:
        """Server facts the page shows: device, limits, presets."""
        require(request, "render")
        from avatar.pipeline.onboard import PRESETS

        from avatar.runtime import resolve_device

        device = self.cfg.device or str(resolve_device())
        return web.json_response(
            {
                "device": device,
                "max_audio_s": self.cfg.max_audio_s,
                "max_video_mb": self.cfg.max_video_mb,
                "presets": list(PRESETS),
                "max_backlog_s": self.max_backlog_s,
                "fps": FPS,
            }
        )

    # -- avatars --
    async def avatars(self, request: web.Request) -> web.Response:
        """The store's avatars (broken bundles are skipped)."""
        require(request, "render")
        return web.json_response({"avatars": await self._run(self.servicer.store.list)})

    async def preview(self, request: web.Request) -> web.Response:
        """PNG of the avatar's first rendered frame (silence, mean head pose), cached per bundle."""
        require(request, "render")
        name = request.match_info["name"]
        info = await self._run(self._info, name)
        key = (name, info["created"])
        png = self._previews.get(key)
        if png is None:
            png = await self._run(self._render_preview, name)
            self._previews[key] = png
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    def _info(self, name: str) -> dict:
        from avatar.errors import AvatarNotFound
        from avatar.store import validate_name

        validate_name(name)
        if not self.servicer.store.exists(name):
            raise AvatarNotFound(f"no avatar named {name!r} on this server")
        return self.servicer.store.info(name)

    def _render_preview(self, name: str) -> bytes:
        from avatar.api import RenderOptions

        self.servicer._acquire_slot()
        try:
            av = self.servicer.cache.get(name)
            frames = av.render(np.zeros(SAMPLES_PER_FRAME, np.float32), RenderOptions(still=True, blink=False))
            return encode_png(next(iter(frames)))
        finally:
            self.servicer._release_slot()

    # -- render an uploaded audio file --
    async def render(self, request: web.Request) -> web.Response:
        """multipart ``avatar``, ``audio`` (any audio/video file), optional ``options`` (JSON) ->
        ``video/mp4`` (H.264 + the audio). Headers ``X-Frames``, ``X-Render-Fps``."""
        require(request, "render")
        fields, path = await _form(request, "audio", self.servicer.spool, self.cfg.max_message_mb << 20, "audio file")
        if path is None:
            raise NoAudio("no audio file uploaded; send it as the 'audio' field")
        out = path.with_suffix(".out.mp4")
        try:
            name = fields.get("avatar", "")
            await self._run(self._info, name)
            res = await self._run(self._render_mp4, name, path, out, fields.get("options"))
            body = out.read_bytes()
        finally:
            path.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
        return web.Response(
            body=body,
            content_type="video/mp4",
            headers={"X-Frames": str(res["frames"]), "X-Render-Fps": f"{res['render_fps']:.2f}"},
        )

    def _render_mp4(self, name: str, audio: Path, out: Path, raw_options) -> dict:
        from avatar.media import load_audio

        try:
            wav = load_audio(audio, sr=AUDIO_RATE, max_seconds=self.cfg.max_audio_s)
        except AvatarError as e:
            e.args = (str(e).replace(str(audio), "the uploaded audio"),)
            raise
        self.servicer._check_duration(len(wav))
        self.servicer._acquire_slot()
        try:
            av = self.servicer.cache.get(name)
            options = parse_options(raw_options, av.size)
            return av.render_to_mp4(wav, out, options, progress=False)
        finally:
            self.servicer._release_slot()

    # -- onboarding --
    async def onboard(self, request: web.Request) -> web.Response:
        """multipart ``name``, ``preset`` (default cpu-small), ``overwrite`` (``1``/``true``), ``video``
        -> the queued job (202)."""
        from avatar.pipeline.onboard import PRESETS
        from avatar.store import validate_name

        require(request, "onboard")
        fields, path = await _form(request, "video", self.servicer.spool, self.cfg.max_video_mb << 20, "video")
        try:
            if path is None:
                raise InvalidMedia("no video uploaded; send it as the 'video' field")
            name = validate_name(fields.get("name", ""))
            preset = fields.get("preset") or "cpu-small"
            if preset not in PRESETS:
                raise InvalidInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            overwrite = fields.get("overwrite", "").lower() in ("1", "true", "on", "yes")
            if self.servicer.store.exists(name) and not overwrite:
                raise OutputExists(f"avatar {name!r} already exists; tick overwrite or pick another name")
            job = self.servicer.jobs.submit(path, name, preset, overwrite)
        except BaseException:
            if path is not None:
                path.unlink(missing_ok=True)
            raise
        return web.json_response(job_dict(job, self.servicer.scrub), status=202)

    def _job(self, request):
        job = self.servicer.jobs.get(request.match_info["job_id"])
        if job is None:
            raise _http(web.HTTPNotFound, "no such onboarding job on this server")
        return job

    async def job(self, request: web.Request) -> web.Response:
        """The job's state, stage, progress (0..1) and message."""
        require(request, "onboard")
        return web.json_response(job_dict(self._job(request), self.servicer.scrub))

    async def cancel_job(self, request: web.Request) -> web.Response:
        """Cancel the job (queued: at once; running: cooperatively, then terminated)."""
        require(request, "onboard")
        self._job(request)
        return web.json_response(job_dict(self.servicer.jobs.cancel(request.match_info["job_id"]), self.servicer.scrub))

    # -- live WebRTC --
    async def offer(self, request: web.Request) -> web.Response:
        """JSON ``{avatar, sdp, type: "offer", options, block, nerf_right}`` with one audio track
        (sendrecv) and a video transceiver -> ``{sdp, type: "answer", session, lookahead_s, block,
        nerf_right, size}``. ``block`` (frames per motion block, 1..64) and ``nerf_right`` (frames of
        NeRF look-ahead, 0..W//2) are optional: null/absent = the defaults; smaller values lower the
        session's ``lookahead_s`` (seconds), as StreamConfig's fields of the same names.

        Raises (as JSON errors): 400 bad JSON/SDP/options/block/nerf_right, 404 unknown avatar, 429 no
        free render slot.
        """
        from avatar_service.server import stream_latency_args

        require(request, "render")
        try:
            body = await request.json()
            name, sdp = str(body["avatar"]), str(body["sdp"])
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput("send JSON {avatar, sdp, type: 'offer', options}") from e
        if body.get("type", "offer") != "offer" or "m=audio" not in sdp:
            raise InvalidInput("the offer must be an SDP offer with an audio track (the speech to animate)")
        await self._run(self._info, name)
        av = await self._run(self.servicer.cache.get, name)
        options = parse_options(body.get("options"), av.size)
        block, nerf_right = stream_latency_args(
            body.get("block"), body.get("nerf_right"), av.models.nerf.window, where="offer"
        )
        self.servicer._acquire_slot()
        sid = uuid.uuid4().hex[:12]
        released = threading.Event()

        def release():
            if not released.is_set():
                released.set()
                self.servicer._release_slot()

        loop = asyncio.get_running_loop()
        try:
            live = LiveSession(
                sid,
                av,
                options,
                loop,
                self.max_backlog_s,
                self.cfg.max_audio_s,
                on_end=release,
                max_idle_s=self.cfg.max_idle_s,
                block=block,
                nerf_right=nerf_right,
            )
        except BaseException:
            release()
            raise
        self.sessions[sid] = live
        pc = live.pc

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio" and live._consumer is None:
                live.start(track)

        @pc.on("connectionstatechange")
        async def on_state():
            live.stats["state"] = pc.connectionState if live.stats["state"] != "ended" else "ended"
            if pc.connectionState == "connected":
                live.t.setdefault("connected", time.monotonic())
            if pc.connectionState in ("failed", "closed"):
                await self._end(sid)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(live.audio_out)
            pc.addTrack(live.video)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as e:
            await self._end(sid)
            release()
            raise InvalidInput(f"cannot negotiate the WebRTC session: {e}") from e
        if live._consumer is None:  # no audio track was received
            await self._end(sid)
            release()
            raise InvalidInput("the offer carries no audio track; send microphone or file audio")
        log.info(
            "web live session %s: avatar %s, %d px, block %d, nerf_right %d, lookahead %.2f s",
            sid,
            name,
            live.size,
            live._block,
            live.session.latency.nerf_right,
            live.lookahead_s,
        )

        def unconnected():  # a browser that never completes ICE must not hold a render slot
            if sid in self.sessions and "connected" not in live.t:
                log.info("web live session %s: not connected within %.0f s; closing it", sid, self.connect_timeout_s)
                asyncio.ensure_future(self._end(sid))

        loop.call_later(self.connect_timeout_s, unconnected)
        return web.json_response(
            {
                "sdp": pc.localDescription.sdp,
                "type": pc.localDescription.type,
                "session": sid,
                "lookahead_s": live.lookahead_s,
                "block": live._block,
                "nerf_right": live.session.latency.nerf_right,
                "size": live.size,
            }
        )

    async def _end(self, sid: str) -> None:
        live = self.sessions.pop(sid, None)
        if live is not None:
            await live.close()

    def _live(self, request) -> LiveSession:
        live = self.sessions.get(request.match_info["sid"])
        if live is None:
            raise _http(web.HTTPNotFound, "no such live session (it ended)")
        return live

    async def live_stats(self, request: web.Request) -> web.Response:
        """The live session's statistics (:meth:`LiveSession.snapshot`)."""
        require(request, "render")
        return web.json_response(self._live(request).snapshot())

    async def live_interrupt(self, request: web.Request) -> web.Response:
        """Barge-in: drop the audio and frames not yet shown, back to idle frames; returns the statistics."""
        require(request, "render")
        live = self._live(request)
        live.interrupt()
        return web.json_response(live.snapshot())

    async def live_close(self, request: web.Request) -> web.Response:
        """End the live session; returns its last statistics."""
        require(request, "render")
        live = self._live(request)
        snap = live.snapshot()
        await self._end(live.sid)
        return web.json_response(snap)


class WebServer:
    """Runs :class:`WebApp` on its own thread and event loop, beside the gRPC server.

    Args:
        servicer: the gRPC server's :class:`avatar_service.server.AvatarServicer`.
        tokens: {token: scopes}. host: bind address (the gRPC host). port: TCP port (0 = OS-chosen).
        tls_cert / tls_key: PEM files (HTTPS; browsers allow the microphone only on HTTPS or localhost).

    Attributes (after :meth:`start`): ``port``, ``url``, ``app`` (the :class:`WebApp`).

    Raises:
        InvalidInput (from :meth:`start`): the port cannot be bound.
    """

    def __init__(
        self,
        servicer,
        tokens: dict[str, frozenset[str]],
        host: str = "127.0.0.1",
        port: int = 8080,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_backlog_s: float = 2.0,
    ):
        self.servicer, self.tokens, self.host, self.port = servicer, tokens, host, port
        self.tls = (tls_cert, tls_key) if tls_cert else None
        self.max_backlog_s = max_backlog_s
        self.app: WebApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's URL."""
        host = self.host.strip("[]")
        host = "127.0.0.1" if host in ("::", "0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> "WebServer":
        """Bind and serve in a background thread; returns self once listening."""
        from avatar_service.server import is_loopback

        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self.app = WebApp(self.servicer, self.tokens, self.max_backlog_s)
                self._runner = web.AppRunner(self.app.app, access_log=None)
                loop.run_until_complete(self._runner.setup())
                ctx = None
                if self.tls:
                    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    ctx.load_cert_chain(self.tls[0], self.tls[1])
                site = web.TCPSite(self._runner, self.host.strip("[]"), self.port, ssl_context=ctx)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="web", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise InvalidInput(
                f"cannot serve the web console on {self.host}:{self.port}: {failure[0]}; pick a free port with --web"
            ) from failure[0]
        if not self.tls and not is_loopback(self.host):
            log.warning(
                "SERVING THE WEB CONSOLE OVER PLAIN HTTP ON %s: tokens and media cross the network "
                "unencrypted, and browsers allow the microphone only on https or localhost",
                self.host,
            )
        log.info("web console on %s", self.url)
        return self

    def stop(self) -> None:
        """Close live sessions and stop serving (idempotent)."""
        if self._loop is None or self._thread is None:
            return
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop = None
