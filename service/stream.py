"""The stream pacer: frame timing, render-ahead queue, idle frames and barge-in of a real-time session.

Transport-free: the gRPC ``StreamRender`` (:mod:`avatar_service.server`) turns its messages into the events
below and the pacer's outputs into messages; nothing here knows about gRPC.

Events in (``receive(timeout)`` returns one, or None when nothing arrived in ``timeout`` seconds):
:class:`Audio` (float32 16 kHz), :class:`Options`, :class:`Interrupt`, :class:`End`, :class:`Broken`.
Out (yielded by :meth:`Pacer.run`): :class:`OutFrame` (index, image, the frame's own audio, idle flag)
and :class:`Interrupted`.

Timeline. The pacer feeds a :class:`avatar.api.StreamSession` one 16 kHz timeline: the client's audio,
plus silence where the client sent none while a frame was due (*idle frames*: the generator's resting
face, the blink schedule and the head track go on, because all three are indexed by the absolute
frame). Frame ``i`` always shows timeline samples ``[640 i, 640 (i + 1))`` and carries exactly those
samples (resampled to the output rate), so audio and video cannot drift apart. A client whose audio
never runs dry gets exactly the frames of a batch render of its audio (``stream == batch``).

- **Pacing** (``realtime``): frame ``i`` leaves at ``t0 + i / fps``; a frame that is ready more than one
  frame period late leaves at once and re-anchors ``t0`` (a playout buffer after a stall). Without
  ``realtime`` speech frames leave as fast as they are rendered; idle frames are always paced at fps.
- **Render-ahead**: at most ``max_ahead`` rendered frames wait to be sent; one NeRF frame is rendered
  per step, and ``check()`` (the call's deadline and cancellation) runs before every step.
- **Idle frames** (``idle``): when the next frame is due within ``idle_ahead_s``, no audio is waiting
  and none arrived for ``idle_grace_s`` (``start_grace_s`` before the first audio), the pacer feeds
  just enough silence for that frame (:meth:`StreamSession.silence_needed`). When audio arrives, the
  idle frames not yet sent are dropped and the speech starts at the next frame to be sent.
- **Barge-in** (:class:`Interrupt`): the frames not yet sent and all audio after them are dropped
  (:meth:`StreamSession.rewind`), the pacer answers :class:`Interrupted` and goes back to idle.
- **Idle limit**: with idle frames, no audio for ``idle_limit_s`` ends the session with
  :class:`IdleLimitReached`; without them, no event at all for ``message_timeout_s`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Iterator

import numpy as np

from avatar.errors import AvatarError

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 640


# ---- events in ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Audio:
    """Client audio, float32 mono 16 kHz (any length)."""

    pcm: np.ndarray


@dataclasses.dataclass
class Options:
    """Mid-stream option changes (:meth:`StreamSession.set_options`)."""

    changes: dict


@dataclasses.dataclass
class Interrupt:
    """Barge-in: drop the queued audio and frames, return to idle."""


@dataclasses.dataclass
class End:
    """End of audio; ``tail`` = the last samples (a resampler's flush)."""

    tail: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))


@dataclasses.dataclass
class Broken:
    """The client's side of the stream broke (cancelled or disconnected): stop quietly."""


# ---- out ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OutFrame:
    """One frame to send: ``image`` uint8 [S, S, 3] RGB; ``audio`` float32 at the output rate (its
    40 ms of the timeline); ``idle`` = every one of its samples is silence the pacer inserted."""

    index: int
    timestamp_s: float
    image: np.ndarray
    audio: np.ndarray
    idle: bool


@dataclasses.dataclass
class Interrupted:
    """Answer to :class:`Interrupt`: frames from ``next_frame`` on show the audio sent after it."""

    next_frame: int
    dropped_audio_s: float
    dropped_frames: int


class IdleLimitReached(AvatarError):
    """The session received no audio for the server's idle limit and was closed."""

    grpc_code = "DEADLINE_EXCEEDED"


