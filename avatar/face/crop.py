"""One square crop window per clip, stable over the whole clip (no per-frame crop jitter).

Peers crop per frame or expect a pre-cropped 512x512 "Obama-like" framing (GeneFace, ER-NeRF). We
detect faces on a subsample of frames, follow one person (the largest face, then the detection
nearest to that track's median centre), and choose a window of ``scale`` x the median face-box
height, with the face centre placed ``face_y`` of the way down the window (a bit above the middle,
leaving room for hair above and shoulders below), grown to contain every sampled face box with a
margin, and clamped to the image (shrunk to the shorter image side if needed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropBox:
    """Square window in source-video pixels: top-left ``(x0, y0)`` and side ``side``."""

    x0: int
    y0: int
    side: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.x0, self.y0, self.side)


def select_track(detections: list[np.ndarray]) -> tuple[np.ndarray, bool]:
    """Follow one person through per-sample detections.

    Args:
        detections: per sampled frame, float [K, 5] boxes (x0, y0, x1, y1, score), pixels, K >= 0.

    Returns:
        (boxes float [M, 4] one box per sample that has a face, several_faces bool): the largest
        face's track, i.e. in each sample the box whose centre is nearest to the median centre of
        the per-sample largest faces.
    """
    with_faces = [d for d in detections if len(d)]
    if not with_faces:
        return np.zeros((0, 4), np.float32), False

    def areas(b):
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    largest = np.stack([d[np.argmax(areas(d)), :4] for d in with_faces])
    centre = np.median((largest[:, :2] + largest[:, 2:]) / 2, axis=0)
    size = np.median(largest[:, 3] - largest[:, 1])
    several = any(len(d) > 1 for d in with_faces)
    chosen = []
    for d in with_faces:
        c = (d[:, :2] + d[:, 2:4]) / 2
        j = int(np.argmin(np.linalg.norm(c - centre, axis=1)))
        if np.linalg.norm(c[j] - centre) < 1.5 * size:
            chosen.append(d[j, :4])
    return np.array(chosen, np.float32).reshape(-1, 4), several


def choose_crop(
    boxes: np.ndarray, width: int, height: int, scale: float = 2.4, face_y: float = 0.45, margin: float = 0.1
) -> CropBox:
    """The clip's square crop window.

    Args:
        boxes: float [M, 4] face boxes (x0, y0, x1, y1) of one person on sampled frames, pixels
            of the source video (M >= 1).
        width, height: source frame size, pixels.
        scale: window side / median face-box height (BlazeFace boxes span brows-to-chin; 2.4 gives
            head and shoulders like peers' 512x512 crops).
        face_y: vertical position of the face centre inside the window (0 top, 1 bottom).
        margin: extra room around the union of all face boxes, fraction of face height.

    Returns:
        :class:`CropBox` inside the image.
    """
    boxes = np.asarray(boxes, np.float64)
    h = float(np.median(boxes[:, 3] - boxes[:, 1]))
    cx = float(np.median((boxes[:, 0] + boxes[:, 2]) / 2))
    cy = float(np.median((boxes[:, 1] + boxes[:, 3]) / 2))
    side = scale * h
    # grow to keep every sampled face inside the window (with a margin)
    ux0, uy0 = boxes[:, 0].min() - margin * h, boxes[:, 1].min() - margin * h
    ux1, uy1 = boxes[:, 2].max() + margin * h, boxes[:, 3].max() + margin * h
    side = max(side, 2 * max(cx - ux0, ux1 - cx), (uy1 - cy) / (1 - face_y), (cy - uy0) / face_y)
    side = int(round(min(side, width, height)))
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - face_y * side, 0), height - side)))
    return CropBox(x0, y0, side)
