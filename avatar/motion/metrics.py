"""Audio-to-motion quality metrics (used by tests, training logs and ``avatar eval-motion``).

Self-driven (the person's validation tail, driven with its own audio), for generator-only,
generator+postnet and generator+LLE:
    * LMD (landmark distance; Chen et al. 2019 "ATVGnet", Sec. 4): mean Euclidean distance between
      predicted and tracked landmarks, over the 20 mouth points and over all 68, in canonical units
      (outer-eye-corner distance = 1) and in pixels (both projected with the tracked pose +
      intrinsics, so only the motion differs);
    * mouth-opening correlation: Pearson r of the inner-lip opening (mean |upper - lower| of the
      inner-lip pairs 61-67, 62-66, 63-65) between prediction and tracking;
    * SyncNet confidence and offset (:func:`avatar.motion.syncnet.sync_confidence`).
Any audio (e.g. other languages): SyncNet confidence and the Pearson r between mouth opening and
the audio RMS energy per frame; silence: mean mouth opening and frame-to-frame motion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avatar.data.dataset import MOUTH, Dataset
from avatar.errors import InvalidInput
from avatar.face.contracts import INNER_LOWER, INNER_UPPER, mouth_opening  # noqa: F401 (their home; importable here)
from avatar.motion.generator import Audio2Motion, load_generator
from avatar.motion.lle import lle_project
from avatar.motion.syncnet import sync_confidence


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either series is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 else float("nan")


def lmd(pred: np.ndarray, gt: np.ndarray, idx=None) -> float:
    """Mean Euclidean landmark distance over frames and points ``idx`` (all when None)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if idx is not None:
        pred, gt = pred[:, idx], gt[:, idx]
    return float(np.linalg.norm(pred - gt, axis=-1).mean())


def project(lm3d: np.ndarray, pose: np.ndarray, head_scale: float, K: np.ndarray) -> np.ndarray:
    """Canonical landmarks [N, 68, 3] -> pixels [N, 68, 2] with head-to-camera poses [N, 4, 4]."""
    cam = np.einsum("nij,nkj->nki", pose[:, :3, :3], head_scale * lm3d) + pose[:, None, :3, 3]
    uv = cam[..., :2] / np.clip(cam[..., 2:3], 1e-6, None)
    return uv * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])


def _sync(gen: Audio2Motion, feats: np.ndarray, expr: np.ndarray) -> dict:
    if gen.syncnet is None:
        return {"confidence": float("nan"), "offset": float("nan")}
    fn = gen.normalize_features(torch.from_numpy(np.array(feats, dtype=np.float32)).to(gen.device))
    return sync_confidence(gen.syncnet, fn, torch.from_numpy(np.ascontiguousarray(expr, dtype=np.float32)))


def _open_eval(generator, dataset, part: str):
    """(generator, dataset, features float32 [2N, D], frame range of ``part``) for an evaluation.

    Raises: FeatureMismatch, InvalidInput (unknown part or fewer than 8 frames in it)."""
    gen = generator if isinstance(generator, Audio2Motion) else load_generator(generator)
    ds = Dataset(dataset)
    feats = np.asarray(ds.features, dtype=np.float32)
    gen.stats.check_features(feats[:2], ds.feature_kind)
    rng = {"val": ds.val_range, "all": range(0, ds.n_frames)}.get(part)
    if rng is None or len(rng) < 8:
        raise InvalidInput(f"{dataset}: the {part} part has too few frames for evaluation")
    return gen, ds, feats, rng


def _postnet(postnet, gen: Audio2Motion):
    """A loaded postnet, or the bundle at ``postnet`` loaded on the generator's device."""
    from avatar.motion.postnet import Postnet, load_postnet

    return postnet if isinstance(postnet, Postnet) else load_postnet(postnet, device=gen.device)