@dataclasses.dataclass
class PacerConfig:
    """Settings of one :class:`Pacer`.

    Attributes:
        fps: frame rate. realtime: pace speech frames at fps (else as fast as rendered).
        idle: send idle frames while no audio arrives (else frames only come from audio).
        out_rate: sample rate of :attr:`OutFrame.audio`.
        max_ahead: rendered frames waiting to be sent, at most.
        idle_grace_s: an audio gap shorter than this is jitter, not silence.
        start_grace_s: before the first audio, idle frames start after this.
        idle_ahead_s: idle frames are computed this long before they are due (hides a motion
            block's compute; unsent idle frames are dropped when speech arrives, so this adds no latency).
        idle_limit_s: with ``idle``, no audio (and no speech frame sent) for this long ends the session.
        message_timeout_s: without ``idle``, no event for this long (nothing queued) ends the session.
    """

    fps: float = 25.0
    realtime: bool = True
    idle: bool = True
    out_rate: int = SAMPLE_RATE
    max_ahead: int = 25
    idle_grace_s: float = 0.2
    start_grace_s: float = 0.5
    idle_ahead_s: float = 0.25
    idle_limit_s: float = 600.0
    message_timeout_s: float = 30.0


class FrameAudio:
    """The 16 kHz timeline at the output rate, cut per frame: frame ``i`` gets output samples
    ``[round(i r / fps), round((i + 1) r / fps))`` (libsoxr streaming resampler; none at 16 kHz)."""

    def __init__(self, rate: int, fps: float = 25.0):
        self.rate, self.fps = int(rate), float(fps)
        self._rs = self._resampler()
        self._buf = np.zeros(0, np.float32)
        self._start = 0  # output-rate index of _buf[0]

    def _resampler(self):
        if self.rate == SAMPLE_RATE:
            return None
        import soxr

        return soxr.ResampleStream(SAMPLE_RATE, self.rate, 1, dtype="float32", quality="HQ")

    def _bound(self, i: int) -> int:
        return int(round(i * self.rate / self.fps))

    def add(self, pcm: np.ndarray, last: bool = False) -> None:
        """Append 16 kHz samples (``last``: flush the resampler)."""
        x = pcm if self._rs is None else self._rs.resample_chunk(np.asarray(pcm, np.float32), last=last)
        if len(x):
            self._buf = np.concatenate([self._buf, np.asarray(x, np.float32)])

    def take(self, i: int) -> np.ndarray:
        """Frame ``i``'s samples (zeros where the timeline has none); forgets everything before its end."""
        a, b = self._bound(i), self._bound(i + 1)
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self._start), min(b, self._start + len(self._buf))
        if hi > lo:
            out[lo - a : hi - a] = self._buf[lo - self._start : hi - self._start]
        drop = min(max(0, b - self._start), len(self._buf))
        self._buf, self._start = self._buf[drop:], self._start + drop
        return out

    def cut(self, frame: int) -> None:
        """Drop the timeline from frame ``frame`` on; what is added next starts there."""
        a = self._bound(frame)
        keep = a - self._start
        if keep < 0:
            self._buf, self._start = np.zeros(0, np.float32), a
        elif keep <= len(self._buf):
            self._buf = self._buf[:keep]
        else:  # the resampler still held some of it: silence keeps the alignment
            self._buf = np.concatenate([self._buf, np.zeros(keep - len(self._buf), np.float32)])
        self._rs = self._resampler()


