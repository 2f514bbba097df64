"""Held-out metrics of the category emotion model (:mod:`.model`) on one speaker, and the two trivial
baselines they are read against."""

from __future__ import annotations

import numpy as np

from avatar.data.dataset import MOUTH
from avatar.errors import InvalidInput

from .geometry import causal_windows, cosine, norm, region_scale, speech_features
from .model import EmotionNet
from .neutral import NeutralStats
from .targets import speaker_displacements, speaker_neutral
from .tracks import SpeakerTracks


def evaluate_speaker(
    net: EmotionNet, st: SpeakerTracks, window: int | None = None, allow_estimated: bool = False
) -> dict:
    """Held-out metrics on one speaker, per emotional label.

    Truth: the mean of the label's clips minus the speaker's recorded neutral mean (or, with
    ``allow_estimated``, the shared-statistics estimate from ``net``'s statistics: flagged
    ``estimated_truth``). Prediction: the model's displacement averaged over the speaker's neutral
    clip frames used as the "audio-driven neutral" speech input (the label clip's frames, relative to
    their mean, when there is no neutral clip), retargeted to the speaker (:func:`~.geometry.region_scale`).

    Returns:
        {label: {"cosine", "size_ratio", "mouth_lmd", "pred_norm", "real_norm", "estimated_truth"}}
        with cosine / norms on :data:`~.geometry.EVAL_POINTS`; ``mouth_lmd`` = mean L2 of the 20
        mouth points of the predicted displacement (canonical units).
    Raises:
        InvalidInput: no neutral clip and not ``allow_estimated``.
    """
    window = window or net.cfg.window
    if st.neutral_mean is None and not allow_estimated:
        raise InvalidInput(f"speaker {st.speaker} has no neutral clip; it cannot be evaluated")
    stats = net.neutral_stats()
    neutral, estimated = speaker_neutral(st, stats)
    scale = region_scale(stats.template, neutral)
    real_all = speaker_displacements(st, stats)
    rows = {}
    for label, real in real_all.items():
        src = st.clips["neutral"][0] if "neutral" in st.clips else np.concatenate(st.clips[label])
        pred = net.predict(causal_windows(speech_features(src, src.mean(0)), window), label) * scale
        a = pred.mean(0)
        rows[label] = {
            "cosine": cosine(a, real),
            "size_ratio": norm(a) / (norm(real) + 1e-12),
            "mouth_lmd": float(np.linalg.norm(pred[:, list(MOUTH)], axis=-1).mean()),
            "pred_norm": norm(a),
            "real_norm": norm(real),
            "estimated_truth": estimated,
        }
    return rows


def baselines(train: list[SpeakerTracks], held: SpeakerTracks, stats: NeutralStats) -> dict:
    """The two trivial baselines of a held-out evaluation, per label of ``held``.

    * ``average``: cosine / size ratio of the plain mean of the training speakers' displacements
      (each against its recorded or estimated neutral; no symmetrisation, no retargeting);
    * ``copy``: mean over training speakers of the cosine / size ratio of copying that one
      speaker's displacement (the expected score of picking one at random).

    Truth as in :func:`evaluate_speaker` (recorded neutral, else the estimate from ``stats``).
    Returns {label: {"average_cos", "average_size", "copy_cos", "copy_size", "n_train"}}; labels no
    training speaker has are left out.
    """
    truth = speaker_displacements(held, stats)
    train_d = [speaker_displacements(st, stats) for st in train]
    out = {}
    for label, real in truth.items():
        ds = [d[label] for d in train_d if label in d]
        if not ds:
            continue
        avg = np.mean(ds, 0)
        out[label] = {
            "average_cos": cosine(avg, real),
            "average_size": norm(avg) / (norm(real) + 1e-12),
            "copy_cos": float(np.mean([cosine(d, real) for d in ds])),
            "copy_size": float(np.mean([norm(d) / (norm(real) + 1e-12) for d in ds])),
            "n_train": len(ds),
        }
    return out
