"""The gRPC renderer service (``avatar.v1.AvatarService``) over the Python API :mod:`avatar.api`.

Serving design (anchors: NVIDIA Audio2Face-3D's bidirectional audio->animation stream, LiveTalking):

- **Render**: decode the uploaded audio file (PyAV, any rate -> 16 kHz), check the duration limit,
  then stream ``Avatar.render`` frames as JPEG/PNG. Lazy: a cancelled or expired call stops the
  render at the next frame and drops its buffers.
- **StreamRender**: a reader thread queues client messages; the call's thread decodes PCM
  (streaming resampler) into events for the stream pacer (:mod:`avatar_service.stream`: frame timing,
  render-ahead queue, idle frames, barge-in), which drives :class:`avatar.api.StreamSession` one
  frame at a time. Latency = ``StreamSession.lookahead_s`` of audio after a frame (sent in the
  header; computed from the avatar's models and the session's ``StreamConfig.block`` / ``nerf_right``,
  :func:`stream_latency_args`) plus render time. Each frame carries its own 40 ms of audio.
- **Onboard**: the upload is spooled to disk, then :class:`avatar_service.jobs.JobManager` runs it in a
  spawned worker process.
- Errors: :class:`avatar.errors.AvatarError` subclasses map to their ``grpc_code``; anything else is
  INTERNAL with a request id to find the traceback in the log. A bad request never stops the server.
- Limits (:class:`ServerConfig`): message size, audio duration, concurrent render streams, idle
  stream timeout, send timeout, upload size, onboarding concurrency/queue, avatar LRU cache size.

Hostile-client hardening (each limit is enforced before the work it bounds):

- Audio files are decoded as a stream that stops at ``max_audio_s`` (a tiny FLAC can declare
  hours of silence), so a Render costs at most ``max_audio_s * 16000`` decoded samples.
- A response stream whose client stops reading is cancelled once one message has waited
  ``send_timeout_s`` to be sent (HTTP/2 flow control blocks the send), which frees its slot.
- The call deadline and cancellation are checked before every frame (a frame's NeRF render or a
  motion block is the largest unit of work after them); the requested ``size`` is capped at the
  avatar's native size.
- Error messages never carry server paths or the names of other tenants' avatars.
- Binding: 127.0.0.1 unless a host is given; plaintext on another address logs a loud warning;
  ``/metrics`` binds the same address as gRPC.
- Uploads are spooled under ``STORE/spool/<pid>-*`` and the spool of a dead server is removed at
  start-up; onboarding workers die with the server (:mod:`avatar_service.jobs`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import ipaddress
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from avatar.errors import AvatarError, AvatarNotFound, InvalidInput, InvalidMedia, NoAudio, OutputExists, ResourceLimit
from avatar.timebase import SAMPLES_PER_FRAME
from avatar_service import avatar_pb2 as pb
from avatar_service import avatar_pb2_grpc as pb_grpc
from avatar_service import jobs as jobs_mod
from avatar_service.auth import AuthInterceptor, bearer_token, token_id
from avatar_service.codec import SAMPLE_RATE, PcmDecoder, encode_frame, encode_pcm
from avatar_service.observability import ServiceMetrics, log_access

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AvatarService"].full_name
_STATE = {
    jobs_mod.QUEUED: pb.Job.STATE_QUEUED,
    jobs_mod.RUNNING: pb.Job.STATE_RUNNING,
    jobs_mod.SUCCEEDED: pb.Job.STATE_SUCCEEDED,
    jobs_mod.FAILED: pb.Job.STATE_FAILED,
    jobs_mod.CANCELLED: pb.Job.STATE_CANCELLED,
}


@dataclasses.dataclass
class ServerConfig:
    """Settings of ``avatar serve`` (``--config FILE`` JSON holds any of these; flags override).

    Attributes:
        store: avatar store directory. host/port: gRPC bind address (port 0 = OS-chosen); the
            default host is loopback only, ``[::]`` / ``0.0.0.0`` serve every interface.
        metrics_port: Prometheus ``/metrics`` HTTP port on the same host (None = off, 0 = OS-chosen).
        device: torch device for rendering (None = CUDA if available, else CPU).
        tls_cert / tls_key: PEM files; both or neither (plaintext).
        max_message_mb: largest gRPC message accepted (a Render request carries the audio file).
        max_audio_s: longest driving audio per Render / StreamRender, seconds.
        max_streams: Render + StreamRender calls at once; more -> RESOURCE_EXHAUSTED.
        idle_timeout_s: a StreamRender whose client sends no config (or, without idle frames, no message)
            for this long is ended (DEADLINE_EXCEEDED).
        max_idle_s: a StreamRender with idle frames that receives no audio for this long is ended
            (DEADLINE_EXCEEDED, "idle limit reached").
        send_timeout_s: a response message that cannot be sent for this long (the client stopped
            reading) cancels the call and frees its slot.
        cache_size: loaded avatars kept in memory (LRU).
        max_jobs / max_queued_jobs: onboarding jobs running at once / waiting.
        max_video_mb: largest onboarding upload.
        job_cancel_grace_s: seconds a cancelled onboarding worker gets before it is terminated.
        jobs: ``local`` (onboarding stages in worker processes here) or ``ray`` (as Ray tasks on a
            cluster, :mod:`avatar.pipeline.distributed`; the store must be on shared storage).
        ray_address: the Ray cluster for ``jobs="ray"`` (empty: ``$RAY_ADDRESS``, else a local instance).
    """

    store: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464
    device: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_mb: int = 64
    max_audio_s: float = 600.0
    max_streams: int = 8
    idle_timeout_s: float = 30.0
    max_idle_s: float = 600.0
    send_timeout_s: float = 30.0
    cache_size: int = 4
    max_jobs: int = 1
    max_queued_jobs: int = 16
    max_video_mb: int = 4096
    job_cancel_grace_s: float = 10.0
    jobs: str = "local"
    ray_address: str | None = None

    def validate(self) -> None:
        """Raises :class:`InvalidInput` on an unusable setting (including a ``device`` not present here)."""
        if not self.store:
            raise InvalidInput("no avatar store given: pass --store DIR (or set AVATAR_HOME)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInput("TLS needs both --tls-cert and --tls-key (PEM files)")
        from avatar.runtime import check_device

        check_device(self.device)
        for name in (
            "max_message_mb",
            "max_audio_s",
            "max_streams",
            "idle_timeout_s",
            "max_idle_s",
            "send_timeout_s",
            "cache_size",
            "max_jobs",
            "max_video_mb",
        ):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"server setting {name} must be > 0, got {getattr(self, name)}")
        if self.jobs not in ("local", "ray"):
            raise InvalidInput(f"jobs must be local or ray, got {self.jobs!r}")


class RpcFailure(Exception):
    """Ends the current RPC with ``code`` (a grpc.StatusCode) and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class AvatarCache:
    """Bounded LRU of loaded :class:`avatar.api.Avatar` objects (thread-safe; one load per name at a time).

    Args:
        store_root: avatar store directory. size: avatars kept. device: torch device.
    """

    def __init__(self, store_root: str | Path, size: int, device: str | None):
        from avatar.store import AvatarStore

        self.store = AvatarStore(store_root)
        self.size = size
        self.device = device
        self._items: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, name: str):
        """The loaded avatar ``name``.

        Raises:
            InvalidInput (bad name), AvatarNotFound, BundleCorrupt.
        """
        from avatar import api
        from avatar.store import validate_name

        validate_name(name)
        if not self.store.exists(name):
            raise AvatarNotFound(f"no avatar named {name!r} on this server; ListAvatars shows the available ones")
        with self._lock:
            if name in self._items:
                self._items.move_to_end(name)
                return self._items[name]
            name_lock = self._loading.setdefault(name, threading.Lock())
        with name_lock:
            with self._lock:
                if name in self._items:
                    return self._items[name]
            t0 = time.monotonic()
            av = api.load(name, self.store, device=self.device)
            log.info("loaded avatar %s in %.2f s", name, time.monotonic() - t0)
            with self._lock:
                self._items[name] = av
                while len(self._items) > self.size:
                    old, _ = self._items.popitem(last=False)
                    log.info("evicted avatar %s from the cache", old)
            return av

    def evict(self, name: str) -> None:
        """Drop ``name`` (after it was re-onboarded) so the next request loads the new bundle."""
        with self._lock:
            self._items.pop(name, None)

    def names(self) -> list[str]:
        """Names currently loaded, least recently used first."""
        with self._lock:
            return list(self._items)


