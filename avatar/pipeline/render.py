"""Render: driving audio -> features -> generator -> postnet -> landmarks -> NeRFs -> frames.

The same engine serves batch rendering (:meth:`Avatar.render`), real-time streaming
(:class:`StreamSession`, used by the gRPC ``StreamRender``) and notebooks.

Block scheme (why a stream equals a batch render bit for bit)
-------------------------------------------------------------
Motion is computed in fixed blocks of ``block`` video frames (default ``BLOCK`` = 8) aligned to
absolute frame 0. Block ``b`` (frames ``[b*block, (b+1)*block)``) is computed from the audio window
of frames ``[b*block - ctx_left, (b+1)*block + ctx_right)`` (zeros outside the audio), through the
feature extractor, the generator (latent noise indexed by absolute position, so neighbouring
windows share it) and the postnet; only the block's own frames are kept. The computation of a block
depends only on its audio window, never on how the audio arrived, so streaming and batch give
identical landmarks. Frame ``t`` is then rendered once the landmarks of ``t + nerf_right`` are
final (``nerf_right`` <= ``W//2``, ``W`` = the head NeRF's attention window), one frame per NeRF call.
The numbers are one :class:`Latency` per session, :func:`stream_latency`.

Latency
-------
A frame can be emitted once the audio up to the end of its block plus ``ctx_right`` frames (and
``nerf_right`` frames for the attention window) has arrived: a lookahead of at most
``(block + ctx_right + nerf_right) / 25`` s counted from the start of the frame's audio
(:attr:`Latency.lookahead_s`, :attr:`StreamSession.lookahead_s`).

``ctx_right`` is derived from the avatar's models (:func:`motion_right_frames`): the frames of
future audio that the last frame of a block really depends on = the generator's right receptive
field (:attr:`Audio2Motion.future_frames`: 12 for the symmetric TCN, ``future`` for one trained with
``avatar train-generator --future N``, 84 for the VAE + flow) + the postnet's
(:attr:`Postnet.future_frames`: 4 symmetric, 0 for a causal one), capped at ``CTX_RIGHT`` = 12, the
engine's historical budget. With the cap, every avatar whose models reach further than 12 frames
(all symmetric ones) keeps exactly its former 12-frame window, so its output is bit-identical to
before (lookahead 0.88 s with block 8 and W = 5; those models are truncated there, as they always
were). A chain that reaches less (a ``--future 4`` generator with its causal postnet: 4 + 0 = 4)
reads only what it needs, and a block's landmarks then equal those of one pass over the whole
audio on the right side (tested).

Low latency: ``block`` (frames per motion block) and ``nerf_right`` (frames of landmarks after a
frame that its NeRF attention window reads; the later ones are clamped to it, as at the end of
every clip) are per-session parameters of :class:`StreamSession` / :func:`render_frames`. With a
``--future 4`` avatar, ``block=2, nerf_right=1`` gives (2 + 4 + 1) / 25 = 0.28 s (``block=1`` with
the full centred window W = 5 too). Smaller blocks cost more compute per frame (each block runs the
motion models over its whole context window; CPU timings in docs/WEB.md). They are session
parameters, not :class:`RenderOptions` fields: those map 1:1 onto the ``avatar render`` flags and the
gRPC message. The service exposes them as ``StreamConfig.block`` / ``nerf_right`` (gRPC), the
``block`` / ``nerf_right`` of the web console's WebRTC offer and ``avatar client stream --block
--nerf-right`` (service/README.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from avatar.data.dataset import AUDIO_RATE, FPS, SAMPLES_PER_FRAME
from avatar.errors import AvatarError, InvalidInput, NoAudio
from avatar.face.landmarks import eye_aspect_ratio
from avatar.motion.emotion.schedule import MAX_STRENGTH
from avatar.motion.emotion.schedule import LABELS as EMOTIONS  # noqa: F401  (re-exported: the 8 MEAD labels)
from avatar.pipeline.controls import BlinkSchedule, PoseReplay, apply_eyes

log = logging.getLogger(__name__)

BLOCK = 8  # frames per motion block (0.32 s), the default of Latency.block
MAX_BLOCK = 64  # the largest block a session may choose (2.56 s)
CTX_LEFT = 24  # frames of audio context before a block (0.96 s); more when the generator's input
# transform looks further back (Audio2Motion.history_frames, e.g. a 2 s sliding CMN)
CTX_RIGHT = 12  # the most frames of audio context after a block the engine reads (0.48 s); models
# that depend on less future audio read less (motion_right_frames)


@dataclass(frozen=True)
class Latency:
    """How a session cuts the motion into blocks and how far ahead it reads (module docstring).

    Attributes:
        block: frames per motion block. ctx_left / ctx_right: frames of audio read before / after a
            block. nerf_right: frames of landmarks after a frame that its NeRF window reads.
    """

    block: int
    ctx_left: int
    ctx_right: int
    nerf_right: int

    @property
    def lookahead_frames(self) -> int:
        """Worst-case frames of audio needed from the start of a frame's audio until it can be emitted."""
        return self.block + self.ctx_right + self.nerf_right

    @property
    def lookahead_s(self) -> float:
        return self.lookahead_frames / FPS


