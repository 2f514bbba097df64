"""Training targets of the category emotion model (:mod:`.model`) from tracked speakers.

Targets are displacements from each speaker's *neutral* shape (:mod:`.neutral`): a recorded neutral
clip when the speaker has one, else the shared-statistics estimate (weighted by
``EmotionConfig.no_neutral_weight``: its identity error is part of the target). Symmetric labels are
trained on the left-right symmetric part of the displacement (tracking and head-pose asymmetries are
noise; contempt is unilateral and kept as is).
"""

from __future__ import annotations

import numpy as np

from avatar.errors import InvalidInput

from .geometry import ASYMMETRIC, MOVABLE_MASK, causal_windows, speech_features, symmetrize
from .neutral import NeutralStats, build_neutral_stats, estimate_neutral
from .schedule import LABELS
from .tracks import SpeakerTracks


def neutral_stats_from_tracks(tracks: list[SpeakerTracks]) -> NeutralStats:
    """Shared statistics from the speakers with a recorded neutral clip: their neutral shapes
    (identity) and the per-label mean of their displacements (expression directions).

    Raises:
        InvalidInput: no speaker has a neutral clip.
    """
    rec = [st for st in tracks if st.neutral_mean is not None]
    if not rec:
        raise InvalidInput(
            "training needs at least one speaker with a neutral clip (e.g. M030_front_neutral_level1_001.mp4)"
        )
    per_label = []
    for label in LABELS[1:]:
        ds = [np.concatenate(st.clips[label]).mean(0) - st.neutral_mean for st in rec if label in st.clips]
        if ds:
            per_label.append(np.mean(ds, 0) * MOVABLE_MASK)
    return build_neutral_stats([st.neutral_mean for st in rec], per_label)


def speaker_neutral(st: SpeakerTracks, stats: NeutralStats) -> tuple[np.ndarray, bool]:
    """(neutral float32 [68, 3], estimated?) of a speaker: the recorded neutral mean, else
    :func:`~.neutral.estimate_neutral` of the mean over all its clips."""
    if st.neutral_mean is not None:
        return st.neutral_mean, False
    return estimate_neutral(np.concatenate([lm for v in st.clips.values() for lm in v]).mean(0), stats), True


def speaker_displacements(st: SpeakerTracks, stats: NeutralStats, symmetric: bool = False) -> dict[str, np.ndarray]:
    """{label: float32 [68, 3]} mean displacement of each emotional label from the speaker's neutral
    (:func:`speaker_neutral`), movable points only; symmetric part when ``symmetric`` (except
    :data:`~.geometry.ASYMMETRIC` labels)."""
    neutral, _ = speaker_neutral(st, stats)
    out = {}
    for label, lms in st.clips.items():
        if label == "neutral":
            continue
        d = (np.concatenate(lms).mean(0) - neutral) * MOVABLE_MASK
        out[label] = (symmetrize(d) if symmetric and label not in ASYMMETRIC else d).astype(np.float32)
    return out


def build_training_set(tracks: list[SpeakerTracks], window: int, no_neutral_weight: float, symmetric: bool = True):
    """(speech windows float32 [M, window*|SPEECH|*3], labels int64 [M], targets float32 [M, 68, 3],
    weights float32 [M], :class:`~.neutral.NeutralStats`).

    Target = tracked lm3d minus the speaker's neutral (:func:`speaker_neutral`), zero at
    :data:`~.geometry.FROZEN` (EAMM-style neutral-relative displacement with the mouth interior
    masked), symmetric part for symmetric labels when ``symmetric``. Speech input = the clip's lip
    closure / chin landmarks relative to the clip's own mean (the speech motion, emotion offset
    removed), in a causal window. Each clip has total weight 1 (``no_neutral_weight`` for speakers
    without a neutral clip).

    Raises:
        InvalidInput: no speaker with a neutral clip, or no emotional clip.
    """
    stats = neutral_stats_from_tracks(tracks)
    xs, ys, ls, ws = [], [], [], []
    for st in tracks:
        neutral, estimated = speaker_neutral(st, stats)
        weight = no_neutral_weight if estimated else 1.0
        for label, lms in st.clips.items():
            if label == "neutral":
                continue
            for lm in lms:
                y = (lm - neutral[None]) * MOVABLE_MASK[None]
                if symmetric and label not in ASYMMETRIC:
                    y = symmetrize(y)
                xs.append(causal_windows(speech_features(lm, lm.mean(0)), window))
                ys.append(y)
                ls.append(np.full(len(lm), LABELS.index(label), np.int64))
                ws.append(np.full(len(lm), weight / len(lm), np.float32))  # each clip counts once
    if not xs:
        raise InvalidInput("training needs emotional (non-neutral) clips besides the neutral ones")
    return (
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ls),
        np.concatenate(ys).astype(np.float32),
        np.concatenate(ws),
        stats,
    )
