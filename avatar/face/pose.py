"""Head pose, camera and canonical (pose-free) landmarks from a tracked FaceMesh sequence.

Pipeline (replaces the BFM face tracker of AD-NeRF/GeneFace, which needs non-redistributable BFM
files; GeneFace's ``data_gen/process_data.sh`` fits BFM 3DMM coefficients at this step):

1. :func:`mean_shape` - the person's rigid 3-D face shape by generalised Procrustes analysis
   (Gower 1975) of every frame's 478 FaceMesh points, aligned on expression-free vertices
   (:data:`avatar.face.landmarks.RIGID_VERTICES`) with Umeyama's similarity (Umeyama 1991, eq. 40-42),
   then re-aligned on the mesh vertices that moved least in this clip (a per-person rigid set).
   The shape is put in an upright *head frame*: OpenCV-like axes (x towards the image-right eye
   corner, y down the face, z into the head along the face-oval plane's normal), origin at the rigid vertices' centroid, units of
   metres assuming an adult outer-eye-corner distance of :data:`EYE_CORNER_DISTANCE_M`.
2. :func:`fit_poses` - per-frame head-to-camera rotation/translation by perspective-n-point
   (``cv2.solvePnP`` iterative Levenberg-Marquardt, each frame initialised from the previous one)
   of the mean shape's rigid vertices against the frame's 2-D points, with a fixed pinhole camera
   (:func:`default_intrinsics`: GeneFace/AD-NeRF's 1200 px focal at 512 px, scaled with size).
3. :func:`smooth_poses` - zero-phase Savitzky-Golay smoothing (Savitzky & Golay 1964) of the
   rotation (as rotation vectors relative to the mean rotation, so no wrap-around) and of the
   translation; depth (which is the apparent head size) gets a longer window than x/y.
4. :func:`canonical_landmarks` - each frame's 68 iBUG points, similarity-aligned into the head
   frame on the rigid vertices (rotation, translation and scale removed; expression kept), then
   divided by ``head_scale`` so that the outer-eye-corner distance (iBUG 36-45) of the mean is 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.signal import savgol_filter
from scipy.spatial.transform import Rotation

from avatar.face.contracts import Intrinsics
from avatar.face.landmarks import MP_TO_IBUG68, RIGID_VERTICES

log = logging.getLogger(__name__)

#: adult mean exocanthion (outer eye corner) distance, metres; sets the head frame's unit
EYE_CORNER_DISTANCE_M = 0.09
#: GeneFace/AD-NeRF use a 1200 px focal length at 512 px frames
FOCAL_PER_PIXEL = 1200.0 / 512.0

_MP_OUTER_EYE = (33, 263)  # FaceMesh vertices of iBUG 36 and 45


def default_intrinsics(size: int, focal_per_pixel: float = FOCAL_PER_PIXEL) -> Intrinsics:
    """Fixed pinhole intrinsics for ``size x size`` frames: fx = fy = focal_per_pixel * size,
    principal point at the image centre (pixels)."""
    f = float(focal_per_pixel * size)
    return Intrinsics(fx=f, fy=f, cx=size / 2.0, cy=size / 2.0)


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~= s * R @ src + t`` (Umeyama 1991, eq. 40-42).

    Args:
        src, dst: float [K, 3] corresponding points.

    Returns:
        (s float, R float64 [3, 3] proper rotation, t float64 [3]).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    r = u @ sign @ vt
    var_s = (xs**2).sum() / len(src)
    s = float(np.trace(np.diag(d) @ sign) / var_s) if with_scale else 1.0
    t = mu_d - s * r @ mu_s
    return s, r, t


def _apply(s, r, t, pts):
    return (s * (r @ np.asarray(pts, np.float64).T)).T + t


def mean_shape(points: np.ndarray, iterations: int = 3, n_rigid: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """The person's mean 3-D face shape in the upright head frame (metres) and its rigid vertices.

    Generalised Procrustes analysis, first on the fixed expression-free set
    :data:`RIGID_VERTICES`, then on the ``n_rigid`` mesh vertices that moved least (after alignment)
    in this person's clip: a data-driven rigid set, so talking and blinking do not leak into pose.

    Args:
        points: float [N, 478, 3] FaceMesh points per frame (pixels, gaps already filled).
        iterations: generalised-Procrustes iterations per stage.
        n_rigid: size of the data-driven rigid vertex set.

    Returns:
        (shape float64 [478, 3], rigid int64 [n_rigid] vertex indices). ``shape`` axes: x towards the
        image-right outer eye corner, y down the face, z into the head along the normal of the
        face-oval plane (right-handed, OpenCV-like), origin at the rigid vertices' centroid,
        outer-eye-corner distance :data:`EYE_CORNER_DISTANCE_M`.
    """
    points = np.asarray(points, np.float64)

    def gpa(rigid, ref):
        for _ in range(iterations):
            aligned = np.stack([_apply(*umeyama(p[rigid], ref[rigid]), p) for p in points])
            ref = aligned.mean(0)
        return ref, aligned

    # start from the middle frame; each iteration aligns every frame to the current mean
    ref, aligned = gpa(list(RIGID_VERTICES), points[len(points) // 2])
    spread = np.sqrt(((aligned[:, :468] - ref[:468]) ** 2).sum(-1).mean(0))
    rigid = np.sort(np.argsort(spread)[:n_rigid])
    ref, _ = gpa(list(rigid), ref)
    return _canonicalise(ref, rigid), rigid


def _canonicalise(shape: np.ndarray, rigid) -> np.ndarray:
    from avatar.face.landmarks import FACE_OVAL

    a, b = _MP_OUTER_EYE
    oval = shape[list(FACE_OVAL)]
    normal = np.linalg.svd(oval - oval.mean(0))[2][2]
    if normal @ (shape[list(FACE_OVAL)].mean(0) - shape[4]) < 0:  # point from the nose tip into the head
        normal = -normal
    x = shape[b] - shape[a]
    x -= normal * (x @ normal)
    x /= np.linalg.norm(x)
    y = np.cross(normal, x)
    rot = np.stack([x, y, normal])  # rows: new axes in old coordinates
    centred = shape - shape[list(rigid)].mean(0)
    out = centred @ rot.T
    return out * (EYE_CORNER_DISTANCE_M / np.linalg.norm(out[b] - out[a]))


def fit_poses(points: np.ndarray, shape: np.ndarray, rigid: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """Per-frame head-to-camera transforms by PnP of the mean shape's rigid vertices.

    Args:
        points: float [N, 478, 2+] FaceMesh points per frame (pixels of the stored frames).
        shape: float [478, 3] mean shape in the head frame (metres), from :func:`mean_shape`.
        rigid: int [K] rigid vertex indices, from :func:`mean_shape`.
        intrinsics: camera of the stored frames.

    Returns:
        float64 [N, 4, 4] rigid transforms ``X_cam = T @ X_head`` (OpenCV camera axes).
    """
    rigid = list(rigid)
    obj = np.ascontiguousarray(shape[rigid], np.float64)
    k = intrinsics.matrix()
    out = np.zeros((len(points), 4, 4))
    rvec = tvec = None
    for i, p in enumerate(points):
        img = np.ascontiguousarray(p[rigid, :2], np.float64)
        if rvec is None:
            ok, rvec, tvec = cv2.solvePnP(obj, img, k, None, flags=cv2.SOLVEPNP_EPNP)
            ok, rvec, tvec = cv2.solvePnP(obj, img, k, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE)
        else:
            ok, rvec, tvec = cv2.solvePnP(obj, img, k, None, rvec.copy(), tvec.copy(), True, cv2.SOLVEPNP_ITERATIVE)
        out[i, :3, :3] = cv2.Rodrigues(rvec)[0]
        out[i, :3, 3] = tvec.ravel()
        out[i, 3, 3] = 1.0
    return out


def smooth_poses(
    poses: np.ndarray, fps: float = 25.0, window_s: float = 0.5, depth_window_s: float = 1.0
) -> np.ndarray:
    """Zero-phase Savitzky-Golay smoothing (order 2) of a pose track.

    Rotation is smoothed as rotation vectors relative to the track's mean rotation (no wrap-around
    for heads, which turn well under 180 deg); x/y translation with ``window_s``; depth z (the head's
    apparent size) with the longer ``depth_window_s``.

    Args:
        poses: float [N, 4, 4] head-to-camera transforms.

    Returns:
        float64 [N, 4, 4] smoothed transforms (unchanged when N is shorter than the window).
    """
    n = len(poses)
    out = np.array(poses, np.float64, copy=True)

    def win(seconds):
        w = int(round(seconds * fps)) | 1
        return min(w, n if n % 2 else n - 1)

    w, wz = win(window_s), win(depth_window_s)
    if w < 5:
        return out
    rots = Rotation.from_matrix(out[:, :3, :3])
    mean = rots.mean()
    rel = (mean.inv() * rots).as_rotvec()
    rel = savgol_filter(rel, w, 2, axis=0, mode="interp")
    out[:, :3, :3] = (mean * Rotation.from_rotvec(rel)).as_matrix()
    out[:, :2, 3] = savgol_filter(out[:, :2, 3], w, 2, axis=0, mode="interp")
    out[:, 2, 3] = savgol_filter(out[:, 2, 3], max(wz, 5), 2, mode="interp")
    return out


def canonical_landmarks(
    points: np.ndarray, shape: np.ndarray, rigid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pose-free, scale-normalised 68-point landmarks per frame.

    Args:
        points: float [N, 478, 3] FaceMesh points per frame (pixels, mediapipe depth).
        shape: float [478, 3] mean shape in the head frame (metres).
        rigid: int [K] rigid vertex indices (alignment is on these).

    Returns:
        (lm3d float32 [N, 68, 3], lm3d_mean float32 [68, 3], head_scale float) with
        ``head_scale * lm3d`` in head-frame metres and |lm3d_mean[36] - lm3d_mean[45]| = 1.
    """
    rigid = list(rigid)
    idx = list(MP_TO_IBUG68)
    lm = np.empty((len(points), 68, 3), np.float64)
    for i, p in enumerate(points):
        s, r, t = umeyama(p[rigid], shape[rigid])
        lm[i] = _apply(s, r, t, p[idx])
    mean = lm.mean(0)
    head_scale = float(np.linalg.norm(mean[36] - mean[45]))
    return (lm / head_scale).astype(np.float32), (mean / head_scale).astype(np.float32), head_scale