def motion_right_frames(models) -> int:
    """Frames of future audio the landmarks of a frame depend on through the motion models: the
    generator's right receptive field + the postnet's (module docstring).

    The audio features add nothing: a model's last input for a future of ``F`` frames is the first
    feature frame of frame ``t + F`` (the stride-2 input convolution), whose audio ends inside that
    frame (log-mel: 480 samples after the frame's start, the 640-sample Hann window centred on 320;
    HuBERT's conv front end: 360). ``tests/test_stream_latency.py`` checks that the result is exact.
    """
    return int(models.generator.future_frames) + int(models.postnet.future_frames)


def stream_latency(models, block: int | None = None, nerf_right: int | None = None) -> Latency:
    """The :class:`Latency` of a session of ``models``.

    Args:
        block: frames per motion block (1 .. MAX_BLOCK; None = ``BLOCK``).
        nerf_right: frames of landmarks after a frame its NeRF window reads (0 .. W//2; None = W//2,
            the full centred window).
    Raises:
        InvalidInput: a value out of range.
    """
    half = int(models.nerf.window) // 2
    block = BLOCK if block is None else block
    nerf_right = half if nerf_right is None else nerf_right
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not (1 <= block <= MAX_BLOCK):
        raise InvalidInput(f"block must be an integer number of frames in [1, {MAX_BLOCK}], got {block!r}")
    if isinstance(nerf_right, bool) or not isinstance(nerf_right, (int, np.integer)) or not (0 <= nerf_right <= half):
        raise InvalidInput(
            f"nerf_right must be an integer in [0, {half}] (the NeRF window is {models.nerf.window} "
            f"frames), got {nerf_right!r}"
        )
    gen = models.generator
    return Latency(
        block=int(block),
        ctx_left=max(CTX_LEFT, gen.history_frames + gen.context_frames),
        ctx_right=min(CTX_RIGHT, motion_right_frames(models)),
        nerf_right=int(nerf_right),
    )


