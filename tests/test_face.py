"""Face tracking pieces on real frames: FaceMesh -> iBUG-68 mapping, crop window, pose, masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from avatar.data.dataset import JAW, LEFT_EYE, MOUTH, NOSE, RIGHT_EYE
from avatar.face.crop import choose_crop, select_track
from avatar.face.landmarks import MP_TO_IBUG68, FaceDetector, FaceMeshTracker, eye_aspect_ratio, fill_gaps, find_gaps
from avatar.face.masks import PersonSegmenter, background_plate, label_frame, oval_points
from avatar.face.pose import (
    canonical_landmarks,
    default_intrinsics,
    fit_poses,
    mean_shape,
    rotation_noise,
    smooth_poses,
    umeyama,
)
from avatar.media import iter_video_frames


@pytest.fixture(scope="module")
def acosta_frames(data_dir):
    """First 40 frames (1.6 s) of the real speaker clip, 256 px, uint8 RGB."""
    out = []
    for img in iter_video_frames(data_dir / "speakers" / "acosta_cnn_71s.mp4", fps=25, size=256):
        out.append(img)
        if len(out) == 40:
            break
    return np.stack(out)


@pytest.fixture(scope="module")
def acosta_mesh(acosta_frames):
    with FaceMeshTracker() as tracker:
        res = [tracker(f) for f in acosta_frames]
    assert all(r is not None for r in res)
    return np.stack([r.points for r in res])


def test_ibug68_arrangement_on_real_face(acosta_frames, acosta_mesh):
    with FaceDetector() as det:
        box = det(acosta_frames[0])[0]
    x0, y0, x1, y1 = box[:4]
    h = y1 - y0
    lm = acosta_mesh[0][list(MP_TO_IBUG68), :2]
    # everything near the detector's face box (jaw/brows may stick out a little)
    assert (lm[:, 0] > x0 - 0.15 * h).all() and (lm[:, 0] < x1 + 0.15 * h).all()
    assert (lm[:, 1] > y0 - 0.15 * h).all() and (lm[:, 1] < y1 + 0.25 * h).all()
    eyes_y = lm[LEFT_EYE + RIGHT_EYE, 1].mean()
    brows_y = lm[17:27, 1].mean()
    nose_tip_y = lm[30, 1]
    mouth_y = lm[MOUTH, 1].mean()
    assert brows_y < eyes_y < nose_tip_y < mouth_y < lm[8, 1]  # chin lowest on the midline
    assert lm[8, 1] == lm[JAW, 1].max()
    # iBUG left/right: 36-41 on the image left, 42-47 on the image right; jaw runs left -> right
    assert lm[LEFT_EYE, 0].max() < lm[27, 0] < lm[RIGHT_EYE, 0].min()
    assert lm[0, 0] < lm[8, 0] < lm[16, 0]
    assert lm[36, 0] < lm[39, 0] and lm[42, 0] < lm[45, 0]  # outer -> inner corner order
    assert lm[48, 0] < lm[51, 0] < lm[54, 0] and lm[51, 1] < lm[62, 1] <= lm[66, 1] < lm[57, 1]
    assert lm[NOSE[-5:], 0].min() > lm[48, 0] - 0.05 * h  # nose base above the mouth, inside it
    # symmetry: the midline points sit between the outer eye corners
    mid = 0.5 * (lm[36, 0] + lm[45, 0])
    assert abs(lm[30, 0] - mid) < 0.08 * h and abs(lm[8, 0] - mid) < 0.12 * h


def test_eye_aspect_ratio_open_vs_closed():
    eye = np.array([[0, 0], [1, -0.35], [2, -0.35], [3, 0], [2, 0.35], [1, 0.35]], np.float64)
    lm = np.zeros((68, 2))
    lm[36:42] = eye
    lm[42:48] = eye + [5, 0]
    closed = lm.copy()
    closed[[37, 38, 40, 41, 43, 44, 46, 47], 1] *= 0.1
    assert eye_aspect_ratio(lm) == pytest.approx(0.7 / 3, rel=1e-5)
    assert eye_aspect_ratio(closed) < 0.3 * eye_aspect_ratio(lm)


def test_fill_gaps_interpolates_short_and_reports_long():
    pts = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 2, 3), np.float32)
    valid = np.ones(20, bool)
    valid[[0, 5, 6]] = False
    valid[10:16] = False
    assert find_gaps(valid) == [(0, 1), (5, 7), (10, 16)]
    orig = pts.copy()
    pts[~valid] = -1
    long = fill_gaps(pts, valid, max_gap=3)
    assert long == [(10, 16)]
    np.testing.assert_allclose(pts[5:7], orig[5:7])  # linear data is recovered exactly
    np.testing.assert_allclose(pts[0], orig[1])  # leading gap copies the first detection


def test_select_track_and_crop_window():
    big = np.array([100, 100, 200, 220, 0.9], np.float32)
    small = np.array([400, 50, 430, 86, 0.8], np.float32)
    dets = [np.stack([big + [k, 0, k, 0, 0], small]) for k in range(-5, 6)] + [np.zeros((0, 5), np.float32)]
    boxes, several = select_track(dets)
    assert several and len(boxes) == 11 and (boxes[:, 2] - boxes[:, 0] > 90).all()
    crop = choose_crop(boxes, 640, 480)
    assert 0 <= crop.x0 and crop.x0 + crop.side <= 640 and 0 <= crop.y0 and crop.y0 + crop.side <= 480
    assert crop.side == round(2.4 * 120)
    # every sampled face inside the window, face centre a bit above the window's middle
    assert crop.x0 <= boxes[:, 0].min() and boxes[:, 2].max() <= crop.x0 + crop.side
    assert crop.y0 <= boxes[:, 1].min() and boxes[:, 3].max() <= crop.y0 + crop.side
    assert (160 - crop.y0) / crop.side == pytest.approx(0.45, abs=0.01)
    # face near the border: the window is clamped into the image, and shrinks to the short side
    edge = choose_crop(np.array([[0, 0, 100, 200]], np.float32), 300, 260)
    assert (edge.x0, edge.y0, edge.side) == (0, 0, 260)


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 3))
    r = Rotation.from_rotvec([0.2, -0.4, 0.1]).as_matrix()
    dst = 2.5 * src @ r.T + [1, 2, 3]
    s, r_est, t = umeyama(src, dst)
    assert s == pytest.approx(2.5) and np.allclose(r_est, r) and np.allclose(t, [1, 2, 3])


def test_pose_and_canonical_landmarks_on_real_clip(acosta_mesh):
    size = 256
    intr = default_intrinsics(size)
    assert intr.fx == pytest.approx(600.0) and intr.cx == 128.0
    shape, rigid = mean_shape(acosta_mesh)
    assert np.linalg.norm(shape[263] - shape[33]) == pytest.approx(0.09)
    assert shape[152, 1] > shape[10, 1] and shape[4, 2] < shape[rigid].mean(0)[2]  # chin down, nose towards camera
    raw = fit_poses(acosta_mesh, shape, rigid, intr)
    assert (raw[:, 2, 3] > 0.3).all() and (raw[:, 2, 3] < 3.0).all()  # in front of the camera, metres
    # the fitted pose reprojects the mean shape onto the tracked 2-D points within a few pixels
    cam = np.einsum("nij,kj->nki", raw[:, :3, :3], shape) + raw[:, None, :3, 3]
    uv = cam[..., :2] / cam[..., 2:] * intr.fx + intr.cx
    err = np.linalg.norm(uv[:, rigid] - acosta_mesh[:, rigid, :2], axis=-1)
    assert np.median(err) < 2.0
    smooth = smooth_poses(raw, 25.0)
    noise = rotation_noise(raw, smooth, 25.0, window_s=1.0)
    assert noise.smoothed_deg <= noise.raw_deg and noise.stop - noise.start == 25
    lm3d, mean, scale = canonical_landmarks(acosta_mesh, shape, rigid)
    assert lm3d.shape == (40, 68, 3) and lm3d.dtype == np.float32
    assert np.linalg.norm(mean[36] - mean[45]) == pytest.approx(1.0, abs=1e-5)
    assert scale == pytest.approx(0.09, rel=0.05)
    assert mean[8, 1] > mean[51, 1] > mean[30, 1] > mean[27, 1]  # canonical frame: y down the face
    assert np.abs(lm3d - mean).max() < 0.5  # expression only, no pose left


def test_smoothing_keeps_motion_removes_jitter():
    rng = np.random.default_rng(1)
    n = 200
    yaw = np.linspace(0, 20, n)  # a slow real turn (deg)
    true = np.tile(np.eye(4), (n, 1, 1))
    true[:, :3, :3] = Rotation.from_euler("y", yaw[:, None], degrees=True).as_matrix()
    true[:, 2, 3] = 1.0
    noisy = true.copy()
    noisy[:, :3, :3] = (
        Rotation.from_rotvec(rng.normal(scale=np.radians(0.5), size=(n, 3))) * Rotation.from_matrix(true[:, :3, :3])
    ).as_matrix()
    noisy[:, 2, 3] += rng.normal(scale=0.01, size=n)
    sm = smooth_poses(noisy, 25.0)
    ang = lambda a, b: np.degrees(
        (Rotation.from_matrix(a[:, :3, :3]).inv() * Rotation.from_matrix(b[:, :3, :3])).magnitude()
    )
    assert ang(sm, true)[10:-10].mean() < 0.5 * ang(noisy, true)[10:-10].mean()
    assert np.abs(sm[:, 2, 3] - 1).mean() < 0.4 * np.abs(noisy[:, 2, 3] - 1).mean()


def test_masks_on_real_frame(acosta_frames, acosta_mesh):
    with PersonSegmenter() as seg:
        person = seg(acosta_frames[0])
    labels = label_frame(person, oval_points(acosta_mesh[0]))
    frac = [(labels == k).mean() for k in range(3)]
    assert 0.1 < frac[0] < 0.8 and 0.05 < frac[1] < 0.6 and 0.05 < frac[2] < 0.6
    lm = acosta_mesh[0]
    nose = lm[4, :2].astype(int)
    assert labels[nose[1], nose[0]] == 2
    assert labels[-1, 128] == 1  # bottom centre: shoulders / shirt
    assert labels[5, 5] == 0  # top-left corner: studio background
    forehead_top = lm[10, :2].astype(int)
    assert labels[max(0, forehead_top[1] - 10), forehead_top[0]] == 2  # hair above the forehead is head


def test_background_plate_removes_moving_person():
    rng = np.random.default_rng(2)
    s, n = 64, 12
    bg = rng.integers(0, 255, size=(s, s, 3), dtype=np.uint8)
    frames = np.repeat(bg[None], n, 0)
    masks = np.zeros((n, s, s), np.uint8)
    for i in range(n):
        x = 4 * i
        frames[i, 20:50, x : x + 12] = 0
        masks[i, 18:52, x : x + 14] = 2
    masks[:, 30:34, 30:34] = 1  # never background in any frame -> inpainted
    plate = background_plate(frames, masks, np.arange(n), band=16, halo_px=1)
    seen = np.ones((s, s), bool)
    seen[28:36, 28:36] = False
    assert np.abs(plate.astype(int) - bg)[seen].max() <= 1
    assert plate[30:34, 30:34].std() > 0  # filled, not left black