def evaluate_motion(
    generator: Audio2Motion | str | Path,
    dataset: str | Path,
    postnet=None,
    lle_blend: float = 0.25,
    temperature: float = 1.0,
    seed: int = 0,
    part: str = "val",
) -> dict:
    """Self-driven metrics of the person's clip (see module docstring).

    Args:
        generator: a loaded :class:`Audio2Motion` or a bundle path. dataset: the person's dataset.
        postnet: a loaded :class:`avatar.motion.postnet.Postnet`, a bundle path, or None.
        lle_blend: blend of the LLE variant (reference = the person's training-range landmarks).
        part: "val" (validation tail) or "all".
    Returns:
        {"frames": n, "tracked": {...sync of the tracked landmarks...}, "generator": {...},
        "generator+postnet": {...}, "generator+lle": {...}}, each with mouth_lmd, lmd, mouth_lmd_px,
        lmd_px, mouth_open_r, sync_conf, sync_offset.
    Raises: FeatureMismatch (dataset features differ from the generator's), InvalidInput.
    """
    gen, ds, feats_all, rng = _open_eval(generator, dataset, part)
    mean = np.asarray(ds.lm3d_mean, np.float32)
    gt_expr = np.asarray(ds.lm3d, np.float32) - mean
    pred_all = gen.predict(feats_all, temperature=temperature, seed=seed)  # whole clip: real context
    sl = slice(rng.start, rng.stop)
    feats = feats_all[2 * rng.start : 2 * rng.stop]
    pose = np.asarray(ds.pose[sl], np.float64)
    K = ds.intrinsics.matrix()
    gt = gt_expr[sl]
    gt_px = project(mean + gt, pose, ds.head_scale, K)
    variants = {"generator": pred_all[sl]}
    if postnet is not None:
        variants["generator+postnet"] = _postnet(postnet, gen).apply(pred_all)[sl]
    if lle_blend > 0:
        ref = gt_expr[ds.train_range.start : ds.train_range.stop]
        variants["generator+lle"] = lle_project(pred_all[sl], ref, k=10, blend=lle_blend)
    s_gt = _sync(gen, feats, gt)
    result = {"frames": len(rng), "tracked": {"sync_conf": s_gt["confidence"], "sync_offset": s_gt["offset"]}}
    open_gt = mouth_opening(gt + mean)
    for name, p in variants.items():
        px = project(mean + p, pose, ds.head_scale, K)
        s = _sync(gen, feats, p)
        result[name] = {
            "mouth_lmd": lmd(p, gt, MOUTH),
            "lmd": lmd(p, gt),
            "mouth_lmd_px": lmd(px, gt_px, MOUTH),
            "lmd_px": lmd(px, gt_px),
            "mouth_open_r": pearson(mouth_opening(p + mean), open_gt),
            "sync_conf": s["confidence"],
            "sync_offset": s["offset"],
        }
    return result


def evaluate_audio(
    generator: Audio2Motion | str | Path,
    wav: np.ndarray,
    postnet=None,
    temperature: float = 1.0,
    seed: int = 0,
    lm3d_mean: np.ndarray | None = None,
) -> dict:
    """Metrics of motion driven by arbitrary 16 kHz audio (no ground truth).

    Args:
        wav: float32 [T] mono 16 kHz. lm3d_mean: [68, 3] the shape the expression is added to for
            mouth opening (default: the generator's mean expression on a zero shape).
    Returns:
        {"seconds", "sync_conf", "sync_offset", "open_energy_r" (Pearson r of mouth opening vs RMS
        energy per frame), "open_mean", "open_std", "motion" (mean per-frame mouth landmark speed,
        canonical units / frame)}.
    """
    from avatar.audio import audio_energy, extract_features

    gen = generator if isinstance(generator, Audio2Motion) else load_generator(generator)
    n = len(wav) // 640
    if n < 1:
        raise InvalidInput("audio shorter than one video frame (40 ms)")
    feats = extract_features(wav, gen.feature_kind, hubert_path=gen.hubert_path, n_frames=n)
    expr = gen.predict(feats, temperature=temperature, seed=seed)
    if postnet is not None:
        expr = _postnet(postnet, gen).apply(expr)
    base = np.zeros((68, 3), np.float32) if lm3d_mean is None else np.asarray(lm3d_mean, np.float32)
    opening = mouth_opening(expr + base)
    energy = audio_energy(wav, n)
    s = _sync(gen, feats, expr)
    speed = np.linalg.norm(np.diff(expr[:, MOUTH], axis=0), axis=-1).mean() if n > 1 else 0.0
    return {
        "seconds": n / 25.0,
        "sync_conf": s["confidence"],
        "sync_offset": s["offset"],
        "open_energy_r": pearson(opening, energy),
        "open_mean": float(opening.mean()),
        "open_std": float(opening.std()),
        "motion": float(speed),
    }