@dataclass
class RenderOptions:
    """User controls of one render (CLI flags, Python API and gRPC options map 1:1 onto these).

    Attributes:
        emotion: one of the 8 MEAD labels (``neutral`` = none).
        emotion_strength: 0 (none) .. 1 (typical) .. 1.5.
        emotion_video: optional reference video for an EAMM-style emotion (overrides ``emotion``).
        emotion_neutral_video: optional neutral video of the reference video's person: the expression
            is measured against it (else a neutral segment of the reference or a shared estimate).
        still: hold the mean head pose.
        blink: natural blinks on/off.
        blink_rate: blinks per minute (None = the person's own rate).
        temperature: audio2motion sampling temperature (0 = the mean motion).
        seed: RNG seed for motion sampling and blinks.
        size: output side in pixels (None = the avatar's trained size).
        head_speed: head-motion replay speed (EMO-style), > 0.
        head_amplitude: head-motion amplitude (SadTalker pose style), 0..2.
        lle_blend: GeneFace++ LLE projection blend onto the person's landmarks (0 = off).
    """

    emotion: str = "neutral"
    emotion_strength: float = 1.0
    emotion_video: str | None = None
    emotion_neutral_video: str | None = None
    still: bool = False
    blink: bool = True
    blink_rate: float | None = None
    temperature: float = 1.0
    seed: int = 0
    size: int | None = None
    head_speed: float = 1.0
    head_amplitude: float = 1.0
    lle_blend: float = 0.0

    def validate(self) -> None:
        """Raises :class:`InvalidInput` with an actionable message for any bad value."""
        # a label ("happy") or a schedule ("neutral,happy@2.0,sad@5.5"): labels switch at seconds
        from avatar.motion.emotion import parse_emotion_schedule

        parse_emotion_schedule(self.emotion)
        if not (0.0 <= self.emotion_strength <= MAX_STRENGTH):
            raise InvalidInput(f"emotion strength must be in [0, {MAX_STRENGTH}], got {self.emotion_strength}")
        if self.blink_rate is not None and not (0.0 <= self.blink_rate <= 60.0):
            raise InvalidInput(f"blink rate must be in [0, 60] per minute, got {self.blink_rate}")
        if not (0.0 <= self.temperature <= 2.0):
            raise InvalidInput(f"temperature must be in [0, 2], got {self.temperature}")
        if self.size is not None and not (32 <= self.size <= 1024):
            raise InvalidInput(f"output size must be in [32, 1024] pixels, got {self.size}")
        if not (0.05 <= self.head_speed <= 4.0):
            raise InvalidInput(f"head speed must be in [0.05, 4], got {self.head_speed}")
        if not (0.0 <= self.head_amplitude <= 2.0):
            raise InvalidInput(f"head amplitude must be in [0, 2], got {self.head_amplitude}")
        if not (0.0 <= self.lle_blend <= 1.0):
            raise InvalidInput(f"lle blend must be in [0, 1], got {self.lle_blend}")

    def updated(self, **changes) -> "RenderOptions":
        """A validated copy with ``changes`` applied; unknown names raise :class:`InvalidInput`."""
        names = {f.name for f in fields(self)}
        bad = set(changes) - names
        if bad:
            raise InvalidInput(f"unknown render option(s) {sorted(bad)}; valid: {sorted(names)}")
        new = replace(self, **changes)
        new.validate()
        return new


def n_frames_for(n_samples: int) -> int:
    """Video frames for ``n_samples`` of 16 kHz audio: round(n_samples / 640)."""
    return int(round(n_samples / SAMPLES_PER_FRAME))


def as_waveform(audio) -> np.ndarray:
    """Audio path or float32 16 kHz mono array -> validated float32 [T].

    Raises:
        NoAudio: empty audio. InvalidMedia: unreadable file. InvalidInput: wrong array shape/dtype.
    """
    from avatar.media import load_audio

    if isinstance(audio, (str, Path)):
        wav = load_audio(audio, sr=AUDIO_RATE)
    else:
        wav = np.asarray(audio)
        if wav.ndim != 1 or not np.issubdtype(wav.dtype, np.floating):
            raise InvalidInput(f"audio array must be float mono [T] at 16 kHz, got {wav.dtype} {wav.shape}")
        wav = wav.astype(np.float32)
    if wav.size == 0:
        raise NoAudio("the driving audio is empty; give a file with speech")
    if not np.isfinite(wav).all():
        raise InvalidInput("the driving audio contains NaN or Inf samples")
    return wav


