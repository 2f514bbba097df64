"""Preview images of a dataset: a contact sheet (frames with landmarks, pose axes and masks) and a
plot of the pose / blink signals over time. For humans checking ``avatar preprocess`` output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from avatar.data.dataset import JAW, LEFT_EYE, MOUTH, RIGHT_EYE, Intrinsics

_COLOURS = {1: (40, 220, 40), 2: (255, 60, 60)}  # torso green, head red (RGB)


def _draw_frame(frame, labels, lm2d, pose, intr: Intrinsics, axis_len_m: float) -> np.ndarray:
    img = frame.copy()
    overlay = img.copy()
    for label, colour in _COLOURS.items():
        overlay[labels == label] = colour
    img = cv2.addWeighted(img, 0.65, overlay, 0.35, 0)
    s = img.shape[0]
    r = max(1, s // 128)
    for k, (x, y) in enumerate(lm2d):
        colour = (
            (0, 255, 0)
            if k in JAW
            else (255, 255, 0)
            if k in LEFT_EYE + RIGHT_EYE
            else (255, 0, 255)
            if k in MOUTH
            else (255, 255, 255)
        )
        cv2.circle(img, (int(round(x)), int(round(y))), r, colour, -1, cv2.LINE_AA)
    # head axes: x red, y green, z blue, from the head-frame origin
    pts = np.array([[0, 0, 0], [axis_len_m, 0, 0], [0, axis_len_m, 0], [0, 0, axis_len_m]], np.float64)
    cam = (pose[:3, :3] @ pts.T).T + pose[:3, 3]
    uv = (intr.matrix() @ cam.T).T
    uv = uv[:, :2] / uv[:, 2:3]
    o = tuple(int(v) for v in uv[0].round())
    for j, colour in zip((1, 2, 3), ((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        cv2.line(img, o, tuple(int(v) for v in uv[j].round()), colour, max(1, s // 160), cv2.LINE_AA)
    return img


def contact_sheet(
    frames,
    masks,
    lm2d,
    poses,
    intr: Intrinsics,
    head_scale: float,
    path: str | Path,
    n: int = 12,
    cols: int = 4,
    tile: int = 256,
) -> None:
    """Write a PNG grid of ``n`` evenly spaced frames with landmarks, head axes and mask tint.

    Args:
        frames: uint8 [N, S, S, 3]; masks: uint8 [N, S, S]; lm2d: float [N, 68, 2] pixels;
        poses: float [N, 4, 4] head-to-camera; intr: camera of the frames;
        head_scale: canonical scale (metres per lm3d unit), sets the drawn axis length.
        path: output PNG; tile: side of each tile in pixels.
    """
    total = len(frames)
    idx = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    tiles = []
    for i in idx:
        img = _draw_frame(np.asarray(frames[i]), np.asarray(masks[i]), lm2d[i], poses[i], intr, head_scale)
        img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        cv2.putText(
            img, f"#{i} {i / 25:.1f}s", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA
        )
        tiles.append(img)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[k : k + cols], axis=1) for k in range(0, len(tiles), cols)]
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


def signals_plot(raw_poses, poses, blink, face_valid, path: str | Path, fps: float = 25.0) -> None:
    """Write a PNG plot of head angles (raw and smoothed, degrees), translation (cm about the mean) and blink
    (eye aspect ratio) over time (seconds); frames with an interpolated face are shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from avatar.face.pose import euler_deg

    t = np.arange(len(poses)) / fps
    e_raw, e = euler_deg(raw_poses), euler_deg(poses)
    fig, ax = plt.subplots(3, 1, figsize=(12, 8), sharex=True)
    for k, name in enumerate(("pitch", "yaw", "roll")):
        ax[0].plot(t, e_raw[:, k], lw=0.5, alpha=0.5, color=f"C{k}")
        ax[0].plot(t, e[:, k], lw=1.2, color=f"C{k}", label=name)
    ax[0].set_ylabel("rotation (deg)\nthin: raw, thick: smoothed")
    ax[0].legend(loc="upper right", ncol=3)
    for k, name in enumerate(("tx", "ty", "tz")):
        mean = poses[:, k, 3].mean()
        ax[1].plot(t, 100 * (raw_poses[:, k, 3] - mean), lw=0.5, alpha=0.5, color=f"C{k}")
        ax[1].plot(t, 100 * (poses[:, k, 3] - mean), lw=1.2, color=f"C{k}", label=f"{name} (mean {mean:.3f} m)")
    ax[1].set_ylabel("translation - mean (cm)")
    ax[1].legend(loc="upper right", ncol=3)
    ax[2].plot(t, blink, lw=0.8, color="k")
    ax[2].set_ylabel("blink (EAR)")
    ax[2].set_xlabel("time (s)")
    bad = np.flatnonzero(~np.asarray(face_valid, bool))
    for a in ax:
        for i in bad:
            a.axvspan(i / fps, (i + 1) / fps, color="orange", alpha=0.3, lw=0)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    plt.close(fig)
