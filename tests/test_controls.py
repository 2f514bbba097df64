"""Expression / head-motion controls (avatar.pipeline.controls) on real tracked data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from avatar.data.dataset import EYES
from avatar.errors import InvalidInput
from avatar.face.landmarks import eye_aspect_ratio
from avatar.pipeline.controls import BLINK_FRAMES, BlinkModel, BlinkSchedule, PoseReplay, apply_eyes, mean_pose
from avatar.pipeline.render import RenderOptions


@pytest.fixture(scope="module")
def tracked(data_dir):
    """Real tracked clip: 4 s of a talking speaker -> (poses [N,4,4], lm3d [N,68,3], ear [N])."""
    from avatar.face.landmarks import FaceMeshTracker
    from avatar.face.pose import canonical_landmarks, default_intrinsics, fit_poses, mean_shape, smooth_poses
    from avatar.media import iter_video_frames

    pts = []
    with FaceMeshTracker() as tracker:
        for i, img in enumerate(iter_video_frames(data_dir / "speakers" / "lieu_60s_256.mp4")):
            if i >= 60:
                break
            res = tracker(img)
            assert res is not None
            pts.append(res.points)
    pts = np.stack(pts)
    shape, rigid = mean_shape(pts)
    poses = smooth_poses(fit_poses(pts, shape, rigid, default_intrinsics(img.shape[0]))).astype(np.float32)
    lm3d, _, _ = canonical_landmarks(pts, shape, rigid)
    return poses, lm3d, eye_aspect_ratio(lm3d)


def _max_step_deg(poses: np.ndarray) -> float:
    r = Rotation.from_matrix(poses[:, :3, :3].astype(np.float64))
    return float(np.degrees((r[1:] * r[:-1].inv()).magnitude()).max())


def test_replay_reproduces_and_pingpongs(tracked):
    poses = tracked[0]
    m = len(poses)
    rep = PoseReplay(poses)
    np.testing.assert_allclose(rep(np.arange(m)), poses, atol=1e-5)
    # after the end the track plays backwards: no jump at the loop point
    np.testing.assert_allclose(rep(np.arange(m - 1, 2 * m - 1)), poses[::-1], atol=1e-5)


@pytest.mark.parametrize("speed,amplitude", [(1.0, 1.0), (0.5, 1.0), (0.3, 0.5), (2.0, 1.0), (1.0, 2.0)])
def test_replay_smooth_no_jumps(tracked, speed, amplitude):
    poses = tracked[0]
    recorded = _max_step_deg(poses)
    out = PoseReplay(poses, speed=speed, amplitude=amplitude)(np.arange(4 * len(poses)))
    step = _max_step_deg(out)
    # re-timing by `speed` and scaling by `amplitude` scale the per-frame change at most by their product
    assert step <= recorded * max(1.0, speed) * max(1.0, amplitude) * 1.05 + 1e-4
    if speed <= 1 and amplitude <= 1:
        assert step <= recorded + 1e-4
    # translation continuity as well
    dt = np.linalg.norm(np.diff(out[:, :3, 3], axis=0), axis=1).max()
    rec_dt = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1).max()
    assert dt <= rec_dt * max(1.0, speed) * max(1.0, amplitude) * 1.05 + 1e-6


def test_replay_amplitude_scales_deviation(tracked):
    poses = tracked[0]
    mean = mean_pose(poses)
    r_mean = Rotation.from_matrix(mean[:3, :3].astype(np.float64))

    def dev_deg(track):
        return np.degrees((r_mean.inv() * Rotation.from_matrix(track[:, :3, :3].astype(np.float64))).magnitude())

    f = np.arange(len(poses))
    full = dev_deg(PoseReplay(poses)(f))
    half = dev_deg(PoseReplay(poses, amplitude=0.5)(f))
    assert full.max() > 0.5  # a real talking head moves
    np.testing.assert_allclose(half, 0.5 * full, rtol=1e-3, atol=1e-3)


def test_still_holds_mean_pose(tracked):
    poses = tracked[0]
    out = PoseReplay(poses, still=True)(np.arange(300))
    np.testing.assert_allclose(out, np.broadcast_to(mean_pose(poses), out.shape), atol=1e-6)
    np.testing.assert_array_equal(PoseReplay(poses, amplitude=0.0)(np.arange(50)), out[:50])


@pytest.mark.parametrize("rate", [6.0, 12.0, 30.0, 50.0])
def test_blink_rate_per_minute(rate):
    frames = np.arange(25 * 60 * 20)  # 20 minutes
    closure = BlinkSchedule(rate, seed=3)(frames)
    onsets = np.sum((closure[1:] > 0) & (closure[:-1] == 0))
    measured = onsets / 20.0
    assert abs(measured - rate) / rate < 0.08, measured


def test_blinks_off_deterministic_and_blockwise():
    frames = np.arange(2000)
    assert not BlinkSchedule(0.0)(frames).any()
    a = BlinkSchedule(15.0, seed=7)(frames)
    blocks = BlinkSchedule(15.0, seed=7)
    b = np.concatenate([blocks(frames[i : i + 8]) for i in range(0, 2000, 8)])
    np.testing.assert_array_equal(a, b)
    assert a.max() == pytest.approx(1.0, abs=0.05)
    assert not np.array_equal(a, BlinkSchedule(15.0, seed=8)(frames))
    # each blink lasts BLINK_FRAMES frames
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], (a > 0).astype(int), [0]]))))[::2]
    assert set(runs.tolist()) <= {BLINK_FRAMES - 1, BLINK_FRAMES}


def test_blink_model_closes_real_eyes(tracked):
    _, lm3d, ear = tracked
    model = BlinkModel.fit(lm3d, ear)
    assert 4.0 <= model.rate_per_min <= 30.0
    base = np.repeat(lm3d[:1], 3, axis=0)
    out = apply_eyes(base, np.array([0.0, 0.5, 1.0], np.float32), model)
    e = eye_aspect_ratio(out)
    assert e[0] > e[1] > e[2]
    assert e[2] < 0.5 * e[0]
    # only the eyes change
    others = [i for i in range(68) if i not in EYES]
    np.testing.assert_array_equal(out[:, others], base[:, others])
    restored = BlinkModel.from_dict(model.to_dict())
    np.testing.assert_array_equal(restored.eyes_closed_delta, model.eyes_closed_delta)


@pytest.mark.parametrize(
    "changes",
    [
        {"blink_rate": -1.0},
        {"blink_rate": 61.0},
        {"head_speed": 0.0},
        {"head_amplitude": 2.5},
        {"head_amplitude": -0.1},
    ],
)
def test_bad_control_values(changes):
    with pytest.raises(InvalidInput):
        RenderOptions().updated(**changes)