class MotionEngine:
    """Block-wise audio -> canonical landmarks (lm3d) for one avatar and one set of options.

    Args:
        models: the loaded avatar (:class:`avatar.pipeline.bundle.AvatarModels`).
        options: validated :class:`RenderOptions`.
        latency: the block length and contexts (None = :func:`stream_latency` defaults).
    """

    def __init__(self, models, options: RenderOptions, latency: Latency | None = None):
        self.m = models
        self.options = options
        self.latency = latency or stream_latency(models)
        self._emotion = models.emotion_delta(options)
        self.blink_schedule = BlinkSchedule(
            (options.blink_rate if options.blink_rate is not None else models.blink.rate_per_min)
            if options.blink
            else 0.0,
            seed=options.seed,
        )

    def set_options(self, options: RenderOptions) -> None:
        """Change emotion controls for blocks not yet computed."""
        self.options = options
        self._emotion = self.m.emotion_delta(options)

    @property
    def ctx_left(self) -> int:
        """Frames of audio context before a block: CTX_LEFT, or more when the generator's input
        transform looks further back."""
        return self.latency.ctx_left

    def block(self, b: int, audio: np.ndarray, total_frames: int | None, offset: int = 0) -> np.ndarray:
        """Landmarks of block ``b``.

        Args:
            b: block index.
            audio: float32 [T] the audio received so far (must cover the block's right context,
                unless ``total_frames`` is known, i.e. the audio is complete).
            total_frames: number of frames of the complete audio, or None while streaming.
            offset: absolute sample index of ``audio[0]`` (a stream drops the samples no block needs
                any more); ``audio`` must start at or before the block's left context.
        Returns:
            float32 [k, 68, 3] canonical landmarks for frames [b*block, b*block + k), k <= block.
        """
        L = self.latency.block
        f0 = b * L
        f1 = f0 + L if total_frames is None else min(f0 + L, total_frames)
        ctx_left = self.ctx_left
        w0, w1 = f0 - ctx_left, f0 + L + self.latency.ctx_right
        window = np.zeros((w1 - w0) * SAMPLES_PER_FRAME, dtype=np.float32)
        s0, s1 = w0 * SAMPLES_PER_FRAME, w1 * SAMPLES_PER_FRAME
        a0, a1 = max(s0, offset), min(s1, offset + len(audio))
        if s0 < offset and offset > 0:
            raise RuntimeError(f"block {b} needs audio from sample {s0}, but the stream kept only from {offset}")
        if a1 > a0:
            window[a0 - s0 : a1 - s0] = audio[a0 - offset : a1 - offset]
        feats = self.m.features(window, n_frames=w1 - w0)
        expr = self.m.generator.predict(
            feats, temperature=self.options.temperature, seed=self.options.seed, start_frame=w0
        )
        expr = self.m.postnet.apply(expr)
        lm3d = self.m.lm3d_mean[None] + expr
        lm3d = lm3d[ctx_left : ctx_left + (f1 - f0)]
        if self.options.lle_blend > 0:
            lm3d = self.m.lle(lm3d, blend=self.options.lle_blend)
        frames = np.arange(f0, f1)
        # eyes first (the person's open eyes + blinks), then the emotion delta on top of them, so an
        # emotion's eye motion (widened eyes, squint) reaches the NeRF
        lm3d = apply_eyes(lm3d, self.blink_schedule(frames), self.m.blink)
        if self._emotion is not None:
            lm3d = self._emotion(lm3d, frames)
        if not np.isfinite(lm3d).all():
            raise AvatarError(
                f"non-finite landmarks in frames {f0}-{f1 - 1}; the avatar's motion models are "
                "corrupt: re-onboard it with --overwrite"
            )
        return lm3d.astype(np.float32)


class FrameEngine:
    """Landmarks + poses -> composited RGB frames through the head and torso NeRFs.

    ``nerf_right`` (default W//2): frames of landmarks after ``t`` that the attention window of frame
    ``t`` reads; its later positions repeat the landmarks of ``t + nerf_right`` (the clamping every
    clip's last frames get), so a frame is final ``nerf_right`` frames after its landmarks.
    """

    def __init__(self, models, options: RenderOptions, nerf_right: int | None = None):
        self.m = models
        self.size = options.size or models.size
        self.poses = PoseReplay(
            models.pose_track, speed=options.head_speed, amplitude=options.head_amplitude, still=options.still
        )
        self.window = models.nerf.window
        self.right = self.window // 2 if nerf_right is None else int(nerf_right)

    @torch.no_grad()
    def frame(self, t: int, lm3d: np.ndarray, n_final: int, pose: np.ndarray | None = None) -> np.ndarray:
        """Render frame ``t`` from the landmark track.

        Args:
            t: absolute frame index.
            lm3d: float32 [n, 68, 3] landmarks known so far (n > t).
            n_final: index bound used for edge clamping of the attention window (the track
                length once complete; the window of ``t`` must lie below it while streaming).
            pose: float32 [4, 4] head pose to use instead of the replayed track (evaluation on
                tracked poses).
        Returns:
            uint8 [S, S, 3] RGB.
        """
        half = self.window // 2
        idx = np.clip(np.arange(t - half, t - half + self.window), 0, min(n_final - 1, t + self.right))
        win = torch.from_numpy(np.ascontiguousarray(lm3d[idx]))[None]
        # np.array copies: a read-only pose (a memory-mapped dataset) would make torch.from_numpy warn
        pose = torch.from_numpy(self.poses(np.array([t])) if pose is None else np.array(pose, np.float32)[None])
        blink = torch.from_numpy(eye_aspect_ratio(lm3d[t : t + 1]))
        img = self.m.nerf.render(win, pose, blink=blink, size=self.size)
        return img[0].cpu().numpy()