def render_options(msg: pb.RenderOptions):
    """proto RenderOptions -> validated :class:`avatar.api.RenderOptions` (unset optionals = defaults).

    Raises:
        InvalidInput: a value out of range.
    """
    from avatar.api import RenderOptions

    kw = {"still": msg.still, "seed": int(msg.seed), "size": msg.size or None}
    if msg.emotion:
        kw["emotion"] = msg.emotion
    for name in ("emotion_strength", "blink", "blink_rate", "temperature", "head_speed", "head_amplitude", "lle_blend"):
        if msg.HasField(name):
            kw[name] = getattr(msg, name)
    opts = RenderOptions(**kw)
    opts.validate()
    return opts


def cap_size(options, native: int):
    """``options`` with ``size`` capped at the avatar's ``native`` size (rendering above it costs
    quadratically more and adds no detail)."""
    if options.size is not None and options.size > native:
        return options.updated(size=native)
    return options


def stream_latency_args(
    block, nerf_right, nerf_window: int | None = None, where: str = "StreamConfig"
) -> tuple[int | None, int | None]:
    """A client's low-latency session settings -> the ``block`` / ``nerf_right`` arguments of
    :class:`avatar.api.StreamSession` (None = the library default).

    Args:
        block: frames per motion block (1 .. ``MAX_BLOCK`` = 64); None or 0 = the default (8 frames).
        nerf_right: frames of landmarks after a frame that its NeRF attention window reads
            (0 .. ``nerf_window // 2``); None = the default (``nerf_window // 2``, the full centred window).
        nerf_window: the avatar's NeRF attention window, frames (None: the upper bound of
            ``nerf_right`` is left to :class:`StreamSession`).
        where: the message that carried them, for the error messages (``StreamConfig``: the proto
            message; ``offer``: the web console's JSON offer).

    Returns:
        ``(block, nerf_right)``, each an int or None.

    Raises:
        InvalidInput: not an integer, or out of range (the message names the valid range and the default).
    """
    from avatar.pipeline.render import BLOCK, MAX_BLOCK

    def integer(name, value):
        if value is None or isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return value
        raise InvalidInput(f"{where}.{name} must be an integer number of frames, got {value!r}")

    block, nerf_right = integer("block", block), integer("nerf_right", nerf_right)
    if block is not None and not 0 <= block <= MAX_BLOCK:
        raise InvalidInput(
            f"{where}.block must be 1..{MAX_BLOCK} frames per motion block (0 or unset = the default, "
            f"{BLOCK}), got {block}; smaller blocks lower the lookahead"
        )
    half = None if nerf_window is None else int(nerf_window) // 2
    if nerf_right is not None and not (0 <= nerf_right and (half is None or nerf_right <= half)):
        limit = ">= 0" if half is None else f"0..{half} for this avatar (its NeRF window is {nerf_window} frames)"
        raise InvalidInput(
            f"{where}.nerf_right (frames of NeRF look-ahead) must be {limit}, got {nerf_right}; "
            "unset = the full centred window"
        )
    return (int(block) or None) if block is not None else None, None if nerf_right is None else int(nerf_right)


