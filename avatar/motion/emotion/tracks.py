"""Tracking and canonicalising labelled emotional clips (reuses :mod:`avatar.face`; no tracker of
our own).

Clip names carry speaker and label:

* MEAD as distributed by dreamtalk: ``<speaker>_front_<label>_level<k>_<n>.mp4`` (``M030_front_happy_level3_001``);
* MEAD as distributed by spectre: ``...MEAD_<speaker>_level_<k>_<label>_<n>.mp4``
  (``filby89+spectre__MEAD_M003_level_1_happy_024``); the same speaker id in both forms is one person;
* anything else with a label token (``eamm_sad.mp4``) is its own speaker.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avatar.data.dataset import FPS
from avatar.errors import InvalidInput, NoFaceDetected

from .schedule import LABELS

log = logging.getLogger(__name__)

MAX_REFERENCE_FRAMES = 60 * FPS  # a reference longer than 60 s is truncated (it loops anyway)
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg")


@dataclass
class TrackedClip:
    """One tracked clip: ``points`` float32 [N, 478, 3] FaceMesh pixels (gaps filled)."""

    path: Path
    points: np.ndarray


def _cache_file(path: Path, max_frames: int | None, cache_dir: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{max_frames}".encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem[:80]}.{key}.npy"


def track_clip(
    path: str | Path, max_frames: int | None = None, min_face_fraction: float = 0.5, cache_dir: str | Path | None = None
) -> TrackedClip:
    """Track a video's face with :class:`avatar.face.landmarks.FaceMeshTracker` at 25 fps.

    Args:
        path: the video.
        max_frames: stop after this many 25 fps frames (None = all).
        min_face_fraction: fewer detected frames than this fraction raise NoFaceDetected.
        cache_dir: optional folder for tracked points (``<stem>.<key>.npy``, keyed on the file's
            path, size, mtime and ``max_frames``); a hit skips decoding and tracking.
    Raises:
        InvalidMedia: unreadable / truncated file (from :mod:`avatar.media`).
        NoFaceDetected: fewer than ``min_face_fraction`` of frames show a face.
    """
    from avatar.face.landmarks import FaceMeshTracker, fill_gaps
    from avatar.media import iter_video_frames

    path = Path(path)
    cached = None
    if cache_dir is not None and path.is_file():
        cached = _cache_file(path, max_frames, Path(cache_dir))
        if cached.is_file():
            return TrackedClip(path, np.load(cached))
    pts, valid = [], []
    with FaceMeshTracker() as tracker:
        for i, img in enumerate(iter_video_frames(path, fps=FPS)):
            if max_frames is not None and i >= max_frames:
                break
            res = tracker(img)
            valid.append(res is not None)
            pts.append(res.points if res is not None else np.zeros((478, 3), np.float32))
    n = len(valid)
    found = int(np.sum(valid))
    if n == 0 or found < max(2, min_face_fraction * n):
        raise NoFaceDetected(
            f"{path}: a face was found in only {found} of {n} frames; use a video showing one frontal face throughout"
        )
    points = np.stack(pts).astype(np.float32)
    fill_gaps(points, np.asarray(valid), max_gap=n)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, points)
    return TrackedClip(path, points)


def canonicalise_speaker(clips: list[TrackedClip], neutral: list[TrackedClip] | None = None):
    """Canonical landmarks of several clips of ONE speaker in one common head frame and scale.

    The head-frame shape is the generalised-Procrustes mean (:func:`avatar.face.pose.mean_shape`)
    of the neutral clips (all clips when none); the scale sets the outer-eye-corner distance of the
    neutral mean to 1 (the dataset convention).

    Returns:
        (list of float32 [N_i, 68, 3] per clip in ``clips`` order, float32 [68, 3] neutral mean or
        None when no neutral clip was given).
    """
    from avatar.face.pose import canonical_landmarks, mean_shape

    base = neutral if neutral else clips
    pts = np.concatenate([c.points for c in base])
    step = max(1, len(pts) // 400)  # the Procrustes mean needs no more than ~400 frames
    shape, rigid = mean_shape(pts[::step])
    ref_lm, _, hs = canonical_landmarks(pts, shape, rigid)
    out = []
    for c in clips:
        lm, _, h = canonical_landmarks(c.points, shape, rigid)
        out.append((lm * (h / hs)).astype(np.float32))
    neutral_mean = ref_lm.mean(0).astype(np.float32) if neutral else None
    return out, neutral_mean


def label_of(stem: str) -> str | None:
    """The first MEAD label token in a file stem (``_``-separated), or None."""
    hits = [t for t in re.split(r"[_\s]+", stem.lower()) if t in LABELS]
    return hits[0] if hits else None


def speaker_of(stem: str) -> str:
    """Speaker id from a clip stem: ``M030_front_happy_level3_001`` -> ``M030``;
    ``filby89+spectre__MEAD_M003_level_1_happy_024`` -> ``M003``; otherwise the stem itself."""
    m = re.search(r"MEAD_([A-Z]\d{3})_level_", stem)
    if m:
        return m.group(1)
    return stem.split("_front_")[0] if "_front_" in stem else stem


def list_clips(clips_dirs, aliases: dict[str, str] | None = None) -> dict[str, list[tuple[str, Path]]]:
    """Labelled clips by speaker: {speaker: [(label, path), ...]} from file names (see the module
    docstring) in one folder or several (``str | Path | list``). Files without a label are skipped.
    ``aliases`` maps a speaker id from a name to the person's id when several names show one person
    (e.g. ``{"eamm_sad": "M030"}``: the EAMM sad clip shows MEAD's M030).

    Raises:
        InvalidInput: a folder that does not exist, or no labelled clip in any of them.
    """
    dirs = [clips_dirs] if isinstance(clips_dirs, (str, Path)) else list(clips_dirs)
    out: dict[str, list[tuple[str, Path]]] = {}
    skipped = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise InvalidInput(
                f"{d} is not a directory; pass a folder of labelled clips such as M030_front_happy_level3_001.mp4"
            )
        for p in sorted(d.iterdir()):
            if p.suffix.lower() not in VIDEO_SUFFIXES:
                continue
            label = label_of(p.stem)
            if label is None:
                skipped.append(p.name)
                continue
            spk = speaker_of(p.stem)
            out.setdefault((aliases or {}).get(spk, spk), []).append((label, p))
    if skipped:
        log.info("skipping %d clips without an emotion label in their name (e.g. %s)", len(skipped), skipped[0])
    if not out:
        raise InvalidInput(
            f"{', '.join(map(str, dirs))}: no labelled clips; name them like M030_front_happy_level3_001.mp4 or eamm_sad.mp4"
        )
    return out


@dataclass
class SpeakerTracks:
    """Canonical tracks of one speaker: {label: [float32 [N, 68, 3], ...]}, neutral mean [68, 3]
    (None when the speaker has no neutral clip)."""

    speaker: str
    clips: dict[str, list[np.ndarray]] = field(default_factory=dict)
    neutral_mean: np.ndarray | None = None


def track_speakers(
    clips_dirs,
    speakers: list[str] | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    aliases: dict[str, str] | None = None,
) -> list[SpeakerTracks]:
    """Track and canonicalise every labelled clip in one or several folders (unreadable or
    faceless clips are skipped with a warning). ``speakers`` restricts to those ids; ``cache_dir``
    caches tracked points (:func:`track_clip`); ``aliases`` as in :func:`list_clips`."""
    from tqdm import tqdm

    from avatar.errors import InvalidMedia

    listing = list_clips(clips_dirs, aliases)
    if speakers is not None:
        listing = {s: v for s, v in listing.items() if s in speakers}
    out = []
    bar = tqdm(total=sum(len(v) for v in listing.values()), unit="clip", desc="track", disable=not progress)
    for spk, items in listing.items():
        tracked: list[tuple[str, TrackedClip]] = []
        for label, path in items:
            try:
                tracked.append((label, track_clip(path, cache_dir=cache_dir)))
            except InvalidMedia as e:  # includes NoFaceDetected
                log.warning("skipping %s: %s", path.name, e)
            bar.update(1)
        if not tracked:
            continue
        neutral = [c for lab, c in tracked if lab == "neutral"]
        lms, nmean = canonicalise_speaker([c for _, c in tracked], neutral or None)
        st = SpeakerTracks(spk, neutral_mean=nmean)
        for (label, _), lm in zip(tracked, lms):
            st.clips.setdefault(label, []).append(lm)
        out.append(st)
    bar.close()
    return out