class StreamSession:
    """Incremental renderer: push audio chunks, get frames as soon as they are final.

    Frames equal those of a batch :meth:`Avatar.render` with the same audio and options, for
    any chunking. ``push`` accepts float32 mono 16 kHz chunks of any size (including empty).

    Two ways to drive it: ``push(pcm)`` / ``finish()`` return every frame that became final; or
    ``feed(pcm)`` / ``end()`` append audio and :meth:`pull` yields the final frames one at a time,
    computing a motion block only when the next frame needs it (a caller can stop between frames:
    deadlines, cancellation, barge-in). Both give the same frames. A real-time caller can also pad
    silence (:meth:`silence_needed`, idle frames) and drop what was not shown yet (:meth:`rewind`).

    Args:
        models: the loaded avatar. options: :class:`RenderOptions`.
        block: frames per motion block (None = ``BLOCK``, 8); nerf_right: frames of landmarks after a
            frame that its NeRF window reads (None = W//2). Smaller values lower the lookahead; the
            right audio context comes from the models (:func:`stream_latency`, module docstring).

    Attributes:
        latency: the session's :class:`Latency`.
        lookahead_s: worst-case audio (seconds) needed from the start of a frame's audio before it is
            emitted: ``(block + ctx_right + nerf_right) / 25`` (0.88 s with the defaults).
        rewind_frames: how many already-emitted frames :meth:`rewind` must be able to go back over
            (the session keeps the audio their motion blocks read); 0 = keep only what later blocks read.
    """

    def __init__(self, models, options: RenderOptions, block: int | None = None, nerf_right: int | None = None):
        options.validate()
        self.m = models
        self.options = options
        self.latency = stream_latency(models, block, nerf_right)
        self.motion = MotionEngine(models, options, self.latency)
        self.frames = FrameEngine(models, options, self.latency.nerf_right)
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_offset = 0  # absolute sample index of self._audio[0] (older samples are dropped)
        self._lm3d = np.zeros((0, 68, 3), dtype=np.float32)
        self._next_block = 0
        self._total: int | None = None  # frame count once the audio ended
        self._keep: tuple[int, np.ndarray] | None = None  # (frame, landmarks) kept over a rewind
        self.frames_emitted = 0
        self.finished = False
        self.rewind_frames = 0
        self.lookahead_s = self.latency.lookahead_s

    @property
    def samples(self) -> int:
        """Audio samples (16 kHz) received so far, silence padding included."""
        return self._audio_offset + len(self._audio)

    def set_options(self, **changes) -> None:
        """Change options mid-stream (emotion, emotion_strength, lle_blend); applies to frames whose
        motion block is not yet computed.

        Raises:
            InvalidInput: unknown or bad values, or options that cannot change mid-stream.
        """
        allowed = {"emotion", "emotion_strength", "emotion_video", "emotion_neutral_video", "lle_blend"}
        fixed = set(changes) - allowed
        if fixed:
            raise InvalidInput(f"option(s) {sorted(fixed)} cannot change mid-stream; only {sorted(allowed)} can")
        self.options = self.options.updated(**changes)
        self.motion.set_options(self.options)

    def feed(self, pcm: np.ndarray) -> None:
        """Append audio (float32 16 kHz, any length) without computing anything; see :meth:`pull`."""
        if self.finished:
            raise InvalidInput("stream already finished")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size and not np.isfinite(pcm).all():
            raise InvalidInput("audio chunk contains NaN or Inf samples")
        if pcm.size:
            self._audio = np.concatenate([self._audio, pcm])

    def end(self) -> None:
        """End of audio (nothing computed yet; :meth:`pull` then yields the tail).

        Raises:
            NoAudio: no audio was pushed at all.
        """
        if self.samples == 0:
            raise NoAudio("no audio was received; send audio chunks before ending the stream")
        self.finished = True
        self._total = n_frames_for(self.samples)

    def pull(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, frame)`` for every frame final with the audio fed so far, one NeRF render
        per step; a motion block is computed only when the next frame needs it. Audio fed while the
        iterator is suspended is used by it; closing it early loses nothing."""
        lat = self.latency
        half, L = lat.nerf_right, lat.block
        while True:
            n = len(self._lm3d)
            total = self._total
            if total is not None and self._next_block * L >= total:
                self._lm3d = self._lm3d[:total]
                limit = bound = min(n, total)
            else:
                limit, bound = n - half, n
            if self.frames_emitted < limit:
                t = self.frames_emitted
                frame = self.frames.frame(t, self._lm3d, bound)
                self.frames_emitted = t + 1
                yield t, frame
            elif total is not None and self._next_block * L < total:
                self._compute_block(total)
            elif total is None and (self._next_block + 1) * L + lat.ctx_right <= self.samples / SAMPLES_PER_FRAME:
                self._compute_block(None)
            else:
                return

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Append audio; return the frames (uint8 [S,S,3]) that became final, in order."""
        self.feed(pcm)
        return [frame for _, frame in self.pull()]

    def finish(self) -> list[np.ndarray]:
        """End of audio: compute the tail and return the remaining frames.

        Raises:
            NoAudio: no audio was pushed at all.
        """
        self.end()
        return [frame for _, frame in self.pull()]

    def silence_needed(self) -> int:
        """Samples of silence to :meth:`feed` so that the next frame becomes final (idle frames while no
        audio arrives: the generator's resting face, blinks and the head track go on); 0 if it already is."""
        if self.finished:
            return 0
        L = self.latency.block
        need_lm = self.frames_emitted + self.latency.nerf_right + 1
        blocks = max(-(-need_lm // L), self._next_block)
        return max(0, (blocks * L + self.latency.ctx_right) * SAMPLES_PER_FRAME - self.samples)

    def rewind(self, frame: int) -> int:
        """Forget the audio from frame ``frame`` on (sample ``frame * 640``) and the frames emitted from
        it (barge-in): the next :meth:`pull` yields frame ``min(frame, emitted)`` again, computed from
        the audio fed after this call. Emitted frames before ``frame`` keep their landmarks (their
        motion block is recomputed, the shown values are kept). Returns the samples dropped.

        Raises:
            InvalidInput: ``frame`` is negative or further back than :attr:`rewind_frames`, or the
                stream finished.
        """
        if self.finished:
            raise InvalidInput("stream already finished")
        L = self.latency.block
        b = min(frame // L, self._next_block)
        need = (b * L - self.motion.ctx_left) * SAMPLES_PER_FRAME
        if frame < 0 or frame < self.frames_emitted - self.rewind_frames or max(need, 0) < self._audio_offset:
            raise InvalidInput(
                f"cannot rewind to frame {frame} (emitted {self.frames_emitted}, rewind_frames {self.rewind_frames})"
            )
        cut = frame * SAMPLES_PER_FRAME
        dropped = max(0, self.samples - cut)
        self._audio = self._audio[: max(0, cut - self._audio_offset)].copy()
        shown = min(frame, self.frames_emitted)
        self._keep = (shown, self._lm3d[b * L : shown].copy()) if shown > b * L else None
        self._lm3d = self._lm3d[: b * L]
        self._next_block = b
        self.frames_emitted = shown
        return dropped

    def _compute_block(self, total: int | None) -> None:
        L = self.latency.block
        lm = self.motion.block(self._next_block, self._audio, total, offset=self._audio_offset)
        if self._keep is not None:  # frames already shown before a rewind keep their landmarks
            frame, kept = self._keep
            if frame // L == self._next_block:
                lm = lm.copy()
                lm[: len(kept)] = kept[: len(lm)]
            self._keep = None
        self._lm3d = np.concatenate([self._lm3d, lm])
        self._next_block += 1
        # drop the samples no later block reads (a live session would otherwise grow without bound);
        # keep what a rewind over the last ``rewind_frames`` frames would read again
        oldest = self._next_block
        if self.rewind_frames:
            oldest = min(oldest, max(0, self.frames_emitted - self.rewind_frames) // L)
        keep_from = max(0, (oldest * L - self.motion.ctx_left) * SAMPLES_PER_FRAME)
        if keep_from - self._audio_offset >= SAMPLES_PER_FRAME * L:
            self._audio = self._audio[keep_from - self._audio_offset :].copy()
            self._audio_offset = keep_from

    def landmarks(self) -> np.ndarray:
        """float32 [n, 68, 3] canonical landmarks computed so far."""
        return self._lm3d


def landmarks_for_audio(models, audio, options: RenderOptions | None = None, block: int | None = None) -> np.ndarray:
    """The canonical landmark track (float32 [N, 68, 3]) the renderer would use for ``audio`` (with
    motion blocks of ``block`` frames, as :class:`StreamSession`)."""
    options = options or RenderOptions()
    options.validate()
    wav = as_waveform(audio)
    total = n_frames_for(len(wav))
    latency = stream_latency(models, block)
    engine = MotionEngine(models, options, latency)
    return np.concatenate([engine.block(b, wav, total) for b in range(-(-total // latency.block))])[:total]


def render_frames(
    models, audio, options: RenderOptions | None = None, block: int | None = None, nerf_right: int | None = None
) -> Iterator[np.ndarray]:
    """Lazily render all frames for ``audio`` (path or float32 16 kHz array).

    Yields uint8 [S, S, 3] RGB frames; their count is ``round(len(audio) / 640)``. Stopping the
    iteration stops the work. ``block`` / ``nerf_right``: as :class:`StreamSession` (a stream with
    the same values gives the same frames).
    """
    options = options or RenderOptions()
    options.validate()
    wav = as_waveform(audio)
    session = StreamSession(models, options, block=block, nerf_right=nerf_right)
    step = session.latency.block * SAMPLES_PER_FRAME
    for s in range(0, len(wav), step):  # one frame per step: a consumer that stops stops the work
        session.feed(wav[s : s + step])
        yield from (frame for _, frame in session.pull())
    session.end()
    yield from (frame for _, frame in session.pull())


def render_to_mp4(models, audio, out: str | Path, options: RenderOptions | None = None, progress: bool = True) -> dict:
    """Render ``audio`` and write an H.264 MP4 with the driving audio muxed in.

    A file's audio is muxed at its own sample rate and channels (a 48 kHz stereo input gives a
    48 kHz stereo MP4); an array is 16 kHz mono. The model always hears the 16 kHz mono version.

    Returns:
        dict with ``path``, ``frames``, ``seconds`` (audio duration), ``render_fps``.
    """
    from tqdm import tqdm

    from avatar.media import VideoWriter

    options = options or RenderOptions()
    options.validate()
    wav = as_waveform(audio)
    n = n_frames_for(len(wav))
    size = options.size or models.size
    mux, mux_rate = wav, AUDIO_RATE
    if isinstance(audio, (str, Path)):
        from avatar.media import load_audio_native

        mux, mux_rate = load_audio_native(audio)
    what = Path(audio).name if isinstance(audio, (str, Path)) else "audio"
    log.info("rendering %s: %d frames, ~%.1f s of audio, %d px -> %s", what, n, len(wav) / AUDIO_RATE, size, out)
    t0 = time.perf_counter()
    count = 0
    bar = None
    with VideoWriter(out, fps=FPS, size=(size, size), audio=mux, audio_rate=mux_rate) as writer:
        for frame in render_frames(models, wav, options):
            writer.write(frame)
            count += 1
            if bar is None:  # started after the first frame, whose warm-up made the first ETA read hours (issue 18)
                bar = tqdm(total=n, initial=count, unit="frame", desc="render", disable=not progress)
                log.debug("first frame after %.1f s (warm-up)", time.perf_counter() - t0)
            else:
                bar.update(1)
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    return {"path": str(out), "frames": count, "seconds": len(wav) / AUDIO_RATE, "render_fps": count / max(dt, 1e-9)}