class Pacer:
    """Drives one :class:`avatar.api.StreamSession` in real time (see the module docstring).

    Args:
        session: the engine. cfg: :class:`PacerConfig`. clock: monotonic seconds (tests pass a fake).

    Attributes:
        stats: ``frames`` sent, ``idle_frames`` sent, ``audio_s`` (client audio received),
            ``interrupts``, ``first_frame_latency_s`` (first client audio -> first frame showing it sent;
            None until then), ``interrupt_latency_s`` (last Interrupt -> next frame sent).
    """

    def __init__(self, session, cfg: PacerConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.s = session
        self.cfg = cfg or PacerConfig()
        self.clock = clock
        self.s.rewind_frames = self.cfg.max_ahead + 2
        self.audio = FrameAudio(self.cfg.out_rate, self.cfg.fps)
        self.pending: collections.deque[OutFrame] = collections.deque()
        self.stats: dict = {
            "frames": 0,
            "idle_frames": 0,
            "audio_s": 0.0,
            "interrupts": 0,
            "first_frame_latency_s": None,
            "interrupt_latency_s": None,
        }
        self._work = None  # the session's pull() iterator while it may yield frames
        self._starved = True  # the last pull() found nothing to render
        self._pads: list[list[int]] = []  # [start, end) timeline samples of inserted silence
        self._anchor: float | None = None
        self._sent = 0  # index of the next frame to send
        self._ended = False
        self._stop = False
        self._t_first_audio: float | None = None
        self._first_speech_frame = 0
        self._t_interrupt: float | None = None
        self._t_last_rx: float | None = None  # last client audio received
        self.broken = False

    # -- the loop --
    def run(self, receive: Callable[[float], object], check: Callable[[], bool]) -> Iterator[OutFrame | Interrupted]:
        """Yield frames and interrupt answers until the audio ended and every frame was sent.

        Args:
            receive: ``receive(timeout_s)`` -> the next event or None (0 = do not wait).
            check: called before every step; False stops the session quietly (the call was
                cancelled); it may raise (the call's deadline passed).
        Raises:
            IdleLimitReached, and whatever the session or ``receive`` raise.
        """
        cfg = self.cfg
        now = self.clock()
        self._t_start = self._last_audio = self._last_event = now
        while not self._stop:
            if not check():
                return
            now = self.clock()
            self._check_idle_limit(now)
            if self.pending and now >= self._due(self.pending[0], now):
                yield self._send(self.pending.popleft(), now)
                continue
            ev = receive(0.0)
            if ev is not None:
                out = self._handle(ev, now)
                if out is not None:
                    yield out
                continue
            if len(self.pending) < cfg.max_ahead and self._render_one():
                continue
            if self._should_pad(now):
                self._pad()
                continue
            if self._ended and not self.pending and self._starved:
                return
            ev = receive(self._wait(now))
            now = self.clock()
            if ev is not None:
                out = self._handle(ev, now)
                if out is not None:
                    yield out
        self._close_work()

    # -- steps --
    def _render_one(self) -> bool:
        """Render the next final frame into the queue; False when the session has none."""
        if self._work is None:
            if self._starved:
                return False
            self._work = self.s.pull()
        try:
            t, image = next(self._work)
        except StopIteration:
            self._work, self._starved = None, True
            return False
        self.pending.append(OutFrame(t, t / self.cfg.fps, image, None, self._is_idle(t)))
        return True

    def _due(self, f: OutFrame, now: float) -> float:
        if self._anchor is None or (not self.cfg.realtime and not f.idle):
            return now
        return self._anchor + f.index / self.cfg.fps

    def _send(self, f: OutFrame, now: float) -> OutFrame:
        fps = self.cfg.fps
        if self._anchor is None or not self.cfg.realtime or now > self._anchor + (f.index + 1) / fps:
            self._anchor = now - f.index / fps  # first frame, as fast as rendered, or late: re-anchor
        f.audio = self.audio.take(f.index)
        self._sent = f.index + 1
        st = self.stats
        st["frames"] += 1
        if f.idle:
            st["idle_frames"] += 1
        else:
            self._last_audio = max(self._last_audio, now)
        if (
            st["first_frame_latency_s"] is None
            and self._t_first_audio is not None
            and f.index >= self._first_speech_frame
        ):
            st["first_frame_latency_s"] = now - self._t_first_audio
        if self._t_interrupt is not None:
            st["interrupt_latency_s"], self._t_interrupt = now - self._t_interrupt, None
        while self._pads and self._pads[0][1] <= self._sent * SAMPLES_PER_FRAME:
            self._pads.pop(0)
        return f

    def _pad_time(self) -> float | None:
        """When idle silence is due: the next frame is due within ``idle_ahead_s`` and no audio came
        for the grace period (None: no idle frames now)."""
        if not self.cfg.idle or self._ended:
            return None
        if self._t_last_rx is None:
            t = self._t_start + self.cfg.start_grace_s
        else:
            t = self._t_last_rx + self.cfg.idle_grace_s
        if self._anchor is not None:
            t = max(t, self._anchor + self.s.frames_emitted / self.cfg.fps - self.cfg.idle_ahead_s)
        return t

    def _should_pad(self, now: float) -> bool:
        t = self._pad_time()
        return self._starved and t is not None and now >= t

    def _pad(self) -> None:
        n = self.s.silence_needed()
        if n <= 0:  # cannot happen while starved; do not spin
            self._starved = False
            return
        start = self.s.samples
        self._feed(np.zeros(n, np.float32))
        if self._pads and self._pads[-1][1] == start:
            self._pads[-1][1] = start + n
        else:
            self._pads.append([start, start + n])

    def _wait(self, now: float) -> float:
        wait = 0.1
        if self.pending:
            wait = min(wait, self._due(self.pending[0], now) - now)
        t = self._pad_time()
        if t is not None and self._starved:
            wait = min(wait, t - now)
        return max(wait, 0.0)

    def _check_idle_limit(self, now: float) -> None:
        if self._ended:
            return
        cfg = self.cfg
        if cfg.idle:
            quiet = now - self._last_audio
            if quiet > cfg.idle_limit_s:
                raise IdleLimitReached(
                    f"idle limit reached: no audio for {quiet:.0f} s (this server closes a stream after "
                    f"{cfg.idle_limit_s:.0f} s without audio); open a new stream when there is speech"
                )
        elif not self.pending and self._starved and now - self._last_event > cfg.message_timeout_s:
            raise IdleLimitReached(f"no audio or end_of_audio for {cfg.message_timeout_s:.0f} s; the stream was closed")

    # -- events --
    def _handle(self, ev, now: float):
        self._last_event = now
        if isinstance(ev, Audio):
            self._audio_in(ev.pcm, now)
        elif isinstance(ev, Options):
            if ev.changes:
                self.s.set_options(**ev.changes)
        elif isinstance(ev, Interrupt):
            return self._interrupt(now)
        elif isinstance(ev, End):
            if not self._ended:
                self._audio_in(ev.tail, now)
                self._drop_idle_tail()
                self._close_work()
                self.s.end()
                self.audio.add(np.zeros(0, np.float32), last=True)
                self._ended, self._starved = True, False
        elif isinstance(ev, Broken):
            self._stop = self.broken = True
        else:
            raise TypeError(f"unknown stream event {ev!r}")
        return None

    def _audio_in(self, pcm: np.ndarray, now: float) -> None:
        if self._ended or not pcm.size:
            return
        self._drop_idle_tail()  # speech after idle: the unsent idle frames go, the speech starts next
        if self._t_first_audio is None:
            self._t_first_audio = now
            self._first_speech_frame = self.s.samples // SAMPLES_PER_FRAME
        self._t_last_rx = self._last_audio = now
        self.stats["audio_s"] += pcm.size / SAMPLE_RATE
        self._feed(pcm)

    def _feed(self, pcm: np.ndarray) -> None:
        self.s.feed(pcm)
        self.audio.add(pcm)
        self._starved = False

    def _drop_idle_tail(self) -> None:
        """If the timeline ends in inserted silence, drop it from the next unsent frame on."""
        if not self._pads or self._pads[-1][1] != self.s.samples:
            return
        cut = max(self._sent, -(-self._pads[-1][0] // SAMPLES_PER_FRAME))
        if cut * SAMPLES_PER_FRAME < self.s.samples:
            self._rewind(cut)

    def _rewind(self, cut: int) -> tuple[int, int]:
        """Drop the frames from ``cut`` on and the audio after it; returns (frames dropped, samples dropped)."""
        self._close_work()
        dropped = self.s.rewind(cut)
        n = len(self.pending)
        self.pending = collections.deque(f for f in self.pending if f.index < cut)
        self.audio.cut(cut)
        edge = cut * SAMPLES_PER_FRAME
        self._pads = [[a, min(b, edge)] for a, b in self._pads if a < edge]
        self._starved = False
        return n - len(self.pending), dropped

    def _interrupt(self, now: float) -> Interrupted:
        self.stats["interrupts"] += 1
        self._t_interrupt = now
        self._last_audio = now
        self._t_last_rx = now - self.cfg.idle_grace_s  # back to idle at once
        cut = self._sent
        if self._ended:  # the audio had ended: nothing more to show
            n = len(self.pending)
            self.pending.clear()
            self._close_work()
            self._stop = True
            return Interrupted(cut, 0.0, n)
        frames, dropped = self._rewind(cut)
        return Interrupted(cut, dropped / SAMPLE_RATE, frames)

    def _close_work(self) -> None:
        if self._work is not None:
            self._work.close()
            self._work = None

    def _is_idle(self, t: int) -> bool:
        a, b = t * SAMPLES_PER_FRAME, (t + 1) * SAMPLES_PER_FRAME
        return any(s <= a and b <= e for s, e in self._pads)
