"""Face landmark tracking: MediaPipe FaceMesh (478 3-D points) mapped to the 68 iBUG-300W points.

Backend: ``mediapipe==0.10.21`` ``solutions.face_mesh`` (weights ship inside the wheel, nothing is
downloaded), run in video mode (``static_image_mode=False``: the mesh is tracked from the previous
frame, which is temporally much steadier than per-frame detection) with ``refine_landmarks=True``
(478 points: 468 mesh vertices + 10 iris points). Paper: Kartynnik et al., "Real-time Facial
Surface Geometry from Monocular Video on Mobile GPUs" (2019).

The 478 -> 68 correspondence (:data:`MP_TO_IBUG68`) was built by choosing, for each iBUG-300W point
(Sagonas et al., 300-W, 2013; 0-based indices as in :mod:`avatar.data.dataset`), the FaceMesh vertex
at the same anatomical position on MediaPipe's canonical face mesh:

* jaw 0-16: vertices of the mesh's face-oval contour from the image-left ear-level point, down
  to the chin (menton, vertex 152), up to the image-right ear-level point, spaced like iBUG's jaw;
* brows 17-26: the upper-brow contour, 5 vertices per brow, outer -> inner (left), inner -> outer
  (right), as in iBUG;
* nose 27-30: the bridge midline from nasion (168) to the tip (4/1 region); 31-35: alar base and
  subnasale (98, 97, 2, 326, 327);
* eyes 36-47: eye corners (33/133, 362/263) and the two upper-lid / lower-lid contour vertices at
  the iBUG thirds (160, 158 / 153, 144 and 385, 387 / 373, 380);
* mouth 48-59: outer-lip contour (corners 61/291, cupid's bow 37/267, philtrum 0, bottom 17);
  60-67: inner-lip contour (corners 78/308, midline 13/14).

"Left"/"right" follow iBUG's image convention: point 36 is the outer corner of the eye on the
image's left (the subject's right eye). The mapping is checked by ``tests/test_face.py`` (eyes above
the mouth, jaw below, left/right order, corners outside lids) on real frames and visually on each
dataset's ``preview/contact_sheet.png``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import numpy as np

from avatar.logs import quiet_native

log = logging.getLogger(__name__)

#: FaceMesh vertex index for each iBUG-300W landmark (0-based, 68 entries); see module docstring.
MP_TO_IBUG68: tuple[int, ...] = (
    # jaw 0-16 (image-left ear level -> chin 152 -> image-right ear level)
    234,
    93,
    132,
    58,
    172,
    136,
    150,
    176,
    152,
    400,
    379,
    365,
    397,
    288,
    361,
    323,
    454,
    # brows 17-21 (image-left, outer -> inner), 22-26 (image-right, inner -> outer)
    70,
    63,
    105,
    66,
    107,
    336,
    296,
    334,
    293,
    300,
    # nose bridge 27-30 (nasion -> tip), nose base 31-35 (image-left -> image-right)
    168,
    197,
    5,
    4,
    98,
    97,
    2,
    326,
    327,
    # image-left eye 36-41: outer corner, upper lid x2, inner corner, lower lid x2
    33,
    160,
    158,
    133,
    153,
    144,
    # image-right eye 42-47: inner corner, upper lid x2, outer corner, lower lid x2
    362,
    385,
    387,
    263,
    373,
    380,
    # outer lips 48-59: left corner, upper lip to right corner, lower lip back
    61,
    40,
    37,
    0,
    267,
    270,
    291,
    321,
    314,
    17,
    84,
    91,
    # inner lips 60-67
    78,
    81,
    13,
    311,
    308,
    402,
    14,
    178,
)
assert len(MP_TO_IBUG68) == 68

#: FaceMesh face-oval contour (ordered, closed), from mediapipe's FACEMESH_FACE_OVAL connections.
FACE_OVAL: tuple[int, ...] = (
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
)

#: FaceMesh vertices that move little with expression (forehead, temples, nose bridge, eye corners,
#: cheekbones); used for rigid alignment (pose) so that talking and blinking do not move the head.
RIGID_VERTICES: tuple[int, ...] = (
    10,
    338,
    297,
    332,
    109,
    67,
    103,
    151,
    9,
    8,
    168,
    6,
    197,
    195,
    5,
    4,
    1,
    33,
    133,
    362,
    263,
    130,
    359,
    243,
    463,
    226,
    446,
    21,
    251,
    54,
    284,
    162,
    389,
    127,
    356,
    234,
    454,
    116,
    345,
    117,
    346,
    123,
    352,
    50,
    280,
    98,
    327,
)


def eye_aspect_ratio(lm68: np.ndarray) -> np.ndarray:
    """Eye aspect ratio (EAR), mean of both eyes; low = closed.

    Soukupova & Cech, "Real-Time Eye Blink Detection using Facial Landmarks" (CVWW 2016), eq. 1:
    ``EAR = (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|)`` on iBUG points 36-41 and 42-47.

    Args:
        lm68: float [..., 68, 2 or 3] landmarks (any units; 3-D pose-free points are best).

    Returns:
        float32 [...] EAR (typically ~0.25-0.35 open, < 0.15 closed).
    """
    lm = np.asarray(lm68, dtype=np.float64)

    def ear(p):
        def d(a, b):
            return np.linalg.norm(lm[..., a, :] - lm[..., b, :], axis=-1)

        return (d(p[1], p[5]) + d(p[2], p[4])) / (2.0 * d(p[0], p[3]) + 1e-12)

    return (0.5 * (ear([36, 37, 38, 39, 40, 41]) + ear([42, 43, 44, 45, 46, 47]))).astype(np.float32)


def import_mediapipe():
    """Import mediapipe's solutions API quietly (its C++/protobuf chatter, a harmless GetPrototype
    message, goes to /dev/null unless verbose: :mod:`avatar.logs`); returns ``mediapipe.solutions``."""
    with quiet_native(), contextlib.redirect_stderr(io.StringIO()):
        import mediapipe as mp  # noqa: PLC0415

        return mp.solutions


def start_quietly(make):
    """Create a mediapipe solution (``make()``, e.g. ``lambda: solutions.face_mesh.FaceMesh(...)``)
    with its C++ start-up warnings silenced unless verbose (:func:`avatar.logs.quiet_native`).

    The graph's threads open the TF-Lite models (and log about it) after the constructor returns,
    so the solution's graph is waited on until idle inside the quiet window. Returns the solution.
    """
    with quiet_native():
        solution = make()
        graph = getattr(solution, "_graph", None)  # mediapipe 0.10.21 SolutionBase; without it start-up may print
        if hasattr(graph, "wait_until_idle"):
            graph.wait_until_idle()
    return solution


def mediapipe_version() -> str:
    import_mediapipe()
    import mediapipe as mp  # noqa: PLC0415

    return str(mp.__version__)


@dataclass
class MeshResult:
    """One frame's FaceMesh output.

    Attributes:
        points: float32 [478, 3] in pixels of the processed image: x right, y down, z depth
            (mediapipe's relative depth, scaled by the image width so it has pixel units; smaller
            = closer to the camera).
    """

    points: np.ndarray

    @property
    def lm68(self) -> np.ndarray:
        """float32 [68, 3] iBUG-300W points (pixels; z relative depth)."""
        return self.points[list(MP_TO_IBUG68)]


class FaceMeshTracker:
    """MediaPipe FaceMesh in video mode (tracking), one face.

    Call once per frame in temporal order with uint8 RGB [H, W, 3]; returns :class:`MeshResult`
    or ``None`` when no face is found. Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        solutions = import_mediapipe()
        self._mesh = start_quietly(
            lambda: solutions.face_mesh.FaceMesh(
                static_image_mode=False,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence,
            )
        )

    def __call__(self, rgb: np.ndarray) -> MeshResult | None:
        h, w = rgb.shape[:2]
        with quiet_native():
            res = self._mesh.process(np.ascontiguousarray(rgb))
        if not res.multi_face_landmarks:
            return None
        lms = res.multi_face_landmarks[0].landmark
        pts = np.array([(p.x * w, p.y * h, p.z * w) for p in lms], dtype=np.float32)
        return MeshResult(points=pts)

    def close(self) -> None:
        with quiet_native():
            self._mesh.close()

    def __enter__(self) -> "FaceMeshTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaceDetector:
    """MediaPipe BlazeFace detector (full-range model) for choosing the crop window.

    Bazarevsky et al., "BlazeFace: Sub-millisecond Neural Face Detection on Mobile GPUs" (2019).
    ``__call__(rgb uint8 [H, W, 3]) -> float32 [K, 5]`` boxes ``(x0, y0, x1, y1, score)`` in pixels,
    largest first (K may be 0).
    """

    def __init__(self, min_confidence: float = 0.5):
        solutions = import_mediapipe()
        self._det = start_quietly(
            lambda: solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)
        )

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        with quiet_native():
            res = self._det.process(np.ascontiguousarray(rgb))
        boxes = []
        for d in res.detections or []:
            b = d.location_data.relative_bounding_box
            boxes.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h, d.score[0]))
        out = np.array(boxes, dtype=np.float32).reshape(-1, 5)
        area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
        return out[np.argsort(-area)]

    def close(self) -> None:
        with quiet_native():
            self._det.close()

    def __enter__(self) -> "FaceDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_gaps(valid: np.ndarray) -> list[tuple[int, int]]:
    """Runs of ``False`` in a bool [N] array as half-open ``(start, stop)`` frame ranges."""
    v = np.concatenate([[True], np.asarray(valid, bool), [True]])
    d = np.diff(v.astype(np.int8))
    return list(zip(np.flatnonzero(d == -1).tolist(), np.flatnonzero(d == 1).tolist()))


def fill_gaps(points: np.ndarray, valid: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Linearly interpolate (in place) landmarks over short runs of frames without a face.

    Args:
        points: float [N, P, C] per-frame landmarks; rows where ``valid`` is False are overwritten.
        valid: bool [N] frames where the face was detected.
        max_gap: longest run (frames) that is filled; runs at the clip's start/end copy the
            nearest detected frame.

    Returns:
        The runs longer than ``max_gap`` (left unfilled), as ``(start, stop)`` frame ranges.
    """
    n = len(valid)
    too_long = []
    for a, b in find_gaps(valid):
        if b - a > max_gap:
            too_long.append((a, b))
            continue
        if a == 0 and b == n:
            too_long.append((a, b))
        elif a == 0:
            points[a:b] = points[b]
        elif b == n:
            points[a:b] = points[a - 1]
        else:
            w = (np.arange(a, b) - (a - 1)) / (b - (a - 1))
            points[a:b] = (1 - w)[:, None, None] * points[a - 1] + w[:, None, None] * points[b]
    return too_long