def open_stream(av, options, block: int | None = None, nerf_right: int | None = None):
    """A :class:`avatar.api.StreamSession` of the loaded avatar ``av`` with ``block`` frames per motion
    block and ``nerf_right`` frames of NeRF look-ahead (None = the library defaults; validate a client's
    values with :func:`stream_latency_args` first). Its ``lookahead_s`` (seconds) is computed from the
    avatar's models and these two values.

    Raises:
        InvalidInput: bad options, or ``block`` / ``nerf_right`` out of range.
    """
    if block is None and nerf_right is None:
        return av.stream(options)
    from avatar.api import RenderOptions, StreamSession

    return StreamSession(av.models, options or RenderOptions(), block=block, nerf_right=nerf_right)


def upload_suffix(filename: str) -> str:
    """A safe file suffix for a spooled upload from a client-given file name: ``.`` + up to 7
    letters/digits of its extension, else ``.mp4`` (NUL bytes, separators or odd characters never
    reach the file system)."""
    m = re.fullmatch(r".*(\.[A-Za-z0-9]{1,7})", filename or "", flags=re.DOTALL)
    return m.group(1).lower() if m else ".mp4"


def make_spool(store: str | Path) -> Path:
    """Create this server's upload spool ``STORE/spool/<pid>-XXXX`` (or under the temp dir if the
    store is read-only), after removing the spools of servers that are no longer running.

    Returns:
        the new spool directory (mode 0700).
    """
    from avatar.atomic import pid_alive

    for root in (Path(store) / "spool", Path(tempfile.gettempdir()) / "avatar-spool"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            spool = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        except OSError:
            continue
        for old in root.iterdir():
            pid = old.name.split("-", 1)[0]
            if old != spool and pid.isdigit() and not pid_alive(int(pid)):
                log.info("removing the upload spool of a stopped server: %s", old.name)
                shutil.rmtree(old, ignore_errors=True)
        return spool
    raise InvalidInput("cannot create an upload spool in the store or the temp dir; check their permissions")


def avatar_info_msg(info: dict) -> pb.AvatarInfo:
    """Store/Avatar info dict -> proto AvatarInfo."""
    return pb.AvatarInfo(
        name=info["name"],
        size=int(info["size"]),
        fps=float(info["fps"]),
        created=str(info.get("created", "")),
        metrics={k: float(v) for k, v in (info.get("metrics") or {}).items()},
    )


def job_msg(job: jobs_mod.JobRecord, scrub=lambda text: text) -> pb.Job:
    """JobRecord -> proto Job; ``scrub`` removes server paths from its message and error."""
    return pb.Job(
        job_id=job.job_id,
        avatar=job.avatar,
        state=_STATE[job.state],
        stage=job.stage,
        progress=job.progress,
        message=scrub(job.message),
        error_code=job.error_code,
        error=scrub(job.error),
        created_unix=job.created_unix,
        started_unix=job.started_unix,
        finished_unix=job.finished_unix,
        queue_position=job.queue_position,
    )


@dataclasses.dataclass
class _Call:
    """Per-RPC bookkeeping for logs and metrics."""

    method: str
    request_id: str
    fields: dict = dataclasses.field(default_factory=dict)
    frames: int = 0


def _rpc(fn):
    """Wrap a servicer method: request id, error -> status mapping, access log, metrics.

    The wrapped method gets an extra ``call`` argument (:class:`_Call`).
    """
    method = fn.__name__

    def start(self, context):
        call = _Call(method, uuid.uuid4().hex[:12])
        try:
            context.send_initial_metadata((("x-request-id", call.request_id),))
        except ValueError:  # metadata already sent
            pass
        return call, time.monotonic()

    def fail(self, context, call, e):
        if isinstance(e, RpcFailure):
            code, msg = e.code, self.scrub(str(e))
        elif isinstance(e, AvatarError):
            code, msg = grpc.StatusCode[e.grpc_code], self.scrub(str(e))
        else:
            log.exception("request %s (%s) failed", call.request_id, method)
            code, msg = grpc.StatusCode.INTERNAL, f"internal error; quote request id {call.request_id} to the operator"
        call.fields["code"] = code.name
        context.abort(code, msg)

    def finish(self, context, call, t0):
        code = call.fields.get("code")
        if code is None:
            if context.is_active():
                code = "OK"
            else:
                remaining = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        md = dict(context.invocation_metadata() or ())
        tok = bearer_token(context.invocation_metadata())
        fields = {
            "method": method,
            "request_id": call.request_id,
            "code": code,
            "peer": context.peer(),
            "token": token_id(tok) if tok else "",
            "duration_s": round(time.monotonic() - t0, 4),
            "user_agent": md.get("user-agent", ""),
        }
        if call.frames:
            fields["frames"] = call.frames
        fields.update(call.fields)
        fields["code"] = code
        log_access(fields)
        self.metrics.requests.labels(method, code).inc()

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream_wrapper(self, request, context):
            call, t0 = start(self, context)
            responses = fn(self, request, context, call)
            try:
                for response in responses:
                    # the send of a yielded message blocks while the client does not read (HTTP/2
                    # flow control); the watchdog cancels the call if that lasts send_timeout_s
                    key = self.send_watch.begin(context, call)
                    try:
                        yield response
                    finally:
                        self.send_watch.end(key)
            except GeneratorExit:
                raise
            except Exception as e:
                if call.fields.get("code"):  # context.abort already called
                    raise
                fail(self, context, call, e)
            finally:
                responses.close()  # runs the method's own cleanup (slot release) now
                finish(self, context, call, t0)

        return stream_wrapper

    @functools.wraps(fn)
    def unary_wrapper(self, request, context):
        call, t0 = start(self, context)
        try:
            return fn(self, request, context, call)
        except Exception as e:
            if call.fields.get("code"):
                raise
            fail(self, context, call, e)
        finally:
            finish(self, context, call, t0)

    return unary_wrapper


_END, _BROKEN = object(), object()


def check_deadline(context) -> None:
    """Raise :class:`RpcFailure` (DEADLINE_EXCEEDED) once the call's deadline has passed.

    Called between frames, so an expired render stops within one frame's work.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed; the render was stopped")


class SendWatchdog:
    """Cancels calls whose yielded response message has waited more than ``timeout_s`` to be sent.

    A server-streaming handler's thread blocks in gRPC's send while the client's HTTP/2 flow-control
    window is full, i.e. when the client stopped reading; without this the call (and its render
    slot) would be held until the client disconnects. One daemon thread checks every
    ``min(0.25, timeout_s / 4)`` seconds; a cancelled call's handler is then closed by gRPC, which
    runs its cleanup.

    Args:
        timeout_s: seconds one message may wait to be sent.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = float(timeout_s)
        self._waiting: dict[int, tuple[float, object, _Call]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="send-watchdog", daemon=True)
        self._thread.start()

    def begin(self, context, call: "_Call") -> int:
        """Register a message about to be sent; returns the key for :meth:`end`."""
        with self._lock:
            self._next += 1
            self._waiting[self._next] = (time.monotonic(), context, call)
            return self._next

    def end(self, key: int) -> None:
        """The message was sent (or the call ended)."""
        with self._lock:
            self._waiting.pop(key, None)

    def close(self) -> None:
        """Stop the watchdog thread."""
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        period = min(0.25, self.timeout_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                late = [(k, v) for k, v in self._waiting.items() if now - v[0] > self.timeout_s]
                for k, _ in late:
                    del self._waiting[k]
            for _, (since, context, call) in late:
                call.fields["code"] = "CANCELLED"
                call.fields["send_timeout_s"] = round(now - since, 2)
                log.warning(
                    "request %s (%s): the client read nothing for %.1f s; cancelling the call",
                    call.request_id,
                    call.method,
                    now - since,
                )
                context.cancel()


class AvatarServicer(pb_grpc.AvatarServiceServicer):
    """Implements ``avatar.v1.AvatarService`` (see proto/avatar/v1/avatar.proto)."""

    def __init__(self, cfg: ServerConfig, metrics: ServiceMetrics):
        from avatar.store import AvatarStore

        self.cfg = cfg
        self.metrics = metrics
        self.store = AvatarStore(cfg.store)
        for path in self.store.clean_stale():
            log.info("removed stale %s", path.name)
        self.cache = AvatarCache(cfg.store, cfg.cache_size, cfg.device)
        self._slots = threading.BoundedSemaphore(cfg.max_streams)
        self.send_watch = SendWatchdog(cfg.send_timeout_s)
        self.spool = make_spool(cfg.store)
        self._hide = sorted(
            {str(p) for p in (self.spool, Path(cfg.store), Path(cfg.store).resolve(), Path(tempfile.gettempdir()))},
            key=len,
            reverse=True,
        )
        self.jobs = jobs_mod.JobManager(
            cfg.store,
            max_running=cfg.max_jobs,
            max_queued=cfg.max_queued_jobs,
            cancel_grace_s=cfg.job_cancel_grace_s,
            on_change=self._job_changed,
            on_success=self.cache.evict,
            backend=cfg.jobs,
            ray_address=cfg.ray_address,
        )

    def close(self) -> None:
        """Stop onboarding workers and remove spooled uploads."""
        self.jobs.close()
        self.send_watch.close()
        shutil.rmtree(self.spool, ignore_errors=True)

    def scrub(self, message: str) -> str:
        """``message`` without the server's paths (store, spool, temp dir), for clients."""
        for path in self._hide:
            message = message.replace(path, "<server>")
        return message

    # ---- helpers ------------------------------------------------------------------------------
    def _job_changed(self, _job) -> None:
        for state, n in self.jobs.counts().items():
            self.metrics.jobs.labels(state).set(n)

    def _acquire_slot(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise ResourceLimit(f"the server is already running {self.cfg.max_streams} renders; retry shortly")
        self.metrics.active_streams.inc()

    def _release_slot(self) -> None:
        self.metrics.active_streams.dec()
        self._slots.release()

    def _check_duration(self, n_samples: int) -> None:
        if n_samples > self.cfg.max_audio_s * SAMPLE_RATE:
            raise ResourceLimit(
                f"audio longer than this server's limit of {self.cfg.max_audio_s:.0f} s; split it into shorter requests"
            )

    def _frame_msg(self, index: int, frame: np.ndarray, enc: pb.FrameEncoding, fps: float) -> pb.Frame:
        return pb.Frame(
            index=index,
            timestamp_s=index / fps,
            format=enc.format,
            image=encode_frame(frame, enc.format, enc.jpeg_quality),
        )

    def _decode_audio_file(self, data: bytes) -> np.ndarray:
        """Decode an uploaded audio file, stopping at ``max_audio_s`` (bounded memory).

        Raises:
            NoAudio / InvalidMedia (messages name "the uploaded audio", not a path), ResourceLimit.
        """
        from avatar.media import load_audio

        if not data:
            raise NoAudio("the request has no audio; put the audio file's bytes in RenderRequest.audio")
        with tempfile.NamedTemporaryFile(dir=self.spool, suffix=".audio") as f:
            f.write(data)
            f.flush()
            try:
                return load_audio(f.name, sr=SAMPLE_RATE, max_seconds=self.cfg.max_audio_s)
            except AvatarError as e:
                e.args = (str(e).replace(f.name, "the uploaded audio"),)
                raise

    # ---- avatars ------------------------------------------------------------------------------
    @_rpc
    def ListAvatars(self, request, context, call):
        return pb.ListAvatarsResponse(avatars=[avatar_info_msg(i) for i in self.store.list()])

    @_rpc
    def GetAvatar(self, request, context, call):
        from avatar.store import validate_name

        call.fields["avatar"] = request.name
        if not self.store.exists(validate_name(request.name)):
            raise AvatarNotFound(
                f"no avatar named {request.name!r} on this server; ListAvatars shows the available ones"
            )
        return avatar_info_msg(self.store.info(request.name))

    # ---- rendering ----------------------------------------------------------------------------
    @_rpc
    def Render(self, request, context, call):
        t0 = time.monotonic()
        call.fields["avatar"] = request.avatar
        self._acquire_slot()
        frames = None
        try:
            options = render_options(request.options)
            encode_frame(np.zeros((2, 2, 3), np.uint8), request.encoding.format, request.encoding.jpeg_quality)
            wav = self._decode_audio_file(request.audio)
            self._check_duration(len(wav))
            check_deadline(context)
            av = self.cache.get(request.avatar)
            check_deadline(context)
            options = cap_size(options, av.size)
            total = int(round(len(wav) / SAMPLES_PER_FRAME))
            size = options.size or av.size
            yield pb.RenderResponse(
                header=pb.RenderHeader(
                    request_id=call.request_id,
                    avatar=avatar_info_msg(av.info()),
                    size=size,
                    fps=av.fps,
                    total_frames=total,
                    audio_duration_s=len(wav) / SAMPLE_RATE,
                )
            )
            first = None
            frames = av.render(wav, options)
            for i, frame in enumerate(frames):
                if not context.is_active():
                    return
                check_deadline(context)
                msg = self._frame_msg(i, frame, request.encoding, av.fps)
                if first is None:
                    first = time.monotonic() - t0
                    self.metrics.first_frame.labels("Render").observe(first)
                yield pb.RenderResponse(frame=msg)
                call.frames += 1
                self.metrics.frames.labels("Render").inc()
            elapsed = time.monotonic() - t0
            if call.frames:
                self.metrics.render_fps.labels("Render").observe(call.frames / max(elapsed, 1e-6))
            yield pb.RenderResponse(
                summary=pb.RenderSummary(
                    frames=call.frames,
                    audio_duration_s=len(wav) / SAMPLE_RATE,
                    render_s=elapsed,
                    first_frame_latency_s=first or 0.0,
                )
            )
        finally:
            if frames is not None:
                frames.close()
            self._release_slot()

    @_rpc
    def StreamRender(self, request_iterator, context, call):
        inbox: queue.Queue = queue.Queue(maxsize=256)
        stop = threading.Event()

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    inbox.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def reader():
            try:
                for req in request_iterator:
                    if not offer(req):
                        return
                offer(_END)
            except Exception:  # the call was cancelled or broke
                offer(_BROKEN)

        threading.Thread(target=reader, name=f"stream-reader-{call.request_id}", daemon=True).start()
        try:
            yield from self._stream_session(inbox, context, call)
        finally:
            stop.set()

    def _stream_config(self, inbox, context):
        """The first message's StreamConfig (None if the call ended first).

        Raises:
            RpcFailure (DEADLINE_EXCEEDED): nothing within ``idle_timeout_s``. InvalidInput: another message first.
        """
        idle = self.cfg.idle_timeout_s
        deadline = time.monotonic() + idle
        while True:
            if not context.is_active():
                return None
            check_deadline(context)
            try:
                first = inbox.get(timeout=0.1)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no StreamConfig received within {idle:.0f} s")
        if first is _BROKEN:
            return None
        if first is _END:
            raise InvalidInput("the stream ended before a StreamConfig message; send the config first")
        if first.WhichOneof("kind") != "config":
            raise InvalidInput(f"the first StreamRender message must be 'config', got '{first.WhichOneof('kind')}'")
        return first.config

    def _stream_events(self, inbox, decoder: PcmDecoder, call):
        """``receive(timeout)`` for :class:`avatar_service.stream.Pacer`: client messages -> pacer events
        (PCM decoded to 16 kHz, the audio duration limit checked)."""
        from avatar_service import stream

        n_samples, ended = 0, False

        def receive(timeout: float):
            nonlocal n_samples, ended
            try:
                msg = inbox.get(timeout=timeout) if timeout > 0 else inbox.get_nowait()
            except queue.Empty:
                return None
            if msg is _BROKEN:
                return stream.Broken()
            kind = "end_of_audio" if msg is _END else msg.WhichOneof("kind")
            if ended and kind in ("end_of_audio", "options_update"):
                return None  # the request stream closing after EndOfAudio; late updates change nothing
            if ended and kind == "audio":
                raise InvalidInput("audio after end_of_audio; open a new stream for more speech")
            if kind == "audio":
                pcm = decoder.push(msg.audio.data)
                n_samples += pcm.size
                self._check_duration(n_samples)
                return stream.Audio(pcm)
            if kind == "options_update":
                upd = msg.options_update
                changes = {f: getattr(upd, f) for f in ("emotion", "emotion_strength") if upd.HasField(f)}
                if changes:
                    call.fields["option_updates"] = call.fields.get("option_updates", 0) + 1
                return stream.Options(changes)
            if kind == "interrupt":
                return stream.Interrupt()
            if kind == "end_of_audio":
                ended = True
                return stream.End(decoder.finish())
            raise InvalidInput(
                f"unexpected '{kind}' message after the config; send audio, options_update, interrupt or end_of_audio"
            )

        return receive

    def _stream_session(self, inbox, context, call):
        """One StreamRender session: config, then the pacer (:mod:`avatar_service.stream`) between messages and frames."""
        from avatar_service import stream

        cfg = self._stream_config(inbox, context)
        if cfg is None:
            return
        call.fields["avatar"] = cfg.avatar
        options = render_options(cfg.options)
        encode_frame(np.zeros((2, 2, 3), np.uint8), cfg.encoding.format, cfg.encoding.jpeg_quality)
        decoder = PcmDecoder(cfg.audio_format.encoding, cfg.audio_format.sample_rate)
        out_fmt = pb.AudioFormat()
        out_fmt.CopyFrom(cfg.output_audio if cfg.HasField("output_audio") else cfg.audio_format)
        out_fmt.sample_rate = PcmDecoder(out_fmt.encoding, out_fmt.sample_rate).sample_rate  # validates, 0 -> 16000
        realtime = cfg.realtime if cfg.HasField("realtime") else True
        idle = cfg.idle_frames if cfg.HasField("idle_frames") else realtime
        with_audio = cfg.frame_audio if cfg.HasField("frame_audio") else True
        block, nerf_right = stream_latency_args(
            cfg.block if cfg.HasField("block") else None, cfg.nerf_right if cfg.HasField("nerf_right") else None
        )
        self._acquire_slot()
        session = None
        try:
            av = self.cache.get(cfg.avatar)
            check_deadline(context)
            options = cap_size(options, av.size)
            if nerf_right is not None:  # its upper bound is the avatar's NeRF window
                stream_latency_args(block, nerf_right, av.models.nerf.window)
            session = open_stream(av, options, block, nerf_right)
            latency = getattr(session, "latency", None)
            if latency is not None:
                call.fields.update(block=latency.block, nerf_right=latency.nerf_right)
            fps = float(av.fps)
            pacer = stream.Pacer(
                session,
                stream.PacerConfig(
                    fps=fps,
                    realtime=realtime,
                    idle=idle,
                    out_rate=out_fmt.sample_rate,
                    idle_limit_s=self.cfg.max_idle_s,
                    message_timeout_s=self.cfg.idle_timeout_s,
                ),
            )
            yield pb.StreamRenderResponse(
                header=pb.StreamHeader(
                    request_id=call.request_id,
                    avatar=avatar_info_msg(av.info()),
                    size=options.size or av.size,
                    fps=fps,
                    lookahead_s=session.lookahead_s,
                    start_time_unix_ns=time.time_ns(),
                    output_audio=out_fmt,
                    max_idle_s=self.cfg.max_idle_s if idle else 0.0,
                    idle_frames=idle,
                    block=latency.block if latency is not None else 0,
                    nerf_right=latency.nerf_right if latency is not None else 0,
                )
            )

            def check() -> bool:  # before every frame's work
                if not context.is_active():
                    return False
                check_deadline(context)
                return True

            observed, t_run = False, time.monotonic()
            for out in pacer.run(self._stream_events(inbox, decoder, call), check):
                if isinstance(out, stream.Interrupted):
                    yield pb.StreamRenderResponse(
                        interrupted=pb.Interrupted(
                            next_frame=out.next_frame,
                            dropped_audio_s=out.dropped_audio_s,
                            dropped_frames=out.dropped_frames,
                        )
                    )
                    continue
                msg = self._frame_msg(out.index, out.image, cfg.encoding, fps)
                msg.idle = out.idle
                if with_audio:
                    msg.audio = encode_pcm(out.audio, out_fmt.encoding)
                yield pb.StreamRenderResponse(frame=msg)
                call.frames += 1
                self.metrics.frames.labels("StreamRender").inc()
                if not observed and pacer.stats["first_frame_latency_s"] is not None:
                    observed = True
                    self.metrics.first_frame.labels("StreamRender").observe(pacer.stats["first_frame_latency_s"])
            if pacer.broken or not context.is_active():
                return
            st = pacer.stats
            if call.frames:
                self.metrics.render_fps.labels("StreamRender").observe(
                    call.frames / max(time.monotonic() - t_run, 1e-6)
                )
            first_latency = st["first_frame_latency_s"] or 0.0
            call.fields.update(
                audio_s=round(st["audio_s"], 3),
                first_frame_latency_s=round(first_latency, 4),
                idle_frames=st["idle_frames"],
                interrupts=st["interrupts"],
            )
            yield pb.StreamRenderResponse(
                summary=pb.StreamSummary(
                    frames=call.frames,
                    audio_duration_s=st["audio_s"],
                    first_frame_latency_s=first_latency,
                    idle_frames=st["idle_frames"],
                    interrupts=st["interrupts"],
                )
            )
        finally:
            del session
            self._release_slot()

    # ---- onboarding ---------------------------------------------------------------------------
    @_rpc
    def Onboard(self, request_iterator, context, call):
        from avatar.pipeline.onboard import PRESETS
        from avatar.store import validate_name

        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "metadata":
            raise InvalidInput("the first Onboard message must be 'metadata' (name, preset), then video chunks")
        md = first.metadata
        name = validate_name(md.name)
        call.fields["avatar"] = name
        preset = md.preset or "cpu-small"
        if preset not in PRESETS:
            raise InvalidInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if self.store.exists(name) and not md.overwrite:
            raise OutputExists(f"avatar {name!r} already exists; set overwrite to replace it or pick another name")
        suffix = upload_suffix(md.filename)
        limit = self.cfg.max_video_mb * (1 << 20)
        fd, tmp = tempfile.mkstemp(dir=self.spool, suffix=suffix)
        path, size = Path(tmp), 0
        try:
            with open(fd, "wb") as f:
                for req in request_iterator:
                    if req.WhichOneof("kind") != "video_chunk":
                        raise InvalidInput("after the metadata, send only video_chunk messages")
                    size += len(req.video_chunk)
                    if size > limit:
                        raise ResourceLimit(
                            f"the video exceeds this server's upload limit of {self.cfg.max_video_mb} MB; "
                            "trim or re-encode it"
                        )
                    f.write(req.video_chunk)
            if size == 0:
                raise InvalidMedia("no video data was uploaded; send the file as video_chunk messages")
            call.fields["upload_bytes"] = size
            job = self.jobs.submit(path, name, preset, md.overwrite)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        call.fields["job_id"] = job.job_id
        return job_msg(job, self.scrub)

    def _job(self, job_id: str) -> jobs_mod.JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise RpcFailure(
                grpc.StatusCode.NOT_FOUND,
                f"no onboarding job {job_id!r} on this store (finished jobs are kept for 7 days; ListJobs shows them)",
            )
        return job

    @_rpc
    def GetJob(self, request, context, call):
        return job_msg(self._job(request.job_id), self.scrub)

    @_rpc
    def WatchJob(self, request, context, call):
        job = self._job(request.job_id)
        yield job_msg(job, self.scrub)
        while job.state not in jobs_mod.FINISHED:
            if not context.is_active():
                return
            new = self.jobs.wait_change(job.job_id, job.version, timeout=0.5)
            if new is None:  # another server's record, removed meanwhile
                return
            if new.version != job.version:
                job = new
                yield job_msg(job, self.scrub)

    @_rpc
    def CancelJob(self, request, context, call):
        self._job(request.job_id)
        return job_msg(self.jobs.cancel(request.job_id), self.scrub)

    @_rpc
    def ListJobs(self, request, context, call):
        if request.avatar:
            from avatar.store import validate_name

            validate_name(request.avatar)
        limit = min(max(request.limit, 0) or 100, 1000)
        return pb.ListJobsResponse(jobs=[job_msg(j, self.scrub) for j in self.jobs.list(request.avatar or None, limit)])


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts local connections (``localhost``, 127.0.0.0/8, ``::1``)."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def http_host(host: str) -> str:
    """The gRPC bind host as an address for the metrics HTTP server (``[::]`` -> ``::``)."""
    return host.strip("[]") or "127.0.0.1"


class AvatarServer:
    """A running gRPC server: AvatarService + health + reflection + auth + metrics.

    Args:
        cfg: :class:`ServerConfig`. tokens: {token: scopes} (see :mod:`avatar_service.auth`).

    Attributes (after :meth:`start`): ``port`` (bound gRPC port), ``metrics_port`` (or None).

    Raises:
        InvalidInput: bad config, unreadable TLS files, or the port cannot be bound.
    """

    def __init__(self, cfg: ServerConfig, tokens: dict[str, frozenset[str]]):
        cfg.validate()
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        self.servicer = AvatarServicer(cfg, self.metrics)
        workers = cfg.max_streams + 16
        max_bytes = cfg.max_message_mb * (1 << 20)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            interceptors=[AuthInterceptor(tokens, on_denied=self._denied)],
            options=[("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)],
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_AvatarServiceServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            try:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            except OSError as e:
                raise InvalidInput(f"cannot read TLS key/cert: {e}; pass readable PEM files") from e
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise InvalidInput(f"cannot listen on {address}; pick a free port with --port")
        self.metrics_port = None
        if not cfg.tls_cert and not is_loopback(cfg.host):
            log.warning(
                "SERVING PLAINTEXT gRPC ON %s, A NON-LOOPBACK ADDRESS: API tokens and media cross the network "
                "unencrypted; pass --tls-cert/--tls-key or bind 127.0.0.1 behind a TLS proxy",
                cfg.host,
            )

    def _denied(self, method: str, code: str, peer: str, token: str | None) -> None:
        """Metrics + access log of a call the auth interceptor refused (never the token itself)."""
        name = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(name, code).inc()
        log_access(
            {"method": name, "code": code, "peer": peer, "token": token_id(token) if token else "", "denied": True}
        )

    def start(self) -> "AvatarServer":
        """Start serving (and the metrics endpoint, on the gRPC host); returns self."""
        self._server.start()
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_port, host=http_host(self.cfg.host))
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving on %s:%d (metrics port %s, store %s, tls %s)",
            self.cfg.host,
            self.port,
            self.metrics_port,
            self.cfg.store,
            bool(self.cfg.tls_cert),
        )
        return self

    def stop(self, grace: float | None = 2.0) -> None:
        """Mark NOT_SERVING, end calls (``grace`` seconds), stop workers and the metrics endpoint."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.servicer.close()
        self.metrics.close()

    def wait(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()
