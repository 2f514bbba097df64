"""``avatar preprocess``: one talking video -> the dataset directory of :mod:`avatar.data.dataset`.

Stages (GeneFace's ``data_gen/process_data.sh`` redone without BFM, BiSeNet or DeepSpeech):

1. probe + load audio (16 kHz mono) - fail fast on bad input, before any heavy work;
2. pass 1: BlazeFace on ~``detect_samples`` evenly spaced frames -> one stable square crop window
   (:mod:`avatar.face.crop`);
3. pass 2 (streaming, bounded memory): decode at 25 fps through crop + resize straight into the
   memory-mapped ``frames.npy``; FaceMesh in video mode (478 points) and selfie segmentation on
   each stored frame;
4. short face gaps (<= ``max_gap_s``) interpolated and flagged, long gaps rejected with their times;
5. head pose (mean shape + PnP + Savitzky-Golay smoothing), canonical landmarks, blink
   (:mod:`avatar.face.pose`, :mod:`avatar.face.landmarks`);
6. pass 3 over the stored masks: head / torso / background labels; background plate
   (:mod:`avatar.face.masks`);
7. audio features (2 per frame), split, manifest, previews; the directory appears atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avatar.atomic import atomic_dir, check_output_dir
from avatar.config import save_json, to_dict
from avatar.data.dataset import (
    AUDIO_RATE,
    FEATURES_PER_FRAME,
    FPS,
    SAMPLES_PER_FRAME,
    SCHEMA,
    EncodedImageWriter,
    save_array,
)
from avatar.errors import ClipTooShort, InvalidInput, InvalidMedia, NoAudio, NoFaceDetected
from avatar.runtime import configure_threads
from avatar.store.bundle import sha256_file

log = logging.getLogger(__name__)

#: shortest clip accepted (frames at 25 fps): 2 s, enough for a smoke run, far too little for quality
MIN_FRAMES = 50


@dataclass
class PreprocessConfig:
    """Options of ``avatar preprocess`` (stored in the dataset manifest).

    Attributes:
        size: side of the stored square frames, pixels.
        audio_features: ``"mel"`` (80-bin log-mel, 50 Hz) or ``"hubert"`` (needs ``hubert_path``).
        hubert_path: local directory of a ``transformers`` HuBERT model (never downloaded).
        val_fraction: fraction of frames in the contiguous validation tail.
        min_val_frames: lower bound of the validation tail, frames.
        crop_scale: crop side / median face-box height (see :func:`avatar.face.crop.choose_crop`).
        face_y: vertical face-centre position inside the crop (0 top, 1 bottom).
        focal_per_pixel: fx = fy = focal_per_pixel * size (GeneFace: 1200 px at 512).
        max_gap_s: longest run without a detected face that is interpolated (seconds).
        smooth_window_s: Savitzky-Golay window of rotation and x/y translation, seconds.
        depth_window_s: Savitzky-Golay window of depth (apparent head size), seconds.
        detect_samples: frames sampled to choose the crop window.
        background_samples: frames sampled for the background plate.
        frame_codec: ``"jpeg"`` (default; 4:4:4 chroma) or ``"png"`` (lossless, ~3-4x larger) for
            the stored frames; masks are always PNG.
        jpeg_quality: JPEG quality (1-100) of the stored frames.
    """

    size: int = 512
    audio_features: str = "mel"
    hubert_path: str | None = None
    val_fraction: float = 0.1
    min_val_frames: int = 25
    crop_scale: float = 2.4
    face_y: float = 0.45
    focal_per_pixel: float = 1200.0 / 512.0
    max_gap_s: float = 0.5
    smooth_window_s: float = 0.5
    depth_window_s: float = 1.0
    detect_samples: int = 60
    background_samples: int = 80
    frame_codec: str = "jpeg"
    jpeg_quality: int = 95

    def frame_codec_spec(self) -> dict:
        """The codec dict of :func:`avatar.data.dataset.encode_image` for the stored frames."""
        return {"codec": "jpeg", "quality": int(self.jpeg_quality)} if self.frame_codec == "jpeg" else {"codec": "png"}

    def validate(self) -> None:
        """Raises :class:`InvalidInput` on an unusable option."""
        if not 64 <= int(self.size) <= 2048 or int(self.size) % 2:
            raise InvalidInput(f"--size must be an even number of pixels in [64, 2048], got {self.size}")
        if self.audio_features not in ("mel", "hubert"):
            raise InvalidInput(f"--audio-features must be 'mel' or 'hubert', got {self.audio_features!r}")
        if self.audio_features == "hubert" and not self.hubert_path:
            raise InvalidInput(
                "--audio-features hubert needs --hubert PATH (a local HuBERT model directory); or use --audio-features mel"
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise InvalidInput(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.frame_codec not in ("jpeg", "png"):
            raise InvalidInput(f"frame_codec must be 'jpeg' or 'png', got {self.frame_codec!r}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise InvalidInput(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def split_val_start(n_frames: int, val_fraction: float, min_val_frames: int) -> int:
    """First validation frame: the tail holds ``max(val_fraction * N, min_val_frames)`` frames, but
    at most half of the clip."""
    n_val = max(int(round(val_fraction * n_frames)), min_val_frames)
    n_val = min(n_val, n_frames // 2)
    return n_frames - n_val


def _tool_versions(extra: dict | None = None) -> dict:
    import av
    import cv2
    import librosa
    import scipy
    import torch

    from avatar.face.landmarks import mediapipe_version

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mediapipe": mediapipe_version(),
        "av": av.__version__,
        "opencv": cv2.__version__,
        "scipy": scipy.__version__,
        "librosa": librosa.__version__,  # type: ignore[attr-defined]
        "torch": torch.__version__,
    }
    out.update(extra or {})
    return out


def _fmt_ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a / FPS:.1f}-{b / FPS:.1f} s" for a, b in ranges)


def _detect_crop(video: Path, info, n_frames: int, cfg: PreprocessConfig, progress: bool):
    """Pass 1: face boxes on sampled frames -> CropBox (source pixels)."""
    from avatar.face.crop import choose_crop, select_track
    from avatar.face.landmarks import FaceDetector
    from avatar.media import count_resampled_frames, iter_video_frames

    duration = n_frames / FPS
    sample_fps = min(float(FPS), max(cfg.detect_samples / duration, 0.2))
    detections = []
    total = count_resampled_frames(info, sample_fps)
    with (
        FaceDetector() as det,
        tqdm(total=total, desc="preprocess: find face", unit="frame", disable=not progress, file=sys.stderr) as bar,
    ):
        for img in iter_video_frames(video, fps=sample_fps):
            detections.append(det(img))
            bar.update(1)
    boxes, several = select_track(detections)
    if len(boxes) == 0:
        raise NoFaceDetected(
            f"{video}: no face found in {len(detections)} sampled frames; pass a video where one face "
            "is clearly visible (frontal, well lit)"
        )
    if several:
        log.info(
            "several faces in the clip; following the largest face's track (%d of %d samples)",
            len(boxes),
            len(detections),
        )
    crop = choose_crop(boxes, info.width, info.height, scale=cfg.crop_scale, face_y=cfg.face_y)
    log.info(
        "crop window x0=%d y0=%d side=%d of %dx%d (face found in %d/%d samples)",
        crop.x0,
        crop.y0,
        crop.side,
        info.width,
        info.height,
        len(boxes),
        len(detections),
    )
    return crop, len(boxes), len(detections)


def preprocess(
    video: str | Path,
    out: str | Path,
    config: PreprocessConfig | None = None,
    audio: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Turn a talking video into a dataset directory (see :mod:`avatar.data.dataset`).

    Args:
        video: any container PyAV/FFmpeg reads (mp4, mov, mkv, webm, ...), any fps/size/audio rate.
        out: dataset directory to create (atomically).
        config: options; defaults to ``PreprocessConfig()``.
        audio: optional separate audio file (e.g. a silent video + wav); replaces the video's audio.
        overwrite: replace an existing ``out``.
        progress: show a tqdm progress bar with ETA.

    Returns:
        ``Path(out)``.

    Raises:
        OutputExists: ``out`` exists and not ``overwrite`` (checked before any work).
        InvalidInput: bad option.
        InvalidMedia: missing / non-media / corrupt / truncated file, no video stream.
        NoAudio: no audio stream in ``video`` and no ``audio`` file.
        ClipTooShort: fewer than :data:`MIN_FRAMES` frames at 25 fps.
        NoFaceDetected: no face, or no face over a stretch longer than ``max_gap_s``.
    """
    from avatar.audio import FeatureExtractor
    from avatar.face.landmarks import MP_TO_IBUG68, FaceMeshTracker, eye_aspect_ratio, fill_gaps
    from avatar.face.masks import PersonSegmenter, background_plate, label_frame, oval_points
    from avatar.face.pose import (
        EYE_CORNER_DISTANCE_M,
        canonical_landmarks,
        default_intrinsics,
        fit_poses,
        mean_shape,
        rotation_noise,
        smooth_poses,
    )
    from avatar.media import count_resampled_frames, iter_video_frames, load_audio, probe
    from avatar.pipeline.preview import contact_sheet, signals_plot

    cfg = config or PreprocessConfig()
    cfg.validate()
    configure_threads()  # OpenCV / torch threads = CPUs this process may use
    out = check_output_dir(out, overwrite)
    video = Path(video)
    t_start = time.perf_counter()

    # -- 1. probe and audio (fail fast) ---------------------------------------------------------
    info = probe(video)
    if not info.has_video:
        raise InvalidMedia(f"{video}: has no video stream; pass a video file of the speaker")
    audio_src = Path(audio) if audio is not None else video
    if audio is None and not info.has_audio:
        raise NoAudio(f"{video}: has no audio stream; pass the speech separately with --audio FILE")
    n = count_resampled_frames(info, FPS)
    if n < MIN_FRAMES:
        raise ClipTooShort(
            f"{video}: {n / FPS:.2f} s of video ({n} frames at {FPS} fps); at least {MIN_FRAMES / FPS:.0f} s "
            f"({MIN_FRAMES} frames) are needed, and 3-5 minutes for a good avatar"
        )
    audio_info = probe(audio_src) if audio is not None else info
    wav = load_audio(audio_src, sr=AUDIO_RATE)
    n_samples = n * SAMPLES_PER_FRAME
    if len(wav) < 0.5 * n_samples:
        log.warning(
            "audio (%.2f s) is much shorter than the video (%.2f s); padding with silence",
            len(wav) / AUDIO_RATE,
            n / FPS,
        )
    wav = np.pad(wav, (0, max(0, n_samples - len(wav))))[:n_samples].astype(np.float32)
    extractor = FeatureExtractor(cfg.audio_features, hubert_path=cfg.hubert_path)

    # -- 2. pass 1: crop window -------------------------------------------------------------------
    crop, n_face_samples, n_samples_det = _detect_crop(video, info, n, cfg, progress)
    size = int(cfg.size)
    intr = default_intrinsics(size, cfg.focal_per_pixel)

    with atomic_dir(out, overwrite) as tmp:
        # -- 3. pass 2: frames, FaceMesh, person masks (streaming) -------------------------------
        # frames are stored encoded (JPEG q95 / PNG) as they come: memory and disk stay flat in clip
        # length (a 5-minute 512 px clip is 5.9 GB raw); the person masks go to a temporary PNG
        # sequence until pass 3 turns them into head/torso labels
        frames = EncodedImageWriter(tmp, "frames", (n, size, size, 3), cfg.frame_codec_spec())
        person = EncodedImageWriter(tmp, "masks", (n, size, size), stem="person_tmp")
        points = np.zeros((n, 478, 3), np.float32)
        valid = np.zeros(n, bool)
        i = -1
        bar = tqdm(total=n, desc="preprocess: track", unit="frame", disable=not progress, file=sys.stderr)
        with FaceMeshTracker() as tracker, PersonSegmenter() as segmenter:
            for i, img in enumerate(iter_video_frames(video, fps=FPS, crop=crop.as_tuple(), size=size)):
                if i >= n:
                    break
                frames[i] = img
                res = tracker(img)
                if res is not None:
                    points[i] = res.points
                    valid[i] = True
                person[i] = np.asarray(segmenter(img), np.uint8)
                bar.update(1)
        bar.close()
        if i + 1 < n:
            raise InvalidMedia(
                f"{video}: decoded only {i + 1} of {n} frames; the file is truncated or corrupt, re-export it"
            )

        # -- 4. face gaps ---------------------------------------------------------------------------
        if not valid.any():
            raise NoFaceDetected(
                f"{video}: FaceMesh found no face in any frame; pass a video where one face is clearly visible"
            )
        max_gap = int(round(cfg.max_gap_s * FPS))
        long_gaps = fill_gaps(points, valid, max_gap)
        if long_gaps:
            raise NoFaceDetected(
                f"{video}: no face {_fmt_ranges(long_gaps)} (longer than {cfg.max_gap_s} s); "
                "cut these stretches out of the video (or pick a clip where the face stays visible) and retry"
            )
        n_interp = int((~valid).sum())
        if n_interp:
            log.info("face interpolated in %d frame(s) (flagged face_valid=False)", n_interp)

        # -- 5. pose, canonical landmarks, blink ------------------------------------------------
        shape, rigid = mean_shape(points[valid][:: max(1, int(valid.sum()) // 1500)])
        raw = fit_poses(points, shape, rigid, intr)
        poses = smooth_poses(raw, FPS, cfg.smooth_window_s, cfg.depth_window_s)
        noise = rotation_noise(raw, poses, FPS)
        lm3d, lm3d_mean, head_scale = canonical_landmarks(points, shape, rigid)
        lm2d = points[:, list(MP_TO_IBUG68), :2]
        blink = eye_aspect_ratio(lm3d)

        # -- 6. pass 3: head / torso labels; background plate ------------------------------------
        masks = EncodedImageWriter(tmp, "masks", (n, size, size))
        for j in tqdm(range(n), desc="preprocess: masks", unit="frame", disable=not progress, file=sys.stderr):
            masks[j] = label_frame(person[j].astype(bool), oval_points(points[j]))
        person.discard()
        detected = np.flatnonzero(valid)  # frames without a face (e.g. black frames) are not sampled
        bg_idx = detected[
            np.unique(np.linspace(0, len(detected) - 1, min(len(detected), cfg.background_samples)).round().astype(int))
        ]
        plate = background_plate(frames, masks, bg_idx)
        fractions = {
            k: float(np.mean([np.mean(masks[j] == v) for j in bg_idx]))
            for k, v in (("background", 0), ("torso", 1), ("head", 2))
        }

        # -- 7. audio features, arrays, manifest, previews ----------------------------------------
        feats = extractor(wav, n_frames=n)
        if feats.shape[0] != FEATURES_PER_FRAME * n:
            raise InvalidMedia(
                f"audio features have {feats.shape[0]} rows, expected {FEATURES_PER_FRAME * n}; report this bug"
            )
        save_array(tmp, "audio", wav)
        save_array(tmp, "features", feats)
        save_array(tmp, "background", plate)
        save_array(tmp, "lm2d", lm2d)
        save_array(tmp, "lm3d", lm3d)
        save_array(tmp, "lm3d_mean", lm3d_mean)
        save_array(tmp, "blink", blink)
        save_array(tmp, "pose", poses)
        save_array(tmp, "face_valid", valid)

        val_start = split_val_start(n, cfg.val_fraction, cfg.min_val_frames)
        flagged = [int(k) for k in np.flatnonzero(~valid)]
        hubert_extra = {}
        if cfg.audio_features == "hubert":
            import transformers

            hubert_extra["transformers"] = transformers.__version__
        manifest = {
            "schema": SCHEMA,
            "source": {
                "path": str(video.resolve()),
                "sha256": sha256_file(video),
                "fps": info.fps,
                "width": info.width,
                "height": info.height,
                "duration_s": info.duration_s,
                "audio_path": str(audio_src.resolve()),
                "audio_sha256": sha256_file(audio_src) if audio is not None else None,
                "audio_rate": audio_info.audio_rate,
            },
            "fps": FPS,
            "size": size,
            "n_frames": n,
            "crop_box": {"x0": crop.x0, "y0": crop.y0, "side": crop.side},
            "intrinsics": {"fx": intr.fx, "fy": intr.fy, "cx": intr.cx, "cy": intr.cy},
            "head_scale": head_scale,
            "head_frame_units": f"metres, assuming an outer-eye-corner distance of {EYE_CORNER_DISTANCE_M} m",
            "features": extractor.describe(),
            "split": {"val_start": val_start, "n_train": val_start, "n_val": n - val_start},
            "encoding": {"frames": frames.codec, "masks": masks.codec},
            "flagged_frames": {"interpolated": flagged},
            "quality": {
                "face_detected_fraction": float(valid.mean()),
                "crop_samples_with_face": f"{n_face_samples}/{n_samples_det}",
                "rotation_noise_deg": to_dict(noise),
                "mask_fractions": fractions,
                "mean_depth_m": float(poses[:, 2, 3].mean()),
                "depth_std_m": float(poses[:, 2, 3].std()),
            },
            "tools": _tool_versions(hubert_extra),
            "config": to_dict(cfg),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": None,
        }
        (tmp / "preview").mkdir()
        contact_sheet(frames, masks, lm2d, poses, intr, head_scale, tmp / "preview" / "contact_sheet.png")
        signals_plot(raw, poses, blink, valid, tmp / "preview" / "signals.png", fps=FPS)
        frames.close()
        masks.close()
        manifest["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        save_json(manifest, tmp / "manifest.json")
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a dataset is meant to be shared
    log.info(
        "dataset %s: %d frames (%.1f s) at %d px, rotation noise on a static stretch %.3f deg raw -> %.3f deg smoothed, %.1f s",
        out,
        n,
        n / FPS,
        size,
        noise.raw_deg,
        noise.smoothed_deg,
        manifest["elapsed_s"],
    )
    return out


def _run(args: argparse.Namespace) -> int:
    cfg = PreprocessConfig(
        size=args.size, audio_features=args.audio_features, hubert_path=args.hubert, frame_codec=args.frame_codec
    )
    out = preprocess(args.video, args.out, cfg, audio=args.audio, overwrite=args.overwrite, progress=not args.quiet)
    print(out)
    return 0


def register(subparsers) -> None:
    """Add the ``preprocess`` subcommand."""
    p = subparsers.add_parser(
        "preprocess",
        help="video of one speaker -> training dataset (frames, landmarks, pose, masks, audio features)",
        description=(
            "Turn a talking video of one person into a dataset directory: 25 fps frames in one stable "
            "square crop around the face, 68 iBUG landmarks (2-D and canonical 3-D), smoothed head pose "
            "and camera, head/torso/background masks and a background plate, 16 kHz audio and audio "
            "features (2 per frame), a train/val split and preview images. The directory appears only "
            "when everything succeeded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("video", help="input video (mp4, mov, mkv, webm, ...; any fps, resolution and audio rate)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--size", type=int, default=512, help="side of the stored square frames, pixels")
    p.add_argument(
        "--audio-features", choices=["mel", "hubert"], default="mel", help="audio feature kind (hubert needs --hubert)"
    )
    p.add_argument(
        "--hubert",
        default=None,
        metavar="PATH",
        help="local HuBERT model directory (transformers format); nothing is downloaded",
    )
    p.add_argument(
        "--frame-codec",
        choices=["jpeg", "png"],
        default="jpeg",
        help="storage of the frames: JPEG quality 95 (4:4:4) or lossless PNG (~3-4x larger)",
    )
    p.add_argument(
        "--audio",
        default=None,
        metavar="FILE",
        help="separate speech audio for a silent video (replaces the video's audio)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
