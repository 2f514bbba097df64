"""Emotion labels and time schedules (``"happy"`` or ``"neutral,happy@2.0,sad@5.5"``).

A schedule switches label at given seconds with a raised-cosine crossfade of :data:`CROSSFADE_S`;
weights are computed on absolute frame indices, so batch renders, block-wise rendering and gRPC
streams (per-chunk emotion changes) agree frame for frame.
"""

from __future__ import annotations

import re

import numpy as np

from avatar.data.dataset import FPS
from avatar.errors import InvalidInput

#: the 8 MEAD labels, in the order of the embedding table (avatar.pipeline.render.EMOTIONS is this tuple)
LABELS = ("neutral", "happy", "angry", "sad", "surprised", "disgusted", "fear", "contempt")
MAX_STRENGTH = 1.5
CROSSFADE_S = 0.3


def parse_emotion_schedule(text: str) -> list[tuple[str, float]]:
    """Parse ``"happy"`` or ``"neutral,happy@2.0,sad@5.5"`` into ``[(label, start_seconds), ...]``.

    The first entry may omit ``@t`` (starts at 0 s); later entries need strictly increasing times.
    A schedule whose first entry starts after 0 s gets a leading ``("neutral", 0.0)``.

    Raises:
        InvalidInput: unknown label, bad or non-increasing time.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"emotion must be a label or schedule like 'neutral,happy@2.0'; got {text!r}")
    out: list[tuple[str, float]] = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        m = re.fullmatch(r"([a-z]+)\s*(?:@\s*([0-9]*\.?[0-9]+)\s*s?)?", part.lower())
        if not m:
            raise InvalidInput(
                f"bad emotion schedule entry {part!r}; write LABEL or LABEL@SECONDS, e.g. 'neutral,happy@2.0'"
            )
        label, t = m.group(1), m.group(2)
        if label not in LABELS:
            raise InvalidInput(f"unknown emotion {label!r}; choose one of {', '.join(LABELS)}")
        if t is None and i > 0:
            raise InvalidInput(f"emotion schedule entry {part!r} needs a start time, e.g. '{label}@2.0'")
        start = 0.0 if t is None else float(t)
        if out and start <= out[-1][1]:
            raise InvalidInput(
                f"emotion schedule times must increase; {part!r} starts at {start} s, not after {out[-1][1]} s"
            )
        out.append((label, start))
    if out[0][1] > 0:
        out.insert(0, ("neutral", 0.0))
    return out


def schedule_weights(
    schedule: list[tuple[str, float]], frames: np.ndarray, fps: int = FPS, crossfade_s: float = CROSSFADE_S
) -> dict[str, np.ndarray]:
    """Per-label blend weights at absolute ``frames`` (int [K]) -> {label: float32 [K]}, summing to 1.

    A switch at ``t`` crossfades with a raised cosine over ``[t - crossfade_s/2, t + crossfade_s/2]``.
    """
    t = np.asarray(frames, np.float64) / fps
    k = len(t)
    w_seg = np.zeros((len(schedule), k))
    # progress of each switch j (0 before, 1 after)
    prog = [np.ones(k)]
    for _, start in schedule[1:]:
        u = np.clip((t - (start - crossfade_s / 2)) / crossfade_s, 0.0, 1.0) if crossfade_s > 0 else (t >= start) * 1.0
        prog.append(0.5 - 0.5 * np.cos(np.pi * u))
    prog.append(np.zeros(k))
    for j in range(len(schedule)):
        w_seg[j] = prog[j] - prog[j + 1] if j + 1 < len(prog) else prog[j]
    w_seg = np.clip(w_seg, 0.0, 1.0)
    out: dict[str, np.ndarray] = {}
    for (label, _), w in zip(schedule, w_seg):
        out[label] = out.get(label, np.zeros(k, np.float32)) + w.astype(np.float32)
    return out
