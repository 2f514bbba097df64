"""Per-frame head / torso / background labels and the background plate.

* Person vs background: MediaPipe selfie segmentation (general 256x256 model, weights inside the
  ``mediapipe==0.10.21`` wheel). GeneFace++ (Ye et al. 2023) moved to MediaPipe segmentation for
  the same reason; the BiSeNet face parser of AD-NeRF/GeneFace mislabels long hair and torso (a
  recurring complaint of their users).
* Head vs torso (:func:`label_frame`): the head region is the convex hull of the FaceMesh face oval
  with its upper half pushed outwards from the oval centre (room for hair above and beside the
  forehead), intersected with the person mask; the face oval itself is always head. Every other
  person pixel (neck, shoulders, clothes, long hair below the jaw) is torso/neck.
* Background plate (:func:`background_plate`): per-pixel temporal median of background-labelled
  pixels (person mask dilated to drop halos) over a bounded set of sampled frames, processed in
  row bands (memory O(samples x band)), never-seen pixels filled by ``cv2.inpaint`` (Telea 2004).
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np

from avatar.face.contracts import MASK_BACKGROUND, MASK_HEAD, MASK_TORSO
from avatar.face.landmarks import FACE_OVAL, import_mediapipe, start_quietly
from avatar.logs import quiet_native


class PersonSegmenter:
    """MediaPipe selfie segmentation: ``__call__(rgb uint8 [H, W, 3]) -> bool [H, W]`` person mask."""

    def __init__(self, threshold: float = 0.5):
        solutions = import_mediapipe()
        self._seg = start_quietly(lambda: solutions.selfie_segmentation.SelfieSegmentation(model_selection=0))
        self.threshold = threshold

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        with quiet_native():
            res = self._seg.process(np.ascontiguousarray(rgb))
        return res.segmentation_mask > self.threshold

    def close(self) -> None:
        with quiet_native():
            self._seg.close()

    def __enter__(self) -> "PersonSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def head_region(oval: np.ndarray, shape: tuple[int, int], hair_up: float = 0.55, hair_side: float = 0.12) -> np.ndarray:
    """Pixels that may belong to the head (face + hair).

    Args:
        oval: float [36, 2] FaceMesh face-oval points (:data:`FACE_OVAL` order), pixels.
        shape: (H, W) of the image.
        hair_up: how far points of the oval's upper half are pushed away from the oval centre,
            as a fraction of the face-oval height (room for hair on top).
        hair_side: same for the sideways push of the upper half (hair beside the temples).

    Returns:
        bool [H, W].
    """
    oval = np.asarray(oval, np.float64)
    c = oval.mean(0)
    h = np.ptp(oval[:, 1])
    pts = [oval]
    upper = oval[oval[:, 1] < c[1]]
    if len(upper):
        lift = (c[1] - upper[:, 1]) / max(c[1] - oval[:, 1].min(), 1e-6)  # 0 at mid-height, 1 at top
        grown = np.stack([c[0] + (upper[:, 0] - c[0]) * (1.0 + 2.0 * hair_side), upper[:, 1] - hair_up * h * lift], 1)
        pts.append(grown)
    hull = cv2.convexHull(np.concatenate(pts).astype(np.float32)).astype(np.int32)
    out = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool)


def label_frame(person: np.ndarray, oval: np.ndarray) -> np.ndarray:
    """Labels for one frame.

    Args:
        person: bool [H, W] person mask (selfie segmentation).
        oval: float [36, 2] FaceMesh face-oval points, pixels.

    Returns:
        uint8 [H, W]: 0 background, 1 torso/neck, 2 head (face + hair).
    """
    h, w = person.shape
    face = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(np.asarray(oval, np.float32)).astype(np.int32), 1)
    head = (person & head_region(oval, (h, w))) | face.astype(bool)
    labels = np.full((h, w), MASK_BACKGROUND, np.uint8)
    labels[person] = MASK_TORSO
    labels[head] = MASK_HEAD
    return labels


def oval_points(points478: np.ndarray) -> np.ndarray:
    """float32 [36, 2] face-oval contour from FaceMesh points [478, 2+] (pixels)."""
    return np.asarray(points478)[list(FACE_OVAL), :2].astype(np.float32)


def background_plate(
    frames: np.ndarray, masks: np.ndarray, indices: np.ndarray, band: int = 64, halo_px: int | None = None
) -> np.ndarray:
    """Background plate from sampled frames (bounded memory).

    Args:
        frames: uint8 [N, S, S, 3] frames (anything indexable by frame, e.g. a memory map).
        masks: uint8 [N, S, S] labels (0 = background).
        indices: int [K] frame indices to use (e.g. 60-100 evenly spaced); the K frames are held in
            memory (K * S * S * 3 bytes), independent of the clip length N.
        band: rows processed at once; working memory ~ K * band * S * 3 * 4 bytes.
        halo_px: person mask dilation before taking background pixels (default ~1% of S).

    Returns:
        uint8 [S, S, 3] RGB plate; pixels never seen as background are inpainted.
    """
    indices = np.asarray(indices)
    s = np.asarray(masks[indices[0]]).shape[0]
    halo = halo_px if halo_px is not None else max(2, s // 100)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1, 2 * halo + 1))
    bg = np.stack(
        [cv2.erode((np.asarray(masks[i]) == MASK_BACKGROUND).astype(np.uint8), kernel) for i in indices]
    ).astype(bool)
    sampled = np.stack([np.asarray(frames[i]) for i in indices])
    plate = np.zeros((s, s, 3), np.uint8)
    seen = bg.any(0)
    for y0 in range(0, s, band):
        y1 = min(s, y0 + band)
        px = sampled[:, y0:y1].astype(np.float32)
        px[~bg[:, y0:y1]] = np.nan
        with warnings.catch_warnings():  # all-NaN columns (never background) warn; they are inpainted below
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(px, axis=0)
        plate[y0:y1] = np.nan_to_num(med, nan=0.0).round().clip(0, 255).astype(np.uint8)
    hole = (~seen).astype(np.uint8)
    if hole.any() and seen.any():
        plate = cv2.inpaint(plate, hole, max(3, s // 64), cv2.INPAINT_TELEA)
    return plate
