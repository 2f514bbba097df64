"""``avatar eval-nerf``: PSNR / SSIM of the trained NeRFs on the validation tail, with baselines.

Driven by the tracked landmarks and poses of the validation frames (self-reconstruction, the
setting of GeneFace / RAD-NeRF / ER-NeRF Tab. 1). Metrics on the full composited frame, the face
box and the mouth box (from lm2d); baselines on the same frames (the bar the render must clear,
issue 18): the frozen frame (the last training frame repeated, what a still photo of the person
scores), the mean training frame and the background plate alone. :func:`fidelity_table` prints them
side by side. Writes ``metrics.json``, ``table.txt``, a side-by-side MP4 (ground truth | render) and
PNGs of a few frames.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar.data.dataset import Dataset
from avatar.errors import InvalidInput
from avatar.nerf.inference import load_nerf
from avatar.nerf.datamanager import face_box, landmark_window, mouth_box
from avatar.nerf.losses import psnr_from_mse

log = logging.getLogger(__name__)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images (peak 255)."""
    return psnr_from_mse(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)), 255.0)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of uint8 RGB images [H, W, 3] (channel average).

    Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
    similarity", IEEE TIP 2004, Eq. 13: Gaussian window sigma 1.5 (11 x 11), K1 0.01, K2 0.03,
    L 255, sample covariances (as skimage's ``gaussian_weights=True, use_sample_covariance=False``).
    """
    from scipy.ndimage import gaussian_filter  # lazy: a render/training host may lack SciPy (bench_gpu)

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(m[5:-5, 5:-5].mean() if min(m.shape) > 10 else m.mean())
    return float(np.mean(vals))


def redetect_mouth(frames: list[np.ndarray]) -> np.ndarray:
    """Mouth landmarks re-detected on images: float32 [N, 20, 2] pixels (iBUG 48-67, MediaPipe FaceMesh
    -> iBUG-68 as in preprocessing), NaN rows where no face is found. ``frames``: uint8 RGB [H, W, 3]."""
    from avatar.face.landmarks import FaceMeshTracker

    out = np.full((len(frames), 20, 2), np.nan, dtype=np.float32)
    with FaceMeshTracker() as tracker:
        for i, f in enumerate(frames):
            r = tracker(np.ascontiguousarray(f))
            if r is not None:
                out[i] = r.lm68[48:68, :2]
    return out


def inner_lip_opening(mouth: np.ndarray) -> np.ndarray:
    """Inner-lip opening float [N] (pixels) of mouth points [N, 20, 2] (iBUG 48-67, as :func:`redetect_mouth`
    gives): mean distance of the facing inner-lip points, :func:`avatar.face.contracts.mouth_opening`'s rule."""
    from avatar.face.contracts import INNER_LOWER, INNER_UPPER

    up, lo = [i - 48 for i in INNER_UPPER], [i - 48 for i in INNER_LOWER]  # rows among the 20 mouth points
    return np.linalg.norm(mouth[:, up] - mouth[:, lo], axis=-1).mean(-1)


def mouth_amplitude(rendered: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """How much the rendered mouth moves compared with the real one (issue 18): ``(std ratio, r)`` of the
    inner-lip opening (:func:`inner_lip_opening`, pixels) of the re-detected mouths [N, 20, 2] of
    :func:`redetect_mouth` over the frames where both faces were found; std ratio 1 is
    the real amplitude, r the Pearson correlation of the two openings. NaNs when fewer than 3 frames."""
    ok = ~(np.isnan(rendered).any((1, 2)) | np.isnan(real).any((1, 2)))
    if ok.sum() < 3:
        return float("nan"), float("nan")
    a, b = inner_lip_opening(rendered[ok]), inner_lip_opening(real[ok])
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    return float(a.std() / max(float(b.std()), 1e-9)), r


def _crop(img: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


#: the render and its baselines, in table order
SYSTEMS = ("render", "frozen_frame", "mean_frame", "background")


def fidelity_table(metrics: dict) -> str:
    """Plain-text table of an :func:`evaluate_nerf` result: one row per system (render, then each
    baseline), columns PSNR (dB) and SSIM on the full frame and the mouth box, and the render's
    PSNR gain over each baseline. Rows missing from ``metrics`` are skipped."""
    cols = ("psnr_full", "psnr_mouth", "ssim_full", "ssim_mouth")
    lines = [f"{'system':<13}" + "".join(f"{c:>12}" for c in cols) + f"{'render gain dB (full/mouth)':>30}"]
    r = metrics.get("render", {})
    for name in SYSTEMS:
        m = metrics.get(name)
        if not m:
            continue
        gain = (
            ""
            if name == "render"
            else f"{r['psnr_full'] - m['psnr_full']:+.2f} / {r['psnr_mouth'] - m['psnr_mouth']:+.2f}"
        )
        lines.append(f"{name:<13}" + "".join(f"{m[c]:>12.4f}" for c in cols) + f"{gain:>30}")
    amp = metrics.get("mouth_amplitude")
    if amp:
        lines.append(
            f"mouth opening (re-detected): std render / real {amp['std_ratio']:.2f} (target 0.8-1.2), r {amp['r']:.2f}"
        )
    return "\n".join(lines)


def evaluate_nerf(
    dataset: str | Path,
    model: str | Path,
    out: str | Path | None = None,
    max_frames: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluate ``model`` (an ``avatar train-nerf`` output) on ``dataset``'s validation frames.

    Returns the metrics dict (also written to ``out/metrics.json`` when ``out`` is given, with
    ``table.txt``, ``side_by_side.mp4`` and ``frame_*.png``): for each of ``render``,
    ``frozen_frame`` (the last training frame shown for every evaluated frame), ``mean_frame`` and
    ``background``: ``psnr``/``ssim`` on ``full``, ``face``, ``mouth`` (means over frames, dB / [0, 1];
    the boxes come from each evaluated frame's tracked landmarks), ``mouth_amplitude`` (the render's
    :func:`mouth_amplitude` against the real frames: ``std_ratio``, ``r``; ``None`` with a warning where
    mediapipe is not installed, as on a render-only GPU host), plus ``frames`` (the evaluated
    frame indices) and ``frozen_frame_index``. The table (:func:`fidelity_table`) is also logged.

    Raises:
        InvalidInput: the dataset has no validation frames. BundleCorrupt: bad dataset/model.
    """
    ds = Dataset(dataset)
    nerf = load_nerf(model, device=device)
    val = list(ds.val_range)
    if not val:
        raise InvalidInput(f"{ds.root} has no validation frames; re-run `avatar preprocess`")
    if max_frames:
        val = val[:: max(1, len(val) // max_frames)][:max_frames]
    S = ds.size
    bg = np.asarray(ds.background)
    tr = list(ds.train_range)
    sample = tr[:: max(1, len(tr) // 200)]
    mean_frame = np.zeros((S, S, 3), np.float64)
    for i in sample:
        mean_frame += ds.frames[i]
    mean_frame = np.round(mean_frame / len(sample)).astype(np.uint8)
    frozen = np.asarray(ds.frames[tr[-1]])  # the frozen-frame baseline: the last training frame
    nerf.set_background(bg)
    lm3d = torch.from_numpy(np.asarray(ds.lm3d, dtype=np.float32).copy())
    pose = torch.from_numpy(np.asarray(ds.pose, dtype=np.float32).copy())
    blink = torch.from_numpy(np.asarray(ds.blink, dtype=np.float32).copy())
    acc: dict[str, dict[str, list[float]]] = {k: {} for k in SYSTEMS}
    renders, gts = [], []  # for the mouth amplitude (re-detected after the loop)
    writer = None
    outp = Path(out) if out else None
    if outp:
        outp.mkdir(parents=True, exist_ok=True)
        from avatar.media import VideoWriter

        w = 2 * S + (2 * S) % 2
        writer = VideoWriter(outp / "side_by_side.mp4", fps=ds.fps, size=(w, S + S % 2)).__enter__()
    try:
        for n, f in enumerate(tqdm(val, desc="eval-nerf", disable=not progress)):
            win = landmark_window(ds.n_frames, np.array([f]), nerf.window)
            img = nerf.render(lm3d[win], pose[f][None], blink=blink[f][None])[0].cpu().numpy()
            gt = np.asarray(ds.frames[f])
            renders.append(img)
            gts.append(gt)
            boxes = {"full": (0, 0, S, S), "face": face_box(ds.lm2d[f], S), "mouth": mouth_box(ds.lm2d[f], S)}
            preds = {"render": img, "frozen_frame": frozen, "mean_frame": mean_frame, "background": bg}
            for name, pred in preds.items():
                for region, box in boxes.items():
                    a, b = _crop(pred, box), _crop(gt, box)
                    acc[name].setdefault(f"psnr_{region}", []).append(psnr(a, b))
                    acc[name].setdefault(f"ssim_{region}", []).append(ssim(a, b))
            if writer is not None:
                frame = np.zeros((S + S % 2, 2 * S + (2 * S) % 2, 3), np.uint8)
                frame[:S, :S], frame[:S, S : 2 * S] = gt, img
                writer.write(frame)
            if outp and n < 3:
                import cv2

                cv2.imwrite(
                    str(outp / f"frame_{f:05d}.png"), cv2.cvtColor(np.concatenate((gt, img), 1), cv2.COLOR_RGB2BGR)
                )
    finally:
        if writer is not None:
            writer.__exit__(None, None, None)
    metrics = {name: {k: round(float(np.mean(v)), 4) for k, v in d.items()} for name, d in acc.items()}
    try:
        std_ratio, r = mouth_amplitude(redetect_mouth(renders), redetect_mouth(gts))
        metrics["mouth_amplitude"] = {"std_ratio": round(std_ratio, 4), "r": round(r, 4)}
    except ImportError as e:  # a render/training host without the preprocessing stack (`make gpu-bundle` hosts)
        log.warning("mouth amplitude not measured: re-detecting mouths needs mediapipe (%s); `make venv` has it", e)
        metrics["mouth_amplitude"] = None
    metrics["n_frames"] = len(val)
    metrics["size"] = S
    metrics["model"] = str(model)
    metrics["dataset"] = str(ds.root)
    metrics["frames"] = [int(f) for f in val]
    metrics["frozen_frame_index"] = int(tr[-1])
    table = fidelity_table(metrics)
    log.info("fidelity on %d validation frames (%d px):\n%s", len(val), S, table)
    if outp:
        (outp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (outp / "table.txt").write_text(table + "\n")
    return metrics