def euler_deg(poses: np.ndarray) -> np.ndarray:
    """float64 [N, 3] intrinsic pitch (x), yaw (y), roll (z) angles in degrees of ``poses[:, :3, :3]``."""
    return Rotation.from_matrix(np.asarray(poses)[:, :3, :3]).as_euler("xyz", degrees=True)


@dataclass
class RotationNoise:
    """Frame-to-frame rotation change on the most static stretch of a clip (degrees).

    ``start``/``stop`` are frame indices of the stretch; ``raw_deg``/``smoothed_deg`` are the RMS of
    the angle between consecutive rotations before/after smoothing.
    """

    start: int
    stop: int
    raw_deg: float
    smoothed_deg: float


def _step_angles(poses):
    r = Rotation.from_matrix(np.asarray(poses)[:, :3, :3])
    return np.degrees((r[:-1].inv() * r[1:]).magnitude())


def rotation_noise(raw: np.ndarray, smoothed: np.ndarray, fps: float = 25.0, window_s: float = 2.0) -> RotationNoise:
    """Measure rotation jitter on the most static ``window_s`` stretch (least heavily-smoothed motion).

    Args:
        raw, smoothed: float [N, 4, 4] pose tracks (before / after :func:`smooth_poses`).
    """
    n = len(raw)
    w = min(n, max(3, int(round(window_s * fps))))
    heavy = smooth_poses(raw, fps, window_s=1.0, depth_window_s=1.0)
    motion = np.concatenate([[0.0], np.cumsum(_step_angles(heavy))])
    total = motion[w - 1 :] - motion[: n - w + 1]
    start = int(np.argmin(total))
    stop = start + w
    a_raw, a_s = _step_angles(raw[start:stop]), _step_angles(smoothed[start:stop])
    return RotationNoise(start, stop, float(np.sqrt(np.mean(a_raw**2))), float(np.sqrt(np.mean(a_s**2))))