def evaluate_clip(generator: Audio2Motion | str | Path, dataset: str | Path, postnet=None, part: str = "all") -> dict:
    """Lip-sync of a whole clip of a speaker, next to the two trivial baselines.

    The generator (and optional postnet) is driven by the clip's own audio; the prediction is
    compared with the tracked landmarks over ``part`` ("all": the whole clip, the measure for
    speakers the generator never saw; "val": the validation tail, for the onboarded person).

    Baselines: the person's constant mean shape (mouth LMD of a zero expression) and the audio
    RMS-energy envelope as mouth opening (its Pearson r with the real opening).

    Returns:
        {"frames", "open_r" (Pearson r of predicted vs real inner-lip opening), "energy_r",
        "mouth_lmd", "mean_shape_mouth_lmd" (canonical units), "lmd_ratio" (mouth_lmd /
        mean_shape_mouth_lmd), "open_std_ratio" (predicted / real opening std)}.
    Raises: FeatureMismatch, InvalidInput (fewer than 8 frames in ``part``).
    """
    from avatar.audio import audio_energy

    gen, ds, feats, rng = _open_eval(generator, dataset, part)
    pred = gen.predict(feats, temperature=0.0, seed=0)
    if postnet is not None:
        pred = _postnet(postnet, gen).apply(pred)
    sl = slice(rng.start, rng.stop)
    mean = np.asarray(ds.lm3d_mean, np.float32)
    gt = np.asarray(ds.lm3d[sl], np.float32) - mean
    p = pred[sl]
    real, pr = mouth_opening(gt + mean), mouth_opening(p + mean)
    energy = audio_energy(np.asarray(ds.audio, np.float32), ds.n_frames)[sl]
    m_lmd, base = lmd(p, gt, MOUTH), lmd(np.zeros_like(gt), gt, MOUTH)
    return {
        "frames": len(rng),
        "open_r": pearson(pr, real),
        "energy_r": pearson(energy, real),
        "mouth_lmd": m_lmd,
        "mean_shape_mouth_lmd": base,
        "lmd_ratio": m_lmd / max(base, 1e-12),
        "open_std_ratio": float(pr.std() / max(real.std(), 1e-12)),
    }


def silence_check(
    generator: Audio2Motion | str | Path, dataset: str | Path, postnet=None, seconds: float = 3.0
) -> dict:
    """Mouth opening on digital silence vs the person's own silent frames.

    The person's silent frames are those whose audio RMS energy is in the lowest 10 % of the clip
    (pauses). Returns {"silence_open_mean", "person_silent_open_mean", "person_silent_open_std",
    "silence_z" (|difference| / std; the target is <= 1)}.
    """
    from avatar.audio import audio_energy, extract_features

    gen = generator if isinstance(generator, Audio2Motion) else load_generator(generator)
    ds = Dataset(dataset)
    mean = np.asarray(ds.lm3d_mean, np.float32)
    n = int(seconds * 25)
    feats = extract_features(np.zeros(n * 640, np.float32), gen.feature_kind, hubert_path=gen.hubert_path, n_frames=n)
    expr = gen.predict(feats, temperature=0.0, seed=0)
    if postnet is not None:
        expr = _postnet(postnet, gen).apply(expr)
    sil = mouth_opening(expr + mean)[n // 3 :]  # past the edge of the window
    energy = audio_energy(np.asarray(ds.audio, np.float32), ds.n_frames)
    quiet = energy <= np.percentile(energy, 10)
    real = mouth_opening(np.asarray(ds.lm3d, np.float32))[quiet]
    std = float(real.std()) + 1e-9
    return {
        "silence_open_mean": float(sil.mean()),
        "person_silent_open_mean": float(real.mean()),
        "person_silent_open_std": std,
        "silence_z": float(abs(sil.mean() - real.mean()) / std),
    }


def format_table(rows: dict[str, dict], keys: list[str]) -> str:
    """Plain-text table: one row per entry of ``rows``, one column per key."""
    w = max(len(r) for r in rows) + 2
    head = "".join(f"{'':{w}}") + "".join(f"{k:>14}" for k in keys)
    lines = [head]
    for name, r in rows.items():
        lines.append(f"{name:{w}}" + "".join(f"{r.get(k, float('nan')):>14.4f}" for k in keys))
    return "\n".join(lines)
