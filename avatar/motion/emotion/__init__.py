"""Emotion deltas on canonical landmarks: EAT-style category model and EAMM-style reference video.

Both produce an additive displacement on the canonical lm3d [68, 3] (identity-free, pose-free,
outer-eye-corner distance of the mean = 1; see :mod:`avatar.data.dataset`) that the render engine
adds after the postnet and before the NeRF (:class:`avatar.pipeline.render.MotionEngine`). Both
measure expression against the person's *neutral* shape (:mod:`.neutral`).

Modules, one role each:

* :mod:`.schedule` - labels, ``"neutral,happy@2.0,sad@5.5"`` schedules, raised-cosine crossfades;
* :mod:`.geometry` - landmark groups (frozen lips/jaw, movable, stable), retargeting, symmetry;
* :mod:`.tracks` - tracking + canonicalising labelled clips (MEAD naming), tracked-point cache;
* :mod:`.neutral` - the neutral reference (recorded clip, neutral segment, shared-statistics estimate);
* :mod:`.model` - the category model's network (EAT, Gan et al. ICCV 2023, Sec. 3.3-3.4), config, files;
* :mod:`.targets` - its training set: neutral-relative displacements of the tracked speakers;
* :mod:`.train` - its training: fit, per-label gain calibration, the whole run (``train_emotion``);
* :mod:`.evaluate` - its held-out metrics on one speaker and the two trivial baselines;
* :mod:`.reference` - the reference-video path (EAMM, Ji et al. SIGGRAPH 2022, Sec. 3.3);
* :mod:`.delta` - the render hook (schedule x model or reference, lip-sync mask, clamp).

Everything public is re-exported here (``from avatar.motion.emotion import build_emotion_delta``).
"""

from .delta import CLAMP_MARGIN, EmotionDelta, build_emotion_delta, clamp_to_reference, find_emotion_model
from .geometry import (
    ASYMMETRIC,
    EVAL_POINTS,
    FROZEN,
    LIP_CLOSURE,
    LOWER_JAW,
    MIRROR,
    MOVABLE,
    MOVABLE_MASK,
    REGIONS,
    SPEECH,
    STABLE,
    causal_windows,
    cosine,
    expression_range,
    mirror,
    norm,
    pingpong,
    range_scale,
    region_scale,
    similarity_fit,
    speech_features,
    symmetrize,
)
from .evaluate import baselines, evaluate_speaker
from .model import EmotionConfig, EmotionNet, load_emotion_model, save_emotion_model
from .neutral import NeutralStats, build_neutral_stats, estimate_neutral, expression_energy, neutral_segment
from .reference import ReferenceExpression, measure_reference, reference_displacement, retarget_scale
from .schedule import CROSSFADE_S, LABELS, MAX_STRENGTH, parse_emotion_schedule, schedule_weights
from .targets import build_training_set, neutral_stats_from_tracks, speaker_displacements, speaker_neutral
from .train import calibrate_gain, fit_emotion_net, train_emotion, train_on
from .tracks import (
    MAX_REFERENCE_FRAMES,
    SpeakerTracks,
    TrackedClip,
    canonicalise_speaker,
    label_of,
    list_clips,
    speaker_of,
    track_clip,
    track_speakers,
)

_MOVABLE_MASK = MOVABLE_MASK  # the previous module's private name

__all__ = [
    "ASYMMETRIC",
    "CLAMP_MARGIN",
    "CROSSFADE_S",
    "EVAL_POINTS",
    "FROZEN",
    "LABELS",
    "LIP_CLOSURE",
    "LOWER_JAW",
    "MAX_REFERENCE_FRAMES",
    "MAX_STRENGTH",
    "MIRROR",
    "MOVABLE",
    "MOVABLE_MASK",
    "REGIONS",
    "SPEECH",
    "STABLE",
    "EmotionConfig",
    "EmotionDelta",
    "EmotionNet",
    "NeutralStats",
    "ReferenceExpression",
    "SpeakerTracks",
    "TrackedClip",
    "baselines",
    "build_emotion_delta",
    "build_neutral_stats",
    "build_training_set",
    "calibrate_gain",
    "canonicalise_speaker",
    "causal_windows",
    "clamp_to_reference",
    "cosine",
    "estimate_neutral",
    "evaluate_speaker",
    "expression_energy",
    "expression_range",
    "find_emotion_model",
    "fit_emotion_net",
    "label_of",
    "list_clips",
    "load_emotion_model",
    "measure_reference",
    "mirror",
    "neutral_segment",
    "neutral_stats_from_tracks",
    "norm",
    "parse_emotion_schedule",
    "pingpong",
    "range_scale",
    "reference_displacement",
    "region_scale",
    "retarget_scale",
    "save_emotion_model",
    "schedule_weights",
    "similarity_fit",
    "speaker_displacements",
    "speaker_neutral",
    "speaker_of",
    "speech_features",
    "symmetrize",
    "track_clip",
    "track_speakers",
    "train_emotion",
    "train_on",
]
